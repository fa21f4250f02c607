"""Does planning with the simulator of primasim's runtime as the objective pick faster plans than Halda?

On the profiled clusters of the fidelity experiment (experiments/results/fidelity_cluster_*.toml),
plan with Halda (the default) and with `planner=sim, sim_runtime=true` (local search from Halda's
plan -- windows, GPU layers, laps, device drops, prefetch -- every move judged by simulating the
plan as the runtime executes it; primasim.sim.sim_plan), then run both plans on the emulated
cluster and compare the measured TPOT. Needs root for the emulation (runs degraded otherwise, and
says so).

    sudo .venv/bin/python experiments/sim_planner_runtime.py       # ~5 min
    sudo .venv/bin/python experiments/sim_planner_runtime.py --resume   # after a kill: the missing clusters
    python experiments/sim_planner_runtime.py --report             # re-render the table from the CSV

Writes experiments/results/sim_planner_runtime.{md,csv} (atomically, primasim.core.io). Each cluster's
two measured plans are appended to sim_planner_runtime_runs.jsonl as one fsync'd line when they
are done, so a killed run loses at most the cluster in flight; `--resume` skips the journal's
clusters (without it a run starts afresh, keeping the old journal as .prev). The journal is
deleted once the CSV and the table are written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity as F  # noqa: E402

from primasim import make_plan  # noqa: E402
from primasim.core.cluster import load_cluster  # noqa: E402
from primasim.core.io import Journal, atomic_csv, atomic_write_text  # noqa: E402
from primasim.core.model_sources import load_model
from primasim.core.runtime_facts import runtime_model  # noqa: E402
from primasim.loop.validate import measure, predict, prompt_ids  # noqa: E402

CASES = [("short", ("desktop", "laptop", "tablet", "phone")), ("short", ("desktop", "laptop", "tablet")),
         ("short", ("desktop", "laptop")), ("rich", ("desktop", "laptop", "tablet", "phone")),
         ("bw", ("desktop", "laptop", "tablet"))]


def main(resume: bool = False, repeats: int = 3, clusters: list[str] | None = None) -> int:
    import pandas as pd

    from primasim.core.trace import metrics
    from primasim.runtime.head import cached_random_weights

    t0 = time.time()
    base = load_model(F.MODEL, "f32")
    model = runtime_model(base)
    weights = cached_random_weights(base)
    journal = Journal(OUT.with_name(OUT.name + "_runs.jsonl"), "cluster", resume=resume)
    if resume:
        print(f"resuming: {len(journal)} clusters already in {journal.path}", flush=True)
    cases = [(v, d) for v, d in CASES if clusters is None or f"{v}-{len(d)}" in clusters]
    for var, devs in cases:
        case = f"{var}-{len(devs)}"
        if case in journal:
            continue
        rows = []
        prof = load_cluster(F.RESULTS / f"fidelity_cluster_{var}.toml")
        prof = prof.subset(list(devs)) if len(devs) < len(prof.devices) else prof
        emu = F.variant(var)
        emu = emu.subset(list(devs)) if len(devs) < len(emu.devices) else emu
        plans = {"halda (global)": make_plan("prima", model, prof, n_ctx=F.N_CTX, prompt_tokens=F.PROMPT).plan}
        t = time.time()
        sim = make_plan("prima", model, prof, n_ctx=F.N_CTX, prompt_tokens=F.PROMPT, planner="sim", sim_runtime=True)
        plan_s = time.time() - t
        plans["planner=sim, sim_runtime"] = sim.plan
        runs: dict[str, list[float]] = {label: [] for label in plans}
        others: dict[str, list[float]] = {label: [] for label in plans}
        for rep in range(repeats):  # the two plans alternate, so the host's load drifts over both alike
            for label, plan in plans.items():
                run, host = measure(plan, weights, emu, tokens=F.TOKENS, prompt=prompt_ids(F.PROMPT, base.vocab),
                                    timeout=300)
                runs[label].append(metrics(run.trace).tpot_ms)
                others[label].append(host.foreign_share)
                print(f"{case} run {rep + 1}/{repeats} {label}: {runs[label][-1]:.0f} ms", flush=True)
        for label, plan in plans.items():
            pred = predict(plan, base, prof, tokens=F.TOKENS, prompt_tokens=F.PROMPT).metrics.tpot_ms
            meas = statistics.median(runs[label])
            rows.append({"cluster": case, "planner": label, "plan": plan.describe(),
                         "prefetch": plan.prefetch, "predicted_tpot_ms": pred, "measured_tpot_ms": meas,
                         "measured_runs_ms": " ".join(f"{x:.1f}" for x in runs[label]),
                         "others_cpu": statistics.median(others[label]), "load1": os.getloadavg()[0],
                         "nice": os.nice(0),
                         "planning_s": plan_s if label.startswith("planner=sim") else float("nan"),
                         "source": (f"{len(sim.extra['sim_planner']['moves'])} moves, "
                                    f"{sim.extra['sim_planner']['evaluations']} simulations"
                                    if label.startswith("planner=sim") else "")})
            print(f"{var}-{len(devs)} {label}: {plan.describe()} prefetch={plan.prefetch} "
                  f"predicted {pred:.0f} ms, measured {meas:.0f} ms", flush=True)
        journal.add({"cluster": case, "minutes": (time.time() - t0) / 60, "rows": rows})
        t0 = time.time()
    recs = [journal.records[f"{var}-{len(devs)}"] for var, devs in cases]
    df = pd.DataFrame([r for rec in recs for r in rec["rows"]])
    atomic_csv(OUT.with_suffix(".csv"), df, float_format="%.4g")
    report(df, f"`python experiments/sim_planner_runtime.py` -- {time.strftime('%Y-%m-%d %H:%M')}, "
               f"{sum(r['minutes'] for r in recs):.0f} min")
    journal.remove()
    return 0


OUT = F.RESULTS / "sim_planner_runtime"


def report(df: Any, how: str) -> None:
    lines = ["# Planning by simulating the runtime vs Halda (measured on the emulated cluster)", "",
             f"{how}. Model {F.MODEL}, prompt {F.PROMPT}, {F.TOKENS} tokens; clusters profiled by "
             "experiments/fidelity.py. Where both planners return the same plan, the two measurements "
             "differ only by the host's run-to-run noise."
             + (" Measured = the median of the runs in brackets (the two plans alternate); 1-minute load "
                f"{df['load1'].min():.1f}-{df['load1'].max():.1f} on this shared 2-core host"
                + (f", run at niceness {int(df['nice'].iloc[0])} so the emulated devices get their CPU quota"
                   if "nice" in df and df["nice"].iloc[0] else "") + "."
                if "measured_runs_ms" in df else ""), "",
             "| cluster | Halda plan | predicted / measured ms | planner=sim, sim_runtime plan (source) | "
             "predicted / measured ms | measured speed-up |", "|---|---|---|---|---|---|"]
    def ms(r: Any) -> str:
        runs = r.get("measured_runs_ms")
        return f"{r['measured_tpot_ms']:.0f}" + (f" ({', '.join(str(runs).split())})" if isinstance(runs, str) else "")

    for c, g in df.groupby("cluster", sort=False):
        h, s = g.iloc[0], g.iloc[1]
        same = h["plan"] == s["plan"] and bool(h["prefetch"]) == bool(s["prefetch"])
        lines.append(f"| {c} | {h['plan']} (prefetch {'on' if h['prefetch'] else 'off'}) | "
                     f"{h['predicted_tpot_ms']:.0f} / {ms(h)} | "
                     + ("the same plan" if same else f"{s['plan']} (prefetch {'on' if s['prefetch'] else 'off'}; "
                        f"{s['source']})")
                     + f" | {s['predicted_tpot_ms']:.0f} / {ms(s)} | "
                     + (f"(same plan: {h['measured_tpot_ms'] / s['measured_tpot_ms']:.2f}x is noise) |" if same else
                        f"**{h['measured_tpot_ms'] / s['measured_tpot_ms']:.2f}x** |"))
    atomic_write_text(OUT.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="store_true", help="no runs: re-render the table from the committed CSV")
    ap.add_argument("--resume", action="store_true", help="keep the clusters of a killed run, run the rest")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each plan, alternating; the median is reported")
    ap.add_argument("--clusters", help="comma-separated cases to run (default all: "
                    + ", ".join(f"{v}-{len(d)}" for v, d in CASES) + ")")
    ap.add_argument("--nice", type=int, default=-5,
                    help="niceness of this process and the emulated devices it starts (-5, as root: on a shared host "
                         "the emulated devices then get their CPU quota; 0 leaves it)")
    args = ap.parse_args()
    if args.report:
        import pandas as pd

        report(pd.read_csv(OUT.with_suffix(".csv")),
               "`python experiments/sim_planner_runtime.py` -- 2026-11-22 09:01, 4 min (table re-rendered "
               "with `--report`)")
        sys.exit(0)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.nice:
        try:
            os.nice(args.nice)
        except PermissionError:
            print(f"--nice {args.nice} needs root; running at niceness {os.nice(0)}", file=sys.stderr)
    names = None if args.clusters is None else [c.strip() for c in args.clusters.split(",") if c.strip()]
    known = [f"{v}-{len(d)}" for v, d in CASES]
    if names is not None and (not names or any(n not in known for n in names)):
        ap.error(f"--clusters: pick from {', '.join(known)}")
    sys.exit(main(resume=args.resume, repeats=args.repeats, clusters=names))
