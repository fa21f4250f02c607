"""How fast the simulator is (issue #3's speed bar).

    python experiments/sim_speed.py [--tokens 64] [--repeat 3] [--out experiments/results]

1. 64 tokens of Llama 3-70B Q4K on prima-d1-d4 with `prima` (bar: < 2 s): the plan comes from
   make_plan("prima"); planning and simulation are timed separately and together.
2. Every Table 4 cell, 7 models x 6 systems (llama.cpp, prima, prima-no-prefetch,
   prima-no-halda, exo, dllama), planned and simulated with the same number of tokens (bar: < 30 s).
Wall-clock seconds on this (shared, noisy) machine; the median of `--repeat` runs is reported.
Writes sim_speed.json and sim_speed.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from pathlib import Path

from primasim import load_model, make_plan
from primasim.core.cluster import load_cluster
from primasim.core.io import atomic_write_json, atomic_write_text
from primasim.sim import SimConfig, simulate

MODELS = ["llama3-8b", "llama3-14b", "llama1-30b", "llama3-45b", "llama3-60b", "llama1-65b", "llama3-70b"]
SYSTEMS = ["llama.cpp", "prima", "prima-no-prefetch", "prima-no-halda", "exo", "dllama"]
ROOT = Path(__file__).resolve().parents[1]


def one_70b(tokens: int) -> dict[str, float]:
    cl = load_cluster("prima-d1-d4")
    m = load_model("llama3-70b", "q4k")
    cfg = SimConfig(tokens=tokens)
    t0 = time.perf_counter()
    out = make_plan("prima", m, cl, n_ctx=1024, prompt_tokens=cfg.prompt_tokens)
    t1 = time.perf_counter()
    assert out.plan is not None
    res = simulate("prima", m, cl, plan=out.plan, config=cfg)
    t2 = time.perf_counter()
    return {"plan_s": t1 - t0, "simulate_s": t2 - t1, "total_s": t2 - t0, "sim_tpot_ms": res.tpot_ms,
            "simulated_seconds": res.metrics.makespan_s if res.metrics else float("nan"),
            "spans": len(res.trace.spans) if res.trace else 0}


def table4(tokens: int) -> dict[str, float]:
    cl = load_cluster("prima-d1-d4")
    cfg = SimConfig(tokens=tokens)
    per: dict[str, float] = {}
    t0 = time.perf_counter()
    for mn in MODELS:
        m = load_model(mn, "q4k")
        for s in SYSTEMS:
            t = time.perf_counter()
            simulate(s, m, cl, config=cfg)
            per[f"{mn}/{s}"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    slowest = max(per, key=per.__getitem__)
    return {"total_s": total, "cells": len(per), "slowest_cell": slowest, "slowest_s": per[slowest]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    # warm the imports and caches (CVXPY, HiGHS, model byte tables) outside the timed runs
    one_70b(2)
    runs70 = [one_70b(args.tokens) for _ in range(args.repeat)]
    runs_t4 = [table4(args.tokens) for _ in range(args.repeat)]
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    result = {
        "command": f"python experiments/sim_speed.py --tokens {args.tokens} --repeat {args.repeat}",
        "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}",
        "llama3_70b_prima": {"tokens": args.tokens, "plan_s": med(runs70, "plan_s"),
                             "simulate_s": med(runs70, "simulate_s"), "total_s": med(runs70, "total_s"),
                             "bar_s": 2.0, "sim_tpot_ms": runs70[0]["sim_tpot_ms"],
                             "simulated_seconds": runs70[0]["simulated_seconds"], "spans": runs70[0]["spans"]},
        "table4": {"tokens": args.tokens, "cells": runs_t4[0]["cells"], "total_s": med(runs_t4, "total_s"),
                   "bar_s": 30.0, "slowest_cell": runs_t4[0]["slowest_cell"], "slowest_s": runs_t4[0]["slowest_s"]},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sim_speed.json", result, indent=2, newline=False)
    a, b = result["llama3_70b_prima"], result["table4"]
    md = (f"# Simulator speed\n\n`{result['command']}` on {result['machine']} (shared machine; medians of "
          f"{args.repeat} runs, imports warmed).\n\n"
          f"- Llama 3-70B Q4K, prima, prima-d1-d4, {a['tokens']} tokens: **{a['total_s']:.2f} s** "
          f"(plan {a['plan_s']:.2f} s + simulate {a['simulate_s']:.2f} s; bar < 2 s); it simulates "
          f"{a['simulated_seconds']:.1f} s of inference ({a['spans']} timeline spans).\n"
          f"- All {b['cells']} Table 4 cells (7 models x 6 systems), {b['tokens']} tokens each, planning included: "
          f"**{b['total_s']:.1f} s** (bar < 30 s); slowest cell {b['slowest_cell']} ({b['slowest_s']:.2f} s).\n")
    atomic_write_text(out / "sim_speed.md", md)
    print(md)


if __name__ == "__main__":
    main()
