"""`primasim sweep-report DIR`: tables and figures of a finished (or partial) sweep, beside its data."""

from __future__ import annotations

import argparse
import json

from primasim.loop.sweep.report import sweep_report

from . import HELP
from .output import console


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep-report", help=HELP["sweep-report"],
                       description="Reads DIR/results/ (the Parquet dataset `primasim sweep` writes) and writes "
                       "CSV tables, PNG figures and README.md to DIR/report/.")
    p.add_argument("dir", help="the sweep's --out folder")
    p.add_argument("--metric", default="tpot_ms", help="tpot_ms (default), ttft_ms, tpot_p90_ms, throughput_tok_s "
                   "(higher is better) or max_memory_pressure")
    p.add_argument("--baseline", help="system the speed-ups are against (default: llama.cpp if swept)")
    p.add_argument("--focus", help="system of the speed-up heatmap (default: prima if swept)")
    p.add_argument("--x", help="numeric knob along the x axis (default: the one with most values); a result "
                   "column such as cluster_ram_gib also works")
    p.add_argument("--y", help="second numeric knob (heatmaps' y axis)")
    p.add_argument("--facet", help="knob with one panel per value (default: model)")
    p.add_argument("--where", help="only rows a pandas query selects, e.g. \"cluster == 'prima-d1-d4'\"")
    p.add_argument("--report-dir", help="where to write (default: DIR/report)")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.add_argument("--json", action="store_true", help="print a JSON summary (systems table and file paths)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rep = sweep_report(args.dir, metric=args.metric, baseline=args.baseline, focus=args.focus, x=args.x, y=args.y,
                       facet=args.facet, report_dir=args.report_dir, figures=not args.no_figures, where=args.where)
    if args.json:
        print(json.dumps({"report": str(rep.out), "metric": rep.metric, "scenario_keys": rep.scenario_keys,
                          "systems": rep.tables["systems"].to_dict(orient="records"),
                          "tables": {k: str(rep.out / f"{k}.csv") for k in rep.tables},
                          "figures": {k: str(v) for k, v in rep.figures.items()}, "notes": rep.notes}, default=str))
        return 0
    c = console()
    c.print(rep.tables["systems"].to_string(index=False))
    for n in rep.notes:
        c.print(n)
    c.print(f"report: {rep.out / 'README.md'} ({len(rep.tables)} tables, {len(rep.figures)} figures)")
    return 0
