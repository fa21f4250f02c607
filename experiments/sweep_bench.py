"""The sweep engine at 100,000 cells: overhead over the cells' own simulation time, memory of the
client and the workers over the run, cells/s, on the local process pool and on Dask (a scheduler
and two workers started as separate processes), with a 1,000,000-cell extrapolation.

    python experiments/sweep_bench.py                    # 100,000 planner-evaluated cells, local then Dask
    python experiments/sweep_bench.py --spec experiments/sweeps/bench_100k.toml   # the same cells simulated
    python experiments/sweep_bench.py --n 10 --out /tmp/b   # 1,000 cells: a smoke run

Results: experiments/results/sweep_bench_<spec>.{md,json,png} (+ _<cells> when not 100,000).

Overhead is measured within each run, so it holds on a shared machine: wall x workers over the sum
of the cells' own wall time (measured inside the workers), minus 1; and in CPU seconds, what the
client and the workers spent outside the cells over the cells' own CPU time (load from other
processes does not enter it). Memory: RSS of the client and of every worker sampled every 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pandas as pd
import psutil

from primasim.core.io import (
    atomic_csv,
    atomic_savefig,
    atomic_write_json,
    atomic_write_text,
    read_journal,
)
from primasim.loop.sweep import load_results, run_sweep, spec_from_dict
from primasim.loop.sweep.executors import stop_process_groups
from primasim.loop.sweep.report import sweep_report
from primasim.loop.sweep.store import Store

HERE = Path(__file__).parent
SPEC = HERE / "sweeps" / "bench_100k_plan.toml"
DASK = str(Path(sys.executable).parent / "dask")
MiB = 2**20


def _uptime() -> str:
    return ", ".join(Path("/proc/loadavg").read_text().split()[:3])


class Sampler(threading.Thread):
    """RSS and CPU time of the client and the workers every `every` s, with the cells done so far."""

    def __init__(self, worker_pids: Any, every: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.worker_pids = worker_pids  # callable -> list of pids
        self.every = every
        self.cells = 0
        self.rows: list[dict[str, float]] = []
        self.halt = threading.Event()
        self.me = psutil.Process()

    def sample(self) -> None:
        row: dict[str, float] = {"t": time.time(), "cells": self.cells, "client_rss": self.me.memory_info().rss,
                                 "client_cpu": sum(self.me.cpu_times()[:2])}
        rss, cpu, n = 0, 0.0, 0
        for pid in self.worker_pids():
            try:
                p = psutil.Process(pid)
                r = p.memory_info().rss
                c = sum(p.cpu_times()[:2])
            except psutil.Error:
                continue
            rss += r
            cpu += c
            n += 1
            row[f"rss_{pid}"] = r
            row[f"cpu_{pid}"] = c
        row.update(workers_rss=rss, workers_cpu=cpu, n_workers=n)
        self.rows.append(row)

    def run(self) -> None:
        while not self.halt.wait(self.every):
            self.sample()

    def stop(self) -> pd.DataFrame:
        self.halt.set()
        self.join()
        self.sample()
        return pd.DataFrame(self.rows)


def _pool_pids() -> list[int]:
    """The local pool's worker processes (children of this process running the spawn entry point)."""
    out = []
    for c in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(c.cmdline()):
                out.append(c.pid)
        except psutil.Error:
            continue
    return out


def _workers_cpu_delta(samples: pd.DataFrame) -> float:
    """CPU seconds the workers spent in the run: a process there at the start counts from then, one
    started during the run (the local pool) for its whole life (start-up is overhead too)."""
    tot = 0.0
    for col in [c for c in samples.columns if c.startswith("cpu_")]:
        s = samples[col]
        last = s.dropna()
        if not len(last):
            continue
        tot += float(last.iloc[-1]) - (float(s.iloc[0]) if pd.notna(s.iloc[0]) else 0.0)
    return tot


