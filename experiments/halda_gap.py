"""Halda's relaxation + rounding vs the exact integer program, on random heterogeneous clusters.

For every instance (2-16 random devices, a 7B-72B model, mixed OS/GPU/disk, see primasim.core.synth):
1. the fixed-k subproblems of the first outer iteration (set assignment of prima.cpp's start),
   solved by relaxation + rounding and by the exact integer program (CVXPY + HiGHS MIP, gap 0);
2. full Halda (all k, all iterations, device selection) with ``solver="relax"`` and ``"exact"``.
The gap is (relax - exact) / exact of the best objective. Instances cycle through prima.cpp's
setting (code variant, no communication), ``comm=True`` and ``general=True`` (with a fixed k that
need not divide L half of the time).

It also measures the options beyond prima.cpp against prima.cpp's Halda: for the prima.cpp-setting
instances, the TPOT that the fuller cost model (paper variant + communication) predicts for the
plans of Halda with comm=True, general=True, global_opt=True, and global_opt + comm.

    python experiments/halda_gap.py --instances 600 --out experiments/results [--resume]

Each finished instance is appended to <out>/halda_gap_runs.jsonl (one fsync'd line; primasim.core.io).
A killed run loses at most the instance in flight: `--resume` skips the journal's instances (same
seed) and runs the rest; without it a run starts afresh (the old journal is kept as .prev). The
journal is deleted once halda_gap.csv and halda_gap.md are written (atomically). The reported
minutes are the sum of the instances' own times, so they do not count the pause of a resumed run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from primasim import load_model
from primasim.core.errors import PlanError
from primasim.core.io import Journal, atomic_csv, atomic_write_text
from primasim.core.synth import random_cluster
from primasim.plan.cost import CostModel, predict_tpot, totals_of
from primasim.plan.halda import _blocks, _Data, _init_split, _solve_exact, _solve_relax, halda

MODELS = ["llama3-8b", "llama3-14b", "llama1-30b", "llama3-45b", "llama3-60b", "llama1-65b", "llama3-70b",
          "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b", "llama2-7b", "codellama-13b"]
MODES = ["prima", "prima", "prima", "prima", "comm", "general"]  # 2/3 in prima.cpp's own setting
JOURNAL = "halda_gap_runs.jsonl"


def _block_gap(model, cluster, n_ctx: int, comm: bool, general: bool, k: int | None) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Best objective over the first iteration's blocks, both ways (+ infeasibility mismatches)."""
    ring = cluster.names
    cm = CostModel.for_cluster(model, cluster, n_ctx=n_ctx, variant="code", comm=comm)
    w, n = _init_split(cm)
    lt, lg, _ = totals_of(w, n, cm.L)
    d = _Data(cm, cm.sets(lt, lg), 1.01)
    blocks = _blocks(cm.L, len(ring), k, general)
    rel = _solve_relax(d, blocks)
    ex = _solve_exact(d, blocks)
    mismatch = sum((a is None) != (b is None) for a, b in zip(rel, ex))
    relax_infeasible_only = sum(a is None and b is not None for a, b in zip(rel, ex))
    per_block = [(a.objective - b.objective) / b.objective for a, b in zip(rel, ex) if a is not None and b is not None]
    best_r = min((a.objective for a in rel if a is not None), default=math.inf)
    best_e = min((b.objective for b in ex if b is not None), default=math.inf)
    gap = (best_r - best_e) / best_e if math.isfinite(best_e) and math.isfinite(best_r) else (0.0 if best_r == best_e else math.nan)
    return {"blocks": len(blocks), "block_gap": gap, "block_gap_worst": max(per_block, default=0.0),
            "block_feasibility_mismatch": mismatch, "relax_infeasible_exact_feasible": relax_infeasible_only}


