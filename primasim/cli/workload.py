"""`primasim simulate --workload ...`: serve a request stream in the simulator (options + output).

Not a subcommand of its own: `primasim simulate` adds these options and hands over when
``--workload`` is given."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from rich.table import Table

from primasim.core.errors import SpecError
from primasim.core.serving import SLO
from primasim.core.trace import metrics
from primasim.core.workload import parse_workload
from primasim.sim import Departure, Recovery, serve_workload

from .options import jsonable
from .output import console


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("request streams (serving)")
    g.add_argument("--workload", default=None, metavar="FILE|poisson:RATE[,N]",
                   help="serve a request stream: a trace file (CSV arrival_s,prompt_tokens,output_tokens; Vidur CSV; "
                        "LLMServingSim JSONL) or poisson:RATE[,N], gamma:RATE,CV[,N], onoff:RATE,ON_S,OFF_S[,N], "
                        "constant:RATE[,N] (RATE requests/s; lengths from --prompt-tokens/--tokens)")
    g.add_argument("--serve-mode", default=None, choices=("slots", "continuous", "batch"),
                   help="slots: sequences in flight each walking the ring (MDI-LLM, primasim serve; default for ring "
                        "systems); continuous: one pass per step for all active requests (llama.cpp server); "
                        "batch: Bud (default for bud)")
    g.add_argument("--slots", type=int, default=None,
                   help="requests served at once (default: the ring's devices for slots, 4 for continuous)")
    g.add_argument("--slo", default=None, metavar="ttft:MS,tpot:MS[,e2e:MS]",
                   help="latency objectives for goodput (requests/s meeting all of them)")
    g.add_argument("--depart", default=None, metavar="TIME:DEVICE[:kill|stall]",
                   help="a device leaves TIME s into the stream: re-plan on the survivors, re-prefill in-flight requests")
    g.add_argument("--setup-s", type=float, default=0.0,
                   help="with --depart: seconds a survivor takes to set up its new windows (default 0)")
    g.add_argument("--per-request", action="store_true", help="--json: also list every request")


def parse_departure(text: str) -> Any:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise SpecError(f"{text!r} is not TIME:DEVICE[:kill|stall]", where="--depart", fix="e.g. --depart 30:D2")
    try:
        t = float(parts[0])
    except ValueError:
        raise SpecError(f"{parts[0]!r} is not a time in seconds", where="--depart", fix="e.g. --depart 30:D2") from None
    kind = parts[2] if len(parts) == 3 else "kill"
    if kind not in ("kill", "stall") or not (math.isfinite(t) and t >= 0):
        raise SpecError(f"{text!r}: time must be >= 0 and kind kill or stall", where="--depart",
                        fix="e.g. --depart 30:D2:stall")
    return Departure(t, parts[1], kind)  # type: ignore[arg-type]


def run(args: argparse.Namespace, system: str, model: Any, cluster: Any, plan: Any, cfg: Any,
        opts: dict[str, Any]) -> int:
    wl = parse_workload(args.workload, prompt=args.prompt_tokens, output=args.tokens, seed=args.seed,
                        default_n=args.requests)
    slo = SLO.parse(args.slo) if args.slo else None
    if args.slots is not None and args.slots < 1:
        raise SpecError(f"--slots must be >= 1, got {args.slots}", where="--slots", fix="e.g. --slots 4")
    dep = parse_departure(args.depart) if args.depart else None
    res = serve_workload(system, model, cluster, wl, plan=plan, config=cfg, mode=args.serve_mode, slots=args.slots,
                         slo=slo, departure=dep, recovery=Recovery(setup_s=args.setup_s),
                         **({} if plan is not None else opts))
    if args.trace and res.trace is not None:
        res.trace.save_chrome(args.trace)
    out = res.to_json(per_request=args.per_request)
    s = res.summary
    # the contract's keys, over requests: TPOT/TTFT means and percentiles, throughput
    out.update({"tpot_ms": s.get("tpot_ms", {}).get("mean"), "tpot_p50_ms": s.get("tpot_ms", {}).get("p50"),
                "tpot_p90_ms": s.get("tpot_ms", {}).get("p90"), "ttft_ms": s.get("ttft_ms", {}).get("mean"),
                "ttft_p50_ms": s.get("ttft_ms", {}).get("p50"), "ttft_p90_ms": s.get("ttft_ms", {}).get("p90"),
                "throughput_tok_s": s.get("throughput_tok_s"), "memory_pressure": _pressure(res),
                "model": model.name, "quant": model.quant, "cluster": cluster.name,
                "workload": {"name": wl.name, "requests": len(wl), "rate_req_s": None if math.isinf(wl.rate) else wl.rate,
                             "duration_s": wl.duration, **{k: v for k, v in wl.meta.items() if k != "file"}}})
    if args.json:
        print(json.dumps(out, default=jsonable))
        return 0
    _print(res, out)
    return 0


def _pressure(res: Any) -> dict[str, float]:
    if res.trace is None:
        return {}

    return metrics(res.trace).memory_pressure


def _print(res: Any, out: dict[str, Any]) -> None:
    con = console()
    head = f"{out['system']} ({res.mode}) | {out['model']} ({out['quant']}) on {out['cluster']} | {out['workload']['name']}"
    if not res.feasible:
        con.print(f"[bold red]{head}: infeasible[/] - {res.reason}")
        return
    s = res.summary
    con.print(f"[bold]{head}[/]  plan: {res.plan.describe() if res.plan else '-'}")
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    con.print(f"{s['completed']}/{s['requests']} completed in {f(s['duration_s'])} s; throughput "
              f"{f(s['throughput_req_s'], 2)} req/s, {f(s['throughput_tok_s'], 1)} tok/s; goodput "
              f"{f(s['goodput_req_s'], 2)} req/s (SLO attainment {f((s['slo_attainment'] or 0) * 100, 0)} %)")
    t = Table(title="per request (ms)")
    for col in ("metric", "mean", "p50", "p90", "p95", "p99"):
        t.add_column(col)
    for k in ("ttft_ms", "tpot_ms", "e2e_ms", "queue_ms", "itl_ms"):
        st = s[k]
        t.add_row(k[:-3], *[f(st.get(c)) for c in ("mean", "p50", "p90", "p95", "p99")])
    con.print(t)
    if res.recovery:
        r = res.recovery
        con.print(f"device {r['device']} left at {r['time_s']:g} s ({r['kind']}): "
                  + (f"re-planned to {r.get('plan')}, first token again after {f(r.get('recovery_s'), 2)} s"
                     if r.get("feasible") else f"no plan on the survivors: {r.get('reason')}"))