def _memory(samples: pd.DataFrame, cells: int, first: bool = True) -> dict[str, Any]:
    """RSS at fractions of the run, and its growth per cell: median RSS over the last fifth of the
    run minus the median over 10-30 %, divided by the cells in between (robust to sampling noise)."""
    out: dict[str, Any] = {}
    for who in ("client_rss", "workers_rss"):
        s = samples[(samples["cells"] > 0) & ((samples["n_workers"] > 0) if who == "workers_rss" else True)]
        at = {}
        for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
            if not first and len(s) and frac * cells < s["cells"].min() - 1000:
                continue  # before the samples began
            row = s[s["cells"] >= frac * cells].head(1)
            if not len(row) and frac == 1.0:
                row = s.tail(1)
            if len(row):
                at[f"{int(frac * 100)}%"] = round(float(row[who].iloc[0]) / MiB, 1)
        lo = 0 if first or not len(s) else int(s["cells"].min())  # samples from outside may start mid-run
        early = s[(s["cells"] >= lo + 0.1 * (cells - lo)) & (s["cells"] <= lo + 0.3 * (cells - lo))]
        late = s[s["cells"] >= lo + 0.8 * (cells - lo)]
        slope = 0.0
        if len(early) and len(late) and late["cells"].median() > early["cells"].median():
            slope = float((late[who].median() - early[who].median()) / (late["cells"].median() - early["cells"].median()))
        out[who] = {"MiB_at": at, "peak_MiB": round(float(s[who].max()) / MiB, 1) if len(s) else None,
                    "slope_bytes_per_cell": round(slope, 2)}
    return out


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def run_one(spec: Any, out: Path, executor: str, worker_pids: Any, workers: int) -> dict[str, Any]:
    sampler = Sampler(worker_pids)

    def on_batch(run: Any, res: Any) -> None:
        sampler.cells = run.evaluated

    load0 = _uptime()
    sampler.sample()
    sampler.start()
    run = run_sweep(spec, out, executor=executor, workers=workers, progress=False, on_batch=on_batch)
    samples = sampler.stop()
    load1 = _uptime()
    rec = run.to_json()
    wcpu = _workers_cpu_delta(samples)
    cells_cpu = run.cpu_s
    rec.update(load_before=load0, load_after=load1, cells_per_s=run.evaluated / run.wall_s,
               overhead_wall=run.overhead, overhead_dispatch=run.dispatch_s * run.workers / run.eval_s - 1,
               workers_cpu_s=wcpu, overhead_cpu=(run.client_cpu_s + wcpu - cells_cpu) / cells_cpu if cells_cpu else None,
               client_cpu_share=run.client_cpu_s / cells_cpu if cells_cpu else None,
               memory=_memory(samples, run.evaluated), results_bytes=_dir_bytes(out / "results"),
               journal_bytes=(out / "journal.jsonl").stat().st_size, parts=len(list((out / "results").iterdir())),
               csv_bytes=(out / "results.csv").stat().st_size if (out / "results.csv").exists() else 0)
    measure_folder(rec, spec, out)
    samples.to_csv(out / "samples.csv", index=False)
    return rec


def measure_folder(rec: dict[str, Any], spec: Any, out: Path) -> None:
    """What a folder of this size costs to resume, read and report: measured here, linear in cells."""
    t = time.perf_counter()
    st = Store(out, spec)
    st.done_mask()
    st.close()
    rec["resume_scan_s"] = time.perf_counter() - t
    t = time.perf_counter()
    df = load_results(out)
    rec["load_all_s"] = time.perf_counter() - t
    rec["pandas_bytes_per_row"] = float(df.memory_usage(deep=True).sum() / len(df))
    t = time.perf_counter()
    load_results(out, columns=["tpot_ms"], filter=None)
    rec["load_one_column_s"] = time.perf_counter() - t
    t = time.perf_counter()
    sweep_report(out, report_dir=out / "report", figures=False)
    rec["report_tables_s"] = time.perf_counter() - t  # grows with cells
    t = time.perf_counter()
    sweep_report(out, report_dir=out / "report")
    rec["report_s"] = time.perf_counter() - t
    rec["report_figures_s"] = max(0.0, rec["report_s"] - rec["report_tables_s"])  # fixed-size figures


