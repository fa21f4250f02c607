"""`primasim plan`: a system's plan for a model on a cluster, with the cost model's predictions."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from rich.table import Table

from primasim.core.cluster import load_cluster
from primasim.core.errors import SpecError
from primasim.core.io import atomic_write_text
from primasim.core.model_sources import load_model
from primasim.core.units import GiB
from primasim.plan.draft import plan_speculative
from primasim.sim import make_plan

from . import HELP, speculation
from .options import add_option_arg, parse_options
from .output import console, print_infeasible

DESCRIPTION = """Plan MODEL on CLUSTER the way SYSTEM would and predict TPOT/TTFT with prima.cpp's cost model. Exit 0
also when the system cannot run the case (feasible=false); exit 2 on bad input."""  # argparse re-wraps it


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help=HELP["plan"],
                       description=DESCRIPTION)
    p.add_argument("--cluster", required=True, help="built-in cluster name (e.g. prima-d1-d4), `local`, or a TOML path")
    p.add_argument("--model", required=True, help="catalogue name (e.g. llama3-70b), a config.json, or a .gguf file")
    p.add_argument("--quant", help="quantisation: f32, f16, q8_0, q4k (default: the model's own)")
    p.add_argument("--system", default="prima", help="prima (default), prima-no-prefetch, prima-no-halda, exo, "
                   "llama.cpp, dllama, mdi-llm, pipo, flexgen, bud, memsched, perfsched, even")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--out", help="also write the plan JSON (what `primasim run --plan` reads) to this file")
    p.add_argument("--n-ctx", type=int, default=1024, help="context length the KV cache is sized for (default 1024)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length for the TTFT estimate (default 16)")
    p.add_argument("--head", help="use this device as the head (rank 0) instead of the cluster file's")
    g = p.add_argument_group("Halda (systems prima, prima-no-prefetch)")
    g.add_argument("--planner", choices=("global", "loop", "sim"),
                   help="global (default): Halda as one optimisation model of the paper-variant cost model with "
                   "communication (windows, GPU layers, memory sets and device selection at once); loop: prima.cpp's "
                   "own Halda (set-assignment loop, code variant); sim: local search with the simulator as the "
                   "objective, from Halda's plan")
    g.add_argument("--k", type=int, help="fix the number of laps k (honoured, or refused with the reason; default: "
                   "the planner's choice); also `even`'s k")
    g.add_argument("--solver", choices=("relax", "exact", "dp"),
                   help="relax (default): CVXPY relaxation + rounding; exact: the integer program (HiGHS MIP, the "
                   "global optimum with --planner global); dp: dynamic programming over devices (global only, a "
                   "cross-check)")
    g.add_argument("--revision", choices=("head", "v1"),
                   help="with --planner loop: prima.cpp main (head, default) or v1, the code of the paper's Table 4 "
                   "(GPU layers start at 0)")
    g.add_argument("--variant", choices=("code", "paper"), help="cost model Halda optimises (default: paper; code with --planner loop)")
    g.add_argument("--general", action="store_true", help="allow a partial last lap (W need not divide L)")
    g.add_argument("--comm", action="store_true", help="include per-hop communication time in Halda's cost")
    g.add_argument("--global", dest="global_opt", action="store_true",
                   help="with --variant/--comm: solve the global model instead of prima.cpp's loop (beyond prima.cpp)")
    g.add_argument("--no-select", action="store_true", help="keep devices that get only one layer")
    add_option_arg(p, "system option, repeatable (e.g. S=4 for mdi-llm, batch=100 for bud, include_android=true)")
    speculation.add_arguments(p)
    p.set_defaults(func=run)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    opts = parse_options(args.option)
    halda_system = args.system in ("prima", "prima-no-prefetch")
    if args.k is not None and (halda_system or args.system == "even"):
        opts["k"] = args.k
    if halda_system:
        if args.planner:
            opts["planner"] = args.planner
        if args.solver:
            opts["solver"] = args.solver
        if args.revision:
            opts["revision"] = args.revision
        if args.variant:
            opts["variant"] = args.variant
        if args.general:
            opts["general"] = True
        if args.comm:
            opts["comm"] = True
        if args.global_opt:
            opts["global_opt"] = True
        if args.no_select:
            opts["select_devices"] = False
    else:
        used = [f for f, on in (("--planner", args.planner), ("--solver", args.solver), ("--revision", args.revision),
                                ("--variant", args.variant), ("--general", args.general),
                                ("--comm", args.comm), ("--global", args.global_opt), ("--no-select", args.no_select),
                                ("--k", args.k is not None and args.system != "even")) if on]
        if used:
            raise SpecError(f"{', '.join(used)} only apply to Halda (systems prima, prima-no-prefetch)",
                            where="--system " + args.system, fix="drop them or use --system prima")
    return opts


def run(args: argparse.Namespace) -> int:
    cluster = load_cluster(args.cluster)
    if args.head:
        if args.head not in cluster.names:
            raise SpecError(f"--head {args.head!r} is not a device of {cluster.name}", where="--head",
                            fix=f"use one of {cluster.names}")
        cluster = dataclasses.replace(cluster, head=args.head)
    model = load_model(args.model, args.quant)
    draft = speculation.draft_spec(args, model)
    dp = None
    if draft is not None:
        dp = plan_speculative(args.system, model, cluster, draft, n_ctx=args.n_ctx, prompt_tokens=args.prompt_tokens,
                              fixed_k=args.draft_tokens, **_options(args))
        out = dp.outcome
        if out is None:  # no placement and K was feasible: report the attempt at K = 0 or the first reason
            out = make_plan(args.system, model, cluster, n_ctx=args.n_ctx, prompt_tokens=args.prompt_tokens,
                            **_options(args))
    else:
        out = make_plan(args.system, model, cluster, n_ctx=args.n_ctx, prompt_tokens=args.prompt_tokens, **_options(args))
    obj = out.to_json()
    obj.update(model=model.name, quant=model.quant, cluster=cluster.name)
    if dp is not None:
        obj["speculation"] = dp.to_json()
        if out.plan is not None:
            chosen = dp.draft_spec
            obj["plan"]["options"] = {**obj["plan"].get("options", {}),
                                      "draft": None if chosen is None else chosen.to_json()}
    if args.out:
        if out.plan is None:
            raise SpecError(f"{args.system} cannot run this case ({out.reason}), so there is no plan to write",
                            where="--out", fix="pick a system or cluster that fits, or drop --out")
        try:
            atomic_write_text(args.out, json.dumps(obj, indent=2))
        except OSError as exc:
            raise SpecError(f"cannot write the plan ({exc.strerror})", where=args.out,
                            fix="choose a writable path") from None
    if args.json:
        print(json.dumps(obj, indent=2))
        return 0
    _print_table(out, model, cluster)
    if dp is not None:
        _print_draft(dp)
    return 0


def _print_draft(dp: Any) -> None:
    con = console()
    best = {}
    for c in dp.candidates:  # the best K per placement, and every K of the chosen placement
        key = (c.device, c.where)
        if c.feasible and (key not in best or c.tpot_s < best[key].tpot_s):
            best[key] = c
    t = Table(title="speculative decoding: expected TPOT = (K t_draft + t_pass) / tokens per pass")
    for col in ("draft on", "K", "t_draft ms", "t_pass ms", "tokens/pass", "TPOT ms"):
        t.add_column(col, justify="left" if col == "draft on" else "right", no_wrap=True)
    b = dp.best
    rows = [c for c in dp.candidates if c.feasible and ((c.device, c.where) == (b.device, b.where) or c.k == 0)]
    rows += [c for c in best.values() if (c.device, c.where) != (b.device, b.where) and c.k > 0]
    for c in rows:
        mark = " *" if c is b else ""
        t.add_row(("-" if c.k == 0 else f"{c.device}:{c.where}") + mark, str(c.k), f"{c.t_draft_s * 1e3:.2f}",
                  f"{c.t_pass_s * 1e3:.1f}", f"{c.tokens_per_pass:.2f}", f"{c.tpot_s * 1e3:.1f}")
    con.print(t)
    bad = sorted({c.reason for c in dp.candidates if not c.feasible})
    lines = ["* best: " + ("plain decoding (no draft pays here)" if b.k == 0 else
                            f"draft on {b.device}:{b.where}, K = {b.k}: {b.tpot_s * 1e3:.1f} ms per token against "
                            f"{dp.baseline.tpot_s * 1e3:.1f} without speculation "
                            f"({100 * (1 - b.tpot_s / dp.baseline.tpot_s):.0f} % lower)"),
             f"plan: {b.plan.describe() if b.plan is not None else '-'}",
             f"acceptance: {dp.draft.acceptance.describe() if hasattr(dp.draft.acceptance, 'describe') else dp.draft.acceptance}"]
    lines += [f"not feasible: {r}" for r in bad[:5]]
    con.print("\n".join(lines))


def _print_table(out: Any, model: Any, cluster: Any) -> None:
    con = console()
    title = f"{out.system}: {model.name} ({model.quant}, {model.n_layers} layers) on {cluster.name}"
    if not out.feasible:
        return print_infeasible(con, title, out.reason)
    plan = out.plan
    halda = out.extra.get("halda", {})
    sets = dict(zip([d.name for d in plan.devices], halda.get("sets", []))) if halda else {}
    tot = plan.totals()
    t = Table(title=title)
    for col in ("device", "window", "GPU/win", "layers", "on GPU", "set", "pressure", "RAM", "VRAM"):
        t.add_column(col, justify="left" if col in ("device", "set") else "right", no_wrap=True)
    for d in plan.devices:
        dev = cluster.device(d.name)
        lm, lg = tot[d.name]
        t.add_row(d.name + ("*" if d.name == plan.head else ""), str(d.layers), str(d.gpu_layers), str(lm),
                  str(lg), sets.get(d.name, ""), f"{100 * out.memory_pressure.get(d.name, 0.0):.1f} %",
                  f"{dev.ram_avail / GiB:.1f}G", f"{dev.gpu.vram_avail / GiB:.1f}G" if dev.gpu else "-")
    con.print(t)
    lines = ["* head; window = layers per lap, GPU/win = GPU layers per window; RAM/VRAM = available",f"k = {plan.k} lap(s), schedule {plan.schedule}, weights {plan.weights}, prefetch {'on' if plan.prefetch else 'off'}",
             f"predicted TPOT {out.predicted_tpot * 1e3:.1f} ms, TTFT {out.predicted_ttft * 1e3:.1f} ms, "
             f"{out.throughput:.2f} tokens/s (prima.cpp cost model, paper variant with communication)"]
    if halda:
        lines.append(f"Halda objective {halda['objective_ms']:.1f} ms ({plan.options.get('variant', 'code')} variant), "
                     f"{halda['iterations']} iteration(s), {halda['rounds']} round(s), solved in {halda['solve_time_ms']:.0f} ms"
                     + (f"; dropped {', '.join(halda['dropped'])}" if halda["dropped"] else ""))
    for note in plan.notes:
        lines.append(f"note: {note}")
    con.print("\n".join(lines))
