"""`primasim sweep SPEC`: a sweep on a local process pool or a Dask cluster; resumable, Ctrl-C safe."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.table import Table

from primasim.core.errors import SpecError
from primasim.loop.sweep import default_out, knobs_table, load_spec, run_sweep
from primasim.loop.sweep.dryrun import dry_run
from primasim.loop.sweep.executors import make_executor
from primasim.loop.sweep.figures import plot_sweep

from . import HELP
from .output import console as make_console


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help=HELP["sweep"],
                       description="Evaluate every cell of a sweep spec (docs/sweeps.md). Results go to OUT/results/ "
                       "(a Parquet dataset, one file per batch) and OUT/results.csv; re-running the same command "
                       "resumes; Ctrl-C stops cleanly (exit 130).")
    p.add_argument("spec", nargs="?", help="sweep spec TOML (docs/sweeps.md, experiments/sweeps/)")
    p.add_argument("--executor", default="local",
                   help="local (process pool, default), dask://HOST:PORT, or a Dask scheduler file (.json)")
    p.add_argument("--out", help="output folder (default: runs/sweep-<name>); re-running resumes it")
    p.add_argument("--workers", type=int, help="local worker processes (default: CPU count; 1 = in this process)")
    p.add_argument("--batch", type=int, help="cells per task (default: adaptive, about 5 s of work)")
    p.add_argument("--in-flight", type=int, help="tasks in flight (default: 2 per worker slot)")
    p.add_argument("--limit", type=int, help="evaluate at most this many of the missing cells, then stop")
    p.add_argument("--dry-run", action="store_true", help="count the cells and estimate the time from a short "
                   "timed sample; write nothing")
    p.add_argument("--sample-seconds", type=float, default=10.0, help="--dry-run: time spent sampling (default 10)")
    p.add_argument("--no-csv", action="store_true", help="do not write OUT/results.csv (the Parquet dataset only)")
    p.add_argument("--plot", metavar="KNOB", help="also write OUT/plot.png of tpot_ms against KNOB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--log-every", type=float, default=30.0, help="seconds between progress lines when stderr is "
                   "not a terminal (default 30)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the run's summary, or the dry run)")
    p.add_argument("--knobs", action="store_true", help="list the knobs a cell may set, and exit")
    p.set_defaults(func=run)


def _positive(name: str, v: int | float | None) -> None:
    if v is not None and v < 1:
        raise SpecError(f"{name} must be >= 1, got {v}", where=name, fix=f"use {name} 1 or more")


def run(args: argparse.Namespace) -> int:
    console = make_console()
    if args.knobs:
        t = Table("knob", "values", "meaning", title="sweep knobs")
        for row in knobs_table():
            t.add_row(*row)
        console.print(t)
        return 0
    if not args.spec:
        raise SpecError("no spec given", where="sweep", fix="primasim sweep SPEC.toml (see experiments/sweeps/)")
    for name in ("workers", "batch", "in_flight", "limit"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    spec = load_spec(args.spec)
    out = Path(args.out) if args.out else default_out(spec)
    if args.dry_run:
        return _dry(args, spec, out, console)
    res = run_sweep(spec, out, executor=args.executor, workers=args.workers, batch_size=args.batch,
                    in_flight=args.in_flight, progress=not args.no_progress and not args.json, limit=args.limit,
                    csv=not args.no_csv, log_every=args.log_every)
    if args.json:
        print(json.dumps(res.to_json()))
    else:
        total = res.done_before + res.evaluated
        console.print(f"{res.evaluated:,} cells evaluated in {res.wall_s:.1f} s on {res.executor} "
                      f"({res.done_before:,} done before; {total:,} of {res.cells:,} now): {res.feasible:,} feasible, "
                      f"{res.errors:,} errors" + (f", {res.worker_deaths} worker deaths survived" if res.worker_deaths else ""))
        if res.evaluated and res.eval_s > 0:
            console.print(f"cells' own time {res.eval_s:.1f} s; overhead {100 * res.overhead:.1f} % "
                          f"(wall x workers / cells' time - 1), {res.evaluated / max(res.wall_s, 1e-9):,.1f} cells/s")
        console.print(f"results: {out / 'results'}/ (Parquet dataset)"
                      + ("" if args.no_csv or res.interrupted else f", {out / 'results.csv'}"))
    if res.interrupted:
        print(f"primasim sweep: interrupted after {res.done_before + res.evaluated:,} of {res.cells:,} cells; "
              f"run the same command again to resume", file=sys.stderr)
        return 130
    if args.plot:
        plot_sweep(res.results(), args.plot, out=out / "plot.png")
        console.print(f"plot: {out / 'plot.png'}")
    return 0


def _dry(args: argparse.Namespace, spec: object, out: Path, console: object) -> int:
    ex = make_executor(args.executor, args.workers)
    workers = ex.workers
    ex.close()
    rep = dry_run(spec, out, workers=workers, budget_s=args.sample_seconds)  # type: ignore[arg-type]
    if args.json:
        print(json.dumps(rep, default=str))
        return 0
    t = Table(show_header=False, title=f"dry run: {rep['name']} ({rep['evaluate']})")
    t.add_row("cells", f"{rep['cells']:,} in {rep['blocks']} block(s)"
              + (f" + {rep['explicit_cells']} listed" if rep["explicit_cells"] else ""))
    t.add_row("axes", ", ".join(f"{k} x{v}" for k, v in rep["axes"].items()) or "-")
    if rep["sample"]:
        t.add_row("sampled", f"{rep['sample']['method']}, n = {rep['sample']['n']}: "
                  + "; ".join(f"{k} {v}" for k, v in rep["sampled"].items()))
    if rep["generated_clusters"]:
        t.add_row("generated clusters", ", ".join(f"{k} x{v}" for k, v in rep["generated_clusters"].items()))
    t.add_row("already done", f"{rep['done']:,} (in {out})" if rep["done"] else "0")
    t.add_row("to do", f"{rep['todo']:,}")
    if "estimate_s" in rep:
        t.add_row("timed sample", f"{rep['sampled_cells']} random cells here: {1e3 * rep['cell_s_mean']:.1f} ms/cell "
                  f"(± {1e3 * rep['cell_s_sem']:.1f}); "
                  + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in rep["cell_s_by_system"].items()))
        t.add_row("estimate", f"{_hms(rep['estimate_s'])} on {workers} worker(s) "
                  f"({_hms(rep['estimate_s_low'])} - {_hms(rep['estimate_s_high'])}), "
                  f"~{rep['estimate_bytes'] / 1e6:,.1f} MB of Parquet")
        t.add_row("in the sample", f"{rep['feasible_in_sample']} feasible, {rep['errors_in_sample']} errors")
    console.print(t)  # type: ignore[attr-defined]
    return 0


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