def analyse(spec: Any, folder: Path, executor: str, samples_csv: Path | None, loads: tuple[str, str]) -> dict[str, Any]:
    """A run's figures after the fact, from its folder (the run record in runs.jsonl, the journal) and
    memory samples taken from outside (/tmp-style `t,cells,client_rss,workers_rss,n_workers,...` CSV),
    for runs whose benchmark process did not live to write them."""
    rec = next(r for r in reversed(read_journal(folder / "runs.jsonl")) if "evaluated" in r and r["run"] == 0)
    rec.pop("batch_size", None)
    cells_cpu = rec["cpu_s"]
    samples = pd.read_csv(samples_csv) if samples_csv else None
    if samples is not None:  # up to the end of the sweep (not the benchmark's measurements after it)
        samples = samples[(samples["t"] <= rec["t"]) & (samples["n_workers"] > 0)]  # the sweep, not the CSV
    nan_mem = {"MiB_at": {}, "peak_MiB": float("nan"), "slope_bytes_per_cell": float("nan")}
    rec.update(load_before=loads[0], load_after=loads[1], cells_per_s=rec["evaluated"] / rec["wall_s"],
               overhead_wall=rec["wall_s"] * rec["workers"] / rec["eval_s"] - 1,
               overhead_dispatch=rec["dispatch_s"] * rec["workers"] / rec["eval_s"] - 1,
               in_task_wall=rec["task_s"] / rec["eval_s"] - 1,
               overhead_cpu=(rec["client_cpu_s"] + rec["task_cpu_s"] - cells_cpu) / cells_cpu,
               overhead_cpu_note="client + whole tasks (not the pool's traffic outside tasks)",
               client_cpu_share=rec["client_cpu_s"] / cells_cpu,
               memory=_memory(samples, rec["evaluated"], first=False) if samples is not None else
               {"client_rss": nan_mem, "workers_rss": nan_mem},
               memory_sampled_from_cells=int(samples["cells"].min()) if samples is not None else None,
               results_bytes=_dir_bytes(folder / "results"), journal_bytes=(folder / "journal.jsonl").stat().st_size,
               parts=len(list((folder / "results").iterdir())),
               csv_bytes=(folder / "results.csv").stat().st_size if (folder / "results.csv").exists() else 0)
    rec["executor"] = rec["executor"].replace("dask://", "dask at ")
    measure_folder(rec, spec, folder)
    if samples is not None:
        samples.to_csv(folder / "samples.csv", index=False)
    return rec


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def dask_cluster(tmp: Path, n: int) -> tuple[str, list[subprocess.Popen]]:
    from distributed import Client

    sf = tmp / "scheduler.json"
    procs = [_start([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                     "--scheduler-file", str(sf)], tmp / "scheduler.log")]
    while not sf.exists():
        time.sleep(0.1)
    address = json.loads(sf.read_text())["address"]
    procs += [_start([DASK, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-nanny", "--no-dashboard"],
                     tmp / f"worker{i}.log") for i in range(n)]
    with Client(address, timeout="30s") as c:
        c.wait_for_workers(n, timeout=300)
    return address, procs


def figure(samples: dict[str, pd.DataFrame], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for name, s in samples.items():
        s = s[s["cells"] > 0]
        w = s[s["n_workers"] > 0]  # the local pool is gone in the last sample
        axes[0].plot(s["cells"], s["client_rss"] / MiB, label=f"{name}: client")
        axes[0].plot(w["cells"], w["workers_rss"] / MiB, "--", label=f"{name}: workers (sum)")
        el = s["t"] - s["t"].iloc[0]
        rate = s["cells"].diff() / el.diff()
        axes[1].plot(s["cells"], rate.rolling(10, min_periods=1).mean(), label=name)
    axes[0].set(xlabel="cells done", ylabel="RSS (MiB)", title="memory over the run")
    axes[1].set(xlabel="cells done", ylabel="cells/s (20 s rolling)", title="throughput over the run")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    atomic_savefig(fig, path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=SPEC, help="the benchmark's spec (default: %(default)s)")
    ap.add_argument("--n", type=int, help="sample points per grid cell (default: the spec's 1,000 -> 100,000 cells)")
    ap.add_argument("--executors", default="local,dask")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", default=str(HERE / "results"), help="where sweep_bench.{json,md,png} go")
    ap.add_argument("--keep", help="keep the sweeps' folders here (default: a temporary folder)")
    ap.add_argument("--analyse", metavar="K", help="figures after the fact from K/{local,dask}/runs/* (run records, "
                    "journals), K/<executor>_ext_samples.csv (memory sampled from outside) and K/loads.json")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                    help="combine the reports of runs made side by side (each with --keep) into one, in --out")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, Path(args.out))
        return
    if args.analyse:
        spec_path = args.spec.resolve()
        rel = str(spec_path.relative_to(HERE.parent))
        spec = spec_from_dict(tomllib.loads(spec_path.read_text()), where=rel, source=spec_path.read_text())
        k = Path(args.analyse)
        loads = json.loads((k / "loads.json").read_text())
        report = {"cells": len(spec), "spec": rel, "evaluate": spec.evaluate, "cpus": os.cpu_count(),
                  "workers": args.workers, "runs": {}, "side_by_side": True, "analysed_after": True,
                  "command": loads["command"], "notes": loads.get("notes", []), "suffix": "_" + spec_path.stem.replace("bench_100k", "").strip("_")}
        folders = {}
        for ex in ("local", "dask"):
            folders[ex] = k / ex / "runs" / ex
            csv = k / f"{ex}_ext_samples.csv"
            report["runs"][ex] = analyse(spec, folders[ex], ex, csv if csv.exists() else None, tuple(loads[ex]))
        compare(report, folders)
        samples = {ex: pd.read_csv(f / "samples.csv") for ex, f in folders.items() if (f / "samples.csv").exists()}
        write(report, samples, Path(args.out))
        return
    spec_path = args.spec.resolve()
    raw = tomllib.loads(spec_path.read_text())
    if args.n:
        raw["sample"]["n"] = args.n
    rel = str(spec_path.relative_to(HERE.parent)) if spec_path.is_relative_to(HERE.parent) else str(spec_path)
    spec = spec_from_dict(raw, where=rel, source=spec_path.read_text())
    cmd = "python experiments/sweep_bench.py" + ("" if spec_path == SPEC else f" --spec {rel}") + (
        f" --n {args.n}" if args.n else "") + (f" --executors {args.executors}" if args.executors != "local,dask" else "")
    report: dict[str, Any] = {"cells": len(spec), "spec": rel, "evaluate": spec.evaluate, "command": cmd,
                              "cpus": os.cpu_count(), "workers": args.workers, "runs": {}}
    samples = {}
    with tempfile.TemporaryDirectory() as tmpd:
        base = Path(args.keep) if args.keep else Path(tmpd)
        base.mkdir(parents=True, exist_ok=True)
        for ex in args.executors.split(","):
            out = base / ex
            print(f"{ex}: {len(spec):,} cells ...", flush=True)
            if ex == "local":
                report["runs"][ex] = run_one(spec, out, "local", _pool_pids, args.workers)
            else:
                address, procs = dask_cluster(base, args.workers)
                try:
                    pids = [p.pid for p in procs[1:]]
                    report["runs"][ex] = run_one(spec, out, "dask://" + address.split("://")[1], lambda p=pids: p,
                                                 args.workers)
                finally:
                    stop_process_groups(procs)
            samples[ex] = pd.read_csv(out / "samples.csv")
            r = report["runs"][ex]
            print(f"{ex}: {r['evaluated']:,} cells in {r['wall_s']:.0f} s, {r['cells_per_s']:.1f} cells/s, overhead "
                  f"{100 * r['overhead_wall']:.1f} % (wall), {100 * r['overhead_cpu']:.1f} % (CPU)", flush=True)
        compare(report, {ex: base / ex for ex in report["runs"]})
    report["suffix"] = ("" if spec_path.stem == "bench_100k" else "_" + spec_path.stem.replace("bench_100k", "").strip("_")
                        ) + ("" if len(spec) == 100_000 else f"_{len(spec)}")
    write(report, samples, Path(args.out))