def instances(n_instances: int, seed: int) -> Iterator[tuple[int, str, int, Any, Any, int, int | None]]:
    """(i, mode, devices, cluster, model, n_ctx, fixed k) of every instance: all random draws are made
    here, in order, so a resumed run that skips finished instances sees the same instances."""
    rng = np.random.default_rng(seed)
    for i in range(n_instances):
        mode = MODES[i % len(MODES)]
        n_dev = int(rng.integers(2, 17))
        cluster = random_cluster(rng, n_dev, name=f"rand{i}")
        model = load_model(str(rng.choice(MODELS)), str(rng.choice(["q4k", "q4k", "q4k", "q8_0"])))
        n_ctx = int(rng.choice([512, 1024, 4096]))
        k = None
        if mode == "general" and rng.random() < 0.5:
            k = int(rng.integers(2, max(3, model.n_layers // n_dev) + 1))
        yield i, mode, n_dev, cluster, model, n_ctx, k


def run(n_instances: int, seed: int, out: Path, resume: bool = False) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out / JOURNAL, "key", resume=resume)
    if resume:
        print(f"resuming: {len(journal)} instances already in {journal.path}", file=sys.stderr, flush=True)
    t_start = time.time()
    for i, mode, n_dev, cluster, model, n_ctx, k in instances(n_instances, seed):
        key = f"seed{seed}/{i}"
        if key in journal:
            continue
        comm = mode == "comm"
        general = mode == "general"
        t_inst = time.time()
        row: dict[str, object] = {"instance": i, "mode": mode, "devices": n_dev, "model": model.name,
                                  "quant": model.quant, "n_ctx": n_ctx, "k_fixed": k}
        try:
            row.update(_block_gap(model, cluster, n_ctx, comm, general, k))
        except PlanError as e:
            row["block_error"] = e.message
        res = {}
        for solver in ("relax", "exact"):
            t = time.perf_counter()
            try:
                r = halda(model, cluster, n_ctx=n_ctx, solver=solver, comm=comm, general=general, k=k)  # type: ignore[arg-type]
                res[solver] = r
                row[f"{solver}_objective_ms"] = r.objective * 1e3
                row[f"{solver}_plan"] = r.plan.describe()
                row[f"{solver}_fallback"] = r.used_fallback
                row[f"{solver}_loop_sets"] = " ".join(r.loop_sets)
                row[f"{solver}_calibrated"] = any("calibration" in x for x in r.notes)
            except PlanError as e:
                row[f"{solver}_objective_ms"] = math.nan
                row[f"{solver}_error"] = e.message[:200]
            row[f"{solver}_time_ms"] = (time.perf_counter() - t) * 1e3
        if "relax" in res and "exact" in res:
            row["gap"] = (res["relax"].objective - res["exact"].objective) / res["exact"].objective
            last = res["relax"].last_iterate_objective
            row["last_iterate_worse"] = bool(last is not None and last > res["relax"].objective * (1 + 1e-9))
        row["relax_infeasible_exact_feasible"] = int("relax" not in res and "exact" in res) + int(
            row.get("relax_infeasible_exact_feasible", 0) or 0)
        if mode == "prima" and "relax" in res:
            base = res["relax"]
            row["tpot_prima_ms"] = predict_tpot(base.plan, model, cluster, variant="paper", comm=True) * 1e3
            for name, kw in (("comm", {"comm": True}), ("general", {"general": True}),
                             ("global", {"global_opt": True}), ("global_comm", {"global_opt": True, "comm": True})):
                try:
                    alt = halda(model, cluster, n_ctx=n_ctx, **kw)  # type: ignore[arg-type]
                    row[f"tpot_{name}_ms"] = predict_tpot(alt.plan, model, cluster, variant="paper", comm=True) * 1e3
                except PlanError:
                    row[f"tpot_{name}_ms"] = math.nan
        journal.add({"key": key, "seconds": time.time() - t_inst, "row": row})
        if (i + 1) % 50 == 0:
            print(f"{i + 1}/{n_instances} instances, {time.time() - t_start:.0f} s", file=sys.stderr, flush=True)
    recs = [journal.records[f"seed{seed}/{i}"] for i in range(n_instances)]
    df = pd.DataFrame([r["row"] for r in recs])  # the journal's rows: the same whether resumed or not
    atomic_csv(out / "halda_gap.csv", df)
    atomic_write_text(out / "halda_gap.md", summary(df, seed, sum(r["seconds"] for r in recs)))
    journal.remove()  # the CSV holds every instance now
    return df


def _pct(s: pd.Series, q: float) -> str:
    return f"{np.nanpercentile(s, q) * 100:.4f} %" if len(s.dropna()) else "n/a"


def summary(df: pd.DataFrame, seed: int, seconds: float) -> str:
    both = df.dropna(subset=["gap"])
    g = both["gap"]
    lines = [
        "# Halda: relaxation + rounding vs the exact integer program",
        "",
        f"Reproduce: `python experiments/halda_gap.py --instances {len(df)} --seed {seed} --out experiments/results` "
        f"({seconds / 60:.1f} min on this machine). Data: `halda_gap.csv` (one row per instance).",
        "",
        f"Instances: {len(df)} random clusters of 2-16 devices (primasim.core.synth: Linux/macOS/Android, CUDA/Metal/"
        f"no GPU, disks 0.05-7 GB/s), models {', '.join(sorted(df['model'].unique()))}, q4k/q8_0, n_ctx 512-4096. "
        f"Modes: {dict(df['mode'].value_counts())} (prima = prima.cpp's setting: code variant, no communication).",
        "",
        "## Full Halda (every k, every iteration, device selection): relax vs exact",
        "",
        f"- both solved: {len(both)} instances; both infeasible (Halda refuses: head cannot hold a layer): "
        f"{int((df['relax_objective_ms'].isna() & df['exact_objective_ms'].isna()).sum())}",
        f"- relaxation infeasible where the exact program is feasible: {int(df['relax_infeasible_exact_feasible'].sum())}",
        f"- gap = (relax - exact) / exact: min {g.min() * 100:.2e} %, median {_pct(g, 50)}, p99 {_pct(g, 99)}, "
        f"max {g.max() * 100:.2e} %",
        f"- gap <= 0.5 %: {(g <= 0.005).mean() * 100:.1f} % of instances (target >= 99 %); exactly 0 (to 1e-9): "
        f"{(g.abs() <= 1e-9).mean() * 100:.1f} %",
        f"- relax better than exact (negative gap beyond 1e-9): {int((g < -1e-9).sum())}",
        "",
        "By mode:",
        "",
        "| mode | instances | max gap | gap <= 0.5 % | median relax ms | median exact ms |",
        "|---|---|---|---|---|---|",
    ]
    for mode, sub in both.groupby("mode"):
        lines.append(f"| {mode} | {len(sub)} | {sub['gap'].max() * 100:.2e} % | {(sub['gap'] <= 0.005).mean() * 100:.1f} % | "
                     f"{sub['relax_time_ms'].median():.1f} | {sub['exact_time_ms'].median():.1f} |")
    bg = df["block_gap"].dropna()
    lines += [
        "",
        "## Fixed-k subproblems of the first iteration (same set assignment for both)",
        "",
        f"- blocks solved both ways: {int(df['blocks'].sum())}; feasibility mismatches: "
        f"{int(df['block_feasibility_mismatch'].sum())}",
        f"- best-over-k gap: max {bg.max() * 100:.2e} %; worst single block gap: {df['block_gap_worst'].max() * 100:.2e} %",
        "",
        "Why the gap is zero: for a fixed k and set assignment each device's cost is convex in its window",
        "(the best GPU layer count for a window is an end point of an interval whose ends are linear in",
        "the window), and the only coupling is sum(w) = W. Rounding the LP, repairing the sum and then",
        "exchanging single layers until no exchange helps is therefore optimal (separable convex resource",
        "allocation); the LP gives the start, the infeasibility test and a lower bound.",
        "",
        "## How often prima.cpp's loop itself goes wrong (relax runs)",
        "",
        f"- the memory-ratio fallback split beat the set-assignment loop: {int(df['relax_fallback'].fillna(False).sum())} "
        f"of {int(df['relax_objective_ms'].notna().sum())} instances (returned instead; see primasim.plan.halda)",
        f"- the last iterate (what prima.cpp returns) was worse than the best iterate: "
        f"{int(df['last_iterate_worse'].fillna(False).sum())}",
    ]
    fbk = df[df["relax_fallback"].fillna(False).astype(bool)]
    if len(fbk):
        all_m4 = fbk["relax_loop_sets"].fillna("").map(lambda t: all(x in ("M4", "-") for x in t.split()))
        lines += [
            f"- of those, the loop ended with every device in M4 in {int(all_m4.sum())}: it started from a split "
            "where everything fits, and the \"must fit\" rows never let it overload a device whose disk is fast; "
            f"in {int((~all_m4).sum())} a device stayed locked in an overloaded set (M1-M3), whose \"must overload\" "
            f"row keeps it there; calibration fired in {int(fbk['relax_calibrated'].fillna(False).astype(bool).sum())} of them.",
        ]
    pr = df[df["mode"] == "prima"].dropna(subset=["tpot_prima_ms"])
    if len(pr):
        lines += ["", "## Options beyond prima.cpp, measured against its Halda",
                  "",
                  "TPOT predicted by the fuller cost model (paper variant with per-hop Wi-Fi latency and bandwidth) for",
                  f"the plan of each option, over the {len(pr)} prima.cpp-setting instances; ratio = option / prima.cpp Halda.",
                  "",
                  "| option | geo. mean ratio | better (>1 %) | worse (>1 %) | best ratio |",
                  "|---|---|---|---|---|"]
        for name in ("comm", "general", "global", "global_comm"):
            col = pr[f"tpot_{name}_ms"] / pr["tpot_prima_ms"]
            col = col.dropna()
            lines.append(f"| {name} | {math.exp(np.log(col).mean()):.3f} | {(col < 0.99).mean() * 100:.1f} % | "
                         f"{(col > 1.01).mean() * 100:.1f} % | {col.min():.3f} |")
        lines += ["", "comm: Halda charges each hop's time, so it prefers fewer devices when hops matter. general:",
                  "partial last laps; under a sum-of-times cost model k = 1 already reaches any split, so it only",
                  "matters with a fixed k. global: the exact optimum over all set assignments (DP over devices),",
                  "which escapes the sets the loop can get locked into."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--resume", action="store_true", help="keep the finished instances of a killed run")
    a = ap.parse_args()
    df = run(a.instances, a.seed, a.out, resume=a.resume)
    print((a.out / "halda_gap.md").read_text())
    ok = df["gap"].dropna()
    sys.exit(0 if (ok <= 0.005).mean() >= 0.99 and df["relax_infeasible_exact_feasible"].sum() == 0 else 1)


if __name__ == "__main__":
    main()
