"""`primasim simulate`: predict TPOT, TTFT, throughput and memory pressure of a system with the
SimPy simulator, and optionally write its timeline as a Chrome/Perfetto trace."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pandas as pd
from rich.table import Table

from primasim.core.cluster import load_cluster
from primasim.core.errors import SpecError
from primasim.core.model_sources import load_model
from primasim.core.plan import Plan
from primasim.plan.draft import plan_speculative
from primasim.sim import SimConfig, sim_plan, simulate, system_names
from primasim.sim._systems import get_system

from . import HELP, speculation, workload
from .options import add_option_arg, jsonable, parse_options
from .output import console, print_infeasible


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help=HELP["simulate"],
                       description="Simulate one system on a cluster: plan it (or take --plan), run its schedule "
                       "on simulated devices (compute, page cache, disk, Wi-Fi), report the metrics.")
    p.add_argument("--cluster", help="built-in cluster name or cluster TOML path (required)")
    p.add_argument("--model", help="built-in model name, config.json path or GGUF file (required)")
    p.add_argument("--quant", default=None, help="f32, f16, q8_0 or q4k (default: the model's)")
    p.add_argument("--system", default=None,
                   help="prima (default), prima-no-prefetch, prima-no-halda, llama.cpp, exo, dllama, mdi-llm, "
                        "pipo, flexgen, bud, ... (see --list-systems)")
    p.add_argument("--list-systems", action="store_true", help="list the simulated systems and exit")
    p.add_argument("--plan", default=None, help="a plan JSON file (e.g. `primasim plan --json` output)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default 16)")
    p.add_argument("--tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--n-ctx", type=int, default=1024, help="context size the KV cache is allocated for (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--k", type=int, default=None, help="fix the number of ring laps (prima planners)")
    pf = p.add_mutually_exclusive_group()
    pf.add_argument("--prefetch", dest="prefetch", action="store_true", default=None,
                    help="force prefetching of the next window on")
    pf.add_argument("--no-prefetch", dest="prefetch", action="store_false", help="force prefetching off")
    p.add_argument("--S", type=int, default=None, help="mdi-llm: sequences in flight (default: number of nodes)")
    p.add_argument("--batch", type=int, default=None, help="bud: max batch; pipo/flexgen: batch size")
    p.add_argument("--requests", type=int, default=100, help="bud/serial: number of requests (default 100)")
    add_option_arg(p, "planner option (repeatable), e.g. kv=prealloc for bud, devices=D1,D2 for exo; "
                      "see `primasim plan --help`")
    p.add_argument("--no-jitter", action="store_true", help="use the mean link latency for every message")
    p.add_argument("--sim-planner", "--sim-halda", dest="sim_halda", action="store_true",
                   help="prima: plan with the simulator as the objective (local search from Halda's plan, "
                        "= --option planner=sim), then simulate that plan")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--table", action="store_true", help="print the per-device table (pandas) too")
    p.add_argument("--trace", default=None, metavar="FILE", help="write a Chrome/Perfetto trace JSON to FILE")
    workload.add_arguments(p)
    speculation.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list_systems:
        for name in system_names():
            print(f"{name:18s} {get_system(name).help}")
        return 0
    if not args.cluster or not args.model:
        raise SpecError("primasim simulate needs --cluster and --model", where="command line",
                        fix="e.g. primasim simulate --cluster prima-d1-d4 --model llama3-8b")
    model = load_model(args.model, args.quant)
    cluster = load_cluster(args.cluster)
    plan = Plan.from_json(args.plan) if args.plan else None
    system = args.system or (plan.system if plan is not None else "prima")
    get_system(system)  # unknown names fail here, with the list
    for flag, v in (("--tokens", args.tokens), ("--prompt-tokens", args.prompt_tokens), ("--n-ctx", args.n_ctx),
                    ("--requests", args.requests)):
        if v < 1:
            raise SpecError(f"{flag} must be >= 1, got {v}", where=flag, fix=f"give {flag} a positive value")
    cfg = SimConfig(tokens=args.tokens, prompt_tokens=args.prompt_tokens, seed=args.seed, jitter=not args.no_jitter,
                    prefetch=args.prefetch, S=args.S, batch=args.batch, requests=args.requests)
    if plan is not None and args.n_ctx != 1024 and plan.n_ctx != args.n_ctx:
        plan = plan.replace(n_ctx=args.n_ctx)
    opts: dict[str, Any] = {"n_ctx": args.n_ctx}
    if args.k is not None:
        opts["k"] = args.k
    if args.S is not None:
        opts["S"] = args.S
    if args.batch is not None:
        opts["batch"] = args.batch
    opts.update(parse_options(args.option, example="kv=prealloc"))
    extra: dict[str, Any] = {}
    if args.sim_halda and args.workload:
        raise SpecError("--sim-planner and --workload together are not supported", where="--workload",
                        fix="plan first (primasim plan --planner sim --out plan.json), then --plan plan.json")
    draft = speculation.draft_spec(args, model)
    if draft is not None:
        if args.sim_halda or args.workload:
            raise SpecError("--draft cannot be combined with --sim-planner or --workload", where="--draft",
                            fix="plan with `primasim plan --draft ... --out plan.json`, then simulate --plan plan.json --draft ...")
        if args.draft_tokens is None and plan is None:  # the planner's best placement and K
            dp = plan_speculative(system, model, cluster, draft, n_ctx=args.n_ctx, prompt_tokens=args.prompt_tokens,
                                  **{k: v for k, v in opts.items() if k != "n_ctx"})
            extra["draft_plan"] = dp.to_json()
            chosen = dp.draft_spec
            plan = dp.best.plan
            draft = chosen if chosen is not None else draft.replace(tokens=0)
        cfg = cfg.replace(draft=draft)
    if args.sim_halda:
        if plan is not None:
            raise SpecError("--sim-planner plans by itself", where="--plan", fix="drop --plan or --sim-planner")

        sp = sim_plan(model, cluster, config=cfg.replace(tokens=min(cfg.tokens, 8)), n_ctx=args.n_ctx, k=args.k,
                      system=system)
        plan = sp.plan
        extra["sim_planner"] = sp.summary()
    if args.workload:
        return workload.run(args, system, model, cluster, plan, cfg, opts)
    res = simulate(system, model, cluster, plan=plan, config=cfg, **({} if plan is not None else opts))
    if args.trace and res.trace is not None:
        res.trace.save_chrome(args.trace)
    out = res.to_json()
    out.update(extra)
    out["model"] = model.name
    out["quant"] = model.quant
    out["cluster"] = cluster.name
    if args.json:
        print(json.dumps(out, default=jsonable))
        return 0
    _print_human(res, out, args)
    return 0


def _print_human(res: Any, out: dict[str, Any], args: argparse.Namespace) -> None:
    con = console()
    head = f"{out['system']} | {out['model']} ({out['quant']}) on {out['cluster']}"
    if not res.feasible:
        return print_infeasible(con, head, res.reason)
    plan = res.plan
    if plan is not None:
        con.print(f"[bold]{head}[/]  plan: {plan.describe()}" + (" prefetch" if plan.prefetch else ""))
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    con.print(f"TPOT {f(out['tpot_ms'])} ms (P50 {f(out['tpot_p50_ms'])}, P90 {f(out['tpot_p90_ms'])})  "
              f"TTFT {f(out['ttft_ms'])} ms  throughput {f(out['throughput_tok_s'], 2)} tok/s")
    sp = out.get("speculation")
    if sp and sp.get("passes"):
        d = sp["draft"]
        con.print(f"speculation: draft {d['model']} ({d['quant']}) on {d['device']}:{d['where']}, K = {d['tokens']}, "
                  f"{sp['acceptance']}: {sp['tokens_per_pass']:.2f} tokens per pass over {sp['passes']} passes, "
                  f"alpha-hat {sp['alpha_hat']:.3f}, accepted drafts per pass {sp['accepted_hist']}")
    t = Table(title="per device (busy = fraction of the run)")
    df = res.table()
    cols = [c for c in ("device", "layers", "gpu_layers", "busy_cpu", "busy_gpu", "busy_wait", "disk_read_gb",
                        "net_tx_mb", "memory_pressure") if c in df.columns]
    for col in cols:
        t.add_column(col.replace("_", " "))
    for _, row in df[cols].iterrows():
        t.add_row(*[(f"{v:.3f}" if isinstance(v, float) else str(v)) for v in row.tolist()])
    con.print(t)
    if args.trace:
        con.print(f"timeline written to {args.trace} (open in ui.perfetto.dev or chrome://tracing)")
    if args.table:

        with pd.option_context("display.width", 200, "display.max_columns", 30):
            print(df.to_string(index=False))