def compare(report: dict[str, Any], folders: dict[str, Path]) -> None:
    """The executors' results must be identical, cell by cell, and every cell there once."""
    if {"local", "dask"} <= set(folders):
        cols = ["cell_id", "feasible", "tpot_ms", "ttft_ms", "plan", "error"]
        a = load_results(folders["local"], columns=cols).set_index("cell_id").sort_index()
        b = load_results(folders["dask"], columns=cols).set_index("cell_id").sort_index()
        report["local_equals_dask"] = bool(a.equals(b))
        report["unique_cells"] = bool(a.index.is_unique and b.index.is_unique and len(a) == len(b) == report["cells"])
    first = next(iter(report["runs"].values()))
    report["feasible_cells"], report["error_cells"] = first["feasible"], first["errors"]


def write(report: dict[str, Any], samples: dict[str, pd.DataFrame], out: Path) -> None:
    suffix = report["suffix"]
    report["extrapolation_1M"] = extrapolate(report)
    atomic_write_json(out / f"sweep_bench{suffix}.json", report, indent=2)
    figure(samples, out / f"sweep_bench{suffix}.png")
    md = markdown(report, suffix)
    atomic_write_text(out / f"sweep_bench{suffix}.md", md)
    atomic_csv(out / f"sweep_bench{suffix}_runs.csv", pd.DataFrame(
        [{"executor": k, **{kk: vv for kk, vv in v.items() if not isinstance(vv, dict | list)}}
         for k, v in report["runs"].items()]))
    print(md)


