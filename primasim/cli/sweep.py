"""`primasim sweep SPEC`: a grid of cells on a local process pool or a Dask cluster, resumable."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a parameter sweep (TOML spec) locally or on Dask; resumable")
    p.add_argument("spec", help="sweep spec TOML (see primasim/loop/sweep/_legacy.py or experiments/sweeps/)")
    p.add_argument("--executor", default="local", help="local (process pool, default) or dask://HOST:PORT")
    p.add_argument("--out", help="output directory (default: runs/sweep-<name>); re-running resumes it")
    p.add_argument("--workers", type=int, help="local worker processes (default: CPU count)")
    p.add_argument("--plot", metavar="KNOB", help="also write <out>/plot.png of tpot_ms against KNOB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from primasim.loop.sweep._legacy import load_spec, plot_sweep, run_sweep

    spec = load_spec(args.spec)
    out = Path(args.out or f"runs/sweep-{spec.name}")
    df = run_sweep(spec, out, executor=args.executor, workers=args.workers, progress=not args.no_progress)
    n_ok = int(df["feasible"].fillna(False).astype(bool).sum()) if "feasible" in df else 0
    n_err = int((df["error"].fillna("") != "").sum()) if "error" in df else 0
    Console().print(f"{len(df)} cells in {out}/results.csv ({n_ok} feasible, {n_err} errors)")
    if args.plot:
        plot_sweep(df, args.plot, out=out / "plot.png")
        Console().print(f"plot: {out / 'plot.png'}")
    return 0
