"""How long full Halda takes (every k, every outer iteration, device selection), by cluster size.

prima.cpp's C++ Halda reports 10-12 ms for 4-32 devices; our targets: median <= 15 ms at 4 devices
and <= 150 ms at 32. Random clusters (primasim.core.synth) and 7B-72B Q4K models. Each instance is
solved once to warm up (the CVXPY problems are compiled once per shape and cached for the life of
the process; that first, "cold" call is reported separately), then timed `--repeats` times.

Also measured: CVXPY's overhead per solve of the stacked LP (wall time of ``Problem.solve`` minus
the solver's own time), and HiGHS vs Clarabel on the same LPs.

    python experiments/halda_speed.py --per-size 60 --out experiments/results
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from primasim import load_model
from primasim.core.errors import PlanError
from primasim.core.io import atomic_csv, atomic_write_text
from primasim.core.synth import random_cluster
from primasim.plan.cost import CostModel, totals_of
from primasim.plan.halda import _LP_CACHE, _blocks, _bucket, _Data, _init_split, _solve_relax, halda

SIZES = (4, 8, 16, 32)
MODELS = ["llama3-8b", "llama3-14b", "llama1-30b", "llama3-45b", "llama3-60b", "llama1-65b", "llama3-70b",
          "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b"]


def time_halda(per_size: int, repeats: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for M in SIZES:
        for i in range(per_size):
            c = random_cluster(rng, M, name=f"r{M}-{i}")
            m = load_model(str(rng.choice(MODELS)), "q4k")
            for mode, kw in (("relax", {}), ("exact", {"solver": "exact"}), ("global", {"global_opt": True})):
                if mode == "exact" and i >= per_size // 3:
                    continue  # the exact MIP is the slow reference: time a third of the instances
                t0 = time.perf_counter()
                try:
                    r = halda(m, c, **kw)  # type: ignore[arg-type]
                except PlanError:
                    break
                cold = time.perf_counter() - t0
                ts = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    halda(m, c, **kw)  # type: ignore[arg-type]
                    ts.append(time.perf_counter() - t)
                rows.append({"devices": M, "instance": i, "model": m.name, "mode": mode, "first_ms": cold * 1e3,
                             "ms": float(np.median(ts)) * 1e3, "ms_min": min(ts) * 1e3, "iterations": r.iterations,
                             "rounds": r.rounds, "k": r.k, "active": len(r.plan.active), "fallback": r.used_fallback})
        print(f"{M} devices done", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def cold_times(seed: int) -> pd.DataFrame:
    """First call in a process (caches cleared): CVXPY compiles the stacked LP for that shape."""
    from primasim.plan import halda as _halda

    rng = np.random.default_rng(seed + 1)
    rows = []
    for M in SIZES:
        _halda._LP_CACHE.clear()
        _halda._MILP_CACHE.clear()
        c = random_cluster(rng, M)
        m = load_model("llama3-70b", "q4k")
        t = time.perf_counter()
        try:
            halda(m, c)
        except PlanError:
            continue
        cold = time.perf_counter() - t
        t = time.perf_counter()
        halda(m, c)
        rows.append({"devices": M, "cold_ms": cold * 1e3, "warm_ms": (time.perf_counter() - t) * 1e3,
                     "compiled_shapes": len(_halda._LP_CACHE)})
    return pd.DataFrame(rows)


def lp_overhead(seed: int, n: int = 40) -> pd.DataFrame:
    """Per stacked-LP solve: CVXPY wall time vs the solver's own time, HiGHS and Clarabel.

    Each solver gets its own compiled problem (CVXPY keeps one solving chain per problem, so
    alternating solvers on one problem would recompile every time)."""
    from primasim.plan.halda import _LPStack

    rng = np.random.default_rng(seed)
    cases = []  # (devices, shape, parameter values) of real first-iteration LPs
    for M in SIZES:
        for _ in range(n):
            c = random_cluster(rng, M)
            m = load_model(str(rng.choice(MODELS)), "q4k")
            cm = CostModel.for_cluster(m, c, n_ctx=1024)
            w, nn = _init_split(cm)
            lt, lg, _ = totals_of(w, nn, cm.L)
            d = _Data(cm, cm.sets(lt, lg), 1.01)
            blocks = _blocks(cm.L, M, None, False)
            if not blocks:  # more devices than layers: Halda leaves some out first
                continue
            _solve_relax(d, blocks)  # sets the parameters of the cached problem
            key = (_bucket(len(blocks)), _bucket(M))  # the cached problem _solve_relax just used
            cases.append((M, key, dict(_LP_CACHE[key].last_values)))
    rows = []
    for solver in ("HIGHS", "CLARABEL"):
        stacks: dict[tuple[int, int], _LPStack] = {}
        for M, key, vals in cases:
            if key not in stacks:
                stacks[key] = _LPStack(*key)
                stacks[key].solve(vals, solver)  # compile once
            st_ = stacks[key]
            t = time.perf_counter()
            st_.solve(vals, solver)  # parameter values + CVXPY + solver, as in Halda
            wall = time.perf_counter() - t
            sol = st_.prob.solver_stats.solve_time or 0.0
            rows.append({"devices": M, "solver": solver, "wall_ms": wall * 1e3, "solver_ms": sol * 1e3,
                         "overhead_ms": (wall - sol) * 1e3, "status": st_.prob.status})
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame, ov: pd.DataFrame, cold: pd.DataFrame, args: argparse.Namespace, seconds: float) -> str:
    lines = [
        "# Halda solve time",
        "",
        f"Reproduce: `python experiments/halda_speed.py --per-size {args.per_size} --repeats {args.repeats} "
        f"--seed {args.seed} --out experiments/results` ({seconds / 60:.1f} min). Data: `halda_speed.csv`, "
        "`halda_lp_overhead.csv`. Machine: 2 cores, shared with other jobs (numbers are wall clock, so noisy).",
        "",
        "Full Halda = every valid k, every outer iteration (set assignment, calibration), device selection",
        "rounds, and the check against the memory-ratio split; median of the repeats per instance, then the",
        "distribution over instances. Warm: the CVXPY problems already compiled (once per process and shape).",
        "",
        "| devices | mode | instances | median ms | p90 ms | max ms | mean iterations | mean rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (M, mode), sub in df.groupby(["devices", "mode"]):
        lines.append(f"| {M} | {mode} | {len(sub)} | {sub['ms'].median():.1f} | {sub['ms'].quantile(0.9):.1f} | "
                     f"{sub['ms'].max():.1f} | {sub['iterations'].mean():.1f} | {sub['rounds'].mean():.1f} |")
    relax = df[df["mode"] == "relax"]
    m4 = relax[relax["devices"] == 4]["ms"].median()
    m32 = relax[relax["devices"] == 32]["ms"].median()
    lines += ["", f"Targets (relax, warm): median at 4 devices {m4:.1f} ms (target <= 15 ms: "
              f"{'met' if m4 <= 15 else 'MISSED'}), at 32 devices {m32:.1f} ms (target <= 150 ms: "
              f"{'met' if m32 <= 150 else 'MISSED'}).", "",
              "Cold start: the first Halda call in a fresh process (problem caches cleared) compiles the DPP",
              "problems of its shapes once; shapes are bucketed, so a handful of compilations serve every size.", "",
              "| devices | cold first call ms | same call warm ms | shapes compiled |", "|---|---|---|---|"]
    for _, r in cold.iterrows():
        lines.append(f"| {int(r['devices'])} | {r['cold_ms']:.0f} | {r['warm_ms']:.1f} | {int(r['compiled_shapes'])} |")
    lines += ["",
              "## One stacked LP solve: CVXPY overhead and solver choice", "",
              "| devices | solver | median wall ms | median solver ms | median CVXPY overhead ms |", "|---|---|---|---|---|"]
    for (M, solver), sub in ov.groupby(["devices", "solver"]):
        lines.append(f"| {M} | {solver} | {sub['wall_ms'].median():.2f} | {sub['solver_ms'].median():.2f} | "
                     f"{sub['overhead_ms'].median():.2f} |")
    lines += ["", "CVXPY adds 1-2 ms per solve whatever the size (parameter substitution, building the solver's",
              "matrices, unpacking), more than HiGHS needs to solve the LP. HiGHS (simplex, vertex solutions) is",
              "faster than Clarabel (interior point) here and is the one used; the exchange step makes the",
              "rounding exact from either."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-size", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    a = ap.parse_args()
    t0 = time.time()
    df = time_halda(a.per_size, a.repeats, a.seed)
    ov = lp_overhead(a.seed)
    cold = cold_times(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_csv(a.out / "halda_speed.csv", df)
    atomic_csv(a.out / "halda_lp_overhead.csv", ov)
    atomic_csv(a.out / "halda_cold.csv", cold)
    text = summary(df, ov, cold, a, time.time() - t0)
    atomic_write_text(a.out / "halda_speed.md", text)
    print(text)


if __name__ == "__main__":
    main()