def merge(paths: list[Path], out: Path) -> None:
    """One report from runs made by separate invocations at the same time (`--executors local` and
    `--executors dask` side by side, with --keep): they saw the same load."""
    reps = [json.loads(p.read_text()) for p in paths]
    cmds = [r["command"] + "".join((f" --executors {ex}" if "--executors" not in r["command"] else "")
                                   + f" --keep K/{ex}/runs --out K/{ex}" for ex in r["runs"]) for r in reps]
    report = {**reps[0], "runs": {}, "side_by_side": True,
              "command": " & ".join(cmds) + "; python experiments/sweep_bench.py --merge "
              + " ".join(f"K/{ex}/{p.name}" for r, p in zip(reps, paths) for ex in r["runs"])}
    if "suffix" not in report:
        stem = Path(report["spec"]).stem
        report["suffix"] = ("" if stem == "bench_100k" else "_" + stem.replace("bench_100k", "").strip("_")) + (
            "" if report["cells"] == 100_000 else f"_{report['cells']}")
    for r in reps:
        report["runs"].update(r["runs"])
    folders = {ex: Path(r["out"]) for ex, r in report["runs"].items()}
    compare(report, folders)
    write(report, {ex: pd.read_csv(f / "samples.csv") for ex, f in folders.items()}, out)


def extrapolate(report: dict[str, Any]) -> dict[str, Any]:
    """1,000,000 cells from the measured rates: everything scales with cells (no step is superlinear)."""
    n = report["cells"]
    k = 1_000_000 / n
    out = {}
    for ex, r in report["runs"].items():
        mem = r["memory"]
        out[ex] = {
            "wall_h": r["wall_s"] * k / 3600,
            "client_rss_MiB": mem["client_rss"]["peak_MiB"] + max(0.0, mem["client_rss"]["slope_bytes_per_cell"])
            * (1_000_000 - n) / MiB,
            "workers_rss_MiB": mem["workers_rss"]["peak_MiB"] + max(0.0, mem["workers_rss"]["slope_bytes_per_cell"])
            * (1_000_000 - n) / MiB,
            "results_GB": r["results_bytes"] * k / 1e9, "csv_GB": r["csv_bytes"] * k / 1e9,
            "journal_MB": r["journal_bytes"] * k / 1e6, "parts": int(r["parts"] * k),
            "resume_scan_s": r["resume_scan_s"] * k, "load_all_s": r["load_all_s"] * k,
            "load_all_GiB_in_pandas": r["pandas_bytes_per_row"] * 1_000_000 / 2**30,
            "report_s": r["report_tables_s"] * k + r["report_figures_s"],
            "done_mask_MB": 1.0,  # one byte per cell
        }
    return out


def markdown(rep: dict[str, Any], suffix: str) -> str:
    runs = rep["runs"]
    names = list(runs)
    lines = [f"# Sweep engine at {rep['cells']:,} cells: overhead, memory, cells/s", "",
             f"`{rep['command']}` over `{rep['spec']}` ({rep['cells']:,} cells, evaluate = {rep['evaluate']}; "
             f"{rep['workers']} workers on {rep['cpus']} CPUs "
             "shared with other users; load averages beside each run)."
             + (" The executors ran side by side (two processes, K a scratch folder), so they saw the same "
                "load; each measures its overhead within its own run." if rep.get("side_by_side") else ""), "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label: str, f: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(f(runs[n]) for n in names) + " |")

    row("executor", lambda r: r["executor"])
    row("load average (1, 5, 15 min) before / after", lambda r: f"{r['load_before']} / {r['load_after']}")
    row("cells evaluated", lambda r: f"{r['evaluated']:,} in {r['batches']:,} batches")
    row("wall time", lambda r: f"{r['wall_s']:,.0f} s")
    row("cells/s", lambda r: f"{r['cells_per_s']:.1f}")
    row("cells' own time (sum, inside the workers)", lambda r: f"{r['eval_s']:,.0f} s wall, {r['cpu_s']:,.0f} s CPU")
    row("**overhead**: wall x workers / cells' time - 1", lambda r: f"**{100 * r['overhead_wall']:.1f} %**")
    row("overhead in CPU: (client + workers - cells) / cells", lambda r: f"{100 * r['overhead_cpu']:.1f} %")
    row("client CPU / cells' CPU", lambda r: f"{100 * r['client_cpu_share']:.2f} %")
    row("client RSS at 10 / 50 / 100 % (MiB)", lambda r: " / ".join(
        str(r["memory"]["client_rss"]["MiB_at"].get(k, "-")) for k in ("10%", "50%", "100%")))
    row("client RSS slope (bytes per cell)", lambda r: f"{r['memory']['client_rss']['slope_bytes_per_cell']:.1f}")
    row("workers' RSS at 10 / 50 / 100 % (MiB, sum)", lambda r: " / ".join(
        str(r["memory"]["workers_rss"]["MiB_at"].get(k, "-")) for k in ("10%", "50%", "100%")))
    row("workers' RSS slope (bytes per cell)", lambda r: f"{r['memory']['workers_rss']['slope_bytes_per_cell']:.1f}")
    row("results: Parquet parts / bytes / CSV", lambda r: f"{r['parts']} / {r['results_bytes'] / 1e6:.1f} MB / "
        f"{r['csv_bytes'] / 1e6:.1f} MB")
    row("resume scan / load all / sweep-report (tables + figures)", lambda r: f"{r['resume_scan_s']:.2f} s / "
        f"{r['load_all_s']:.1f} s / {r['report_tables_s']:.1f} + {r['report_figures_s']:.1f} s")
    if "local_equals_dask" in rep:
        lines += ["", f"Local and Dask results identical (feasible, TPOT, TTFT, plan, error per cell id): "
                  f"**{rep['local_equals_dask']}**; every cell exactly once: {rep['unique_cells']}. "
                  f"Feasible cells {rep['feasible_cells']:,}, cell errors {rep['error_cells']:,}."]
    for note in rep.get("notes", []):
        lines += ["", note]
    lines += ["", "## 1,000,000 cells, extrapolated from these rates", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    ext = rep["extrapolation_1M"]
    for label, key, fmt in (("wall time (h)", "wall_h", "{:.1f}"), ("client RSS (MiB)", "client_rss_MiB", "{:.0f}"),
                            ("workers' RSS (MiB)", "workers_rss_MiB", "{:.0f}"), ("Parquet (GB)", "results_GB", "{:.2f}"),
                            ("CSV (GB)", "csv_GB", "{:.2f}"), ("journal (MB)", "journal_MB", "{:.1f}"),
                            ("parts", "parts", "{:,}"), ("resume scan (s)", "resume_scan_s", "{:.1f}"),
                            ("load everything (s / GiB in pandas)", "load_all_s", "{:.0f}"),
                            ("sweep-report (s; tables linear, figures fixed)", "report_s", "{:.0f}")):
        vals = []
        for n in names:
            v = fmt.format(ext[n][key])
            if key == "load_all_s":
                v += f" / {ext[n]['load_all_GiB_in_pandas']:.1f}"
            vals.append(v)
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    lines += ["", "RSS is extrapolated as peak + max(0, measured slope) x 900,000 more cells; the client keeps one "
              "byte per cell (the done mask) and bounded batches in flight, the workers only the context. "
              "Everything else (parts, journal lines, CSV, report) grows linearly.", "",
              f"![memory and throughput](sweep_bench{suffix}.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
