"""`primasim reproduce NAME`: simulate a table or figure of the seed papers and set it beside the
reported numbers (CSV + PNG); exit 1 when one of the paper's claims does not hold."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from primasim.core.errors import SpecError
from primasim.core.io import atomic_csv, make_dir
from primasim.loop.reproduce import TARGETS, TargetOptions, get_target, reproduce
from primasim.loop.reproduce.framework import error_summary

from . import HELP
from .options import jsonable
from .output import console

DESCRIPTION = """Reproduce a table or figure of prima.cpp, MDI-LLM, Bud or PIPO with the simulator. Writes
<out>/<name>.csv (predicted, paper value, ratio, tolerance), <name>.claims.csv and <name>.png,
prints a short table, and exits 1 if a claim of the paper fails."""  # argparse re-wraps it


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help=HELP["reproduce"],
                       description=DESCRIPTION)
    p.add_argument("name", nargs="?", help="target name, or `all` (see --list)")
    p.add_argument("--list", action="store_true", help="list the targets and exit")
    p.add_argument("--out", default="runs/reproduce", help="output directory (default runs/reproduce)")
    p.add_argument("--json", action="store_true", help="print one JSON object ({\"ok\": ..., \"targets\": [...]} for `all`)")
    p.add_argument("--tokens", type=int, default=16, help="decode tokens per simulation (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        if args.json:
            print(json.dumps([{"name": t.name, "title": t.title, "source": t.source, "tolerance": t.tolerance}
                              for t in TARGETS.values()]))
        else:

            t = Table(title="primasim reproduce targets")
            for col in ("name", "what", "paper"):
                t.add_column(col)
            for tg in TARGETS.values():
                t.add_row(tg.name, tg.title, tg.source)
            console().print(t)
        return 0
    if not args.name:
        raise SpecError("no target given", where="primasim reproduce", fix="name a target or `all` (see --list)")
    if args.tokens < 2:
        raise SpecError(f"--tokens must be >= 2, got {args.tokens}", where="--tokens",
                        fix="use at least 2 tokens (TPOT needs two)")
    names = list(TARGETS) if args.name == "all" else [get_target(args.name).name]
    opts = TargetOptions(tokens=args.tokens, seed=args.seed)
    _check_out(args.out)
    results = []
    for name in names:
        res = reproduce(name, args.out, options=opts)
        results.append(res)
        if not args.json:
            _print(res)
    if args.json:
        objs = [r.to_json() for r in results]
        print(json.dumps(objs[0] if args.name != "all" else {"ok": all(r.ok for r in results), "targets": objs},
                         default=jsonable))
    elif len(results) > 1:
        _summary(results)
    if len(results) > 1:


        atomic_csv(Path(args.out) / "summary.csv", error_summary(results), index=False)
    return 0 if all(r.ok for r in results) else 1


def _check_out(out: str) -> None:
    """Fail early, with the fix, when the output directory cannot be created or written."""

    p = make_dir(out, what="output directory", fix="pass --out with a writable directory")
    if not os.access(p, os.W_OK):
        raise SpecError("the output directory is not writable", where=str(p), fix="pass --out with a writable directory")


def _print(res: Any) -> None:
    con = console()
    status = "[bold green]PASS[/]" if res.ok else "[bold red]FAIL[/]"
    con.print(f"{status} [bold]{res.target}[/]: {res.title} ({res.elapsed_s:.1f} s)")
    df = res.rows
    shown = df[df["paper"].notna()]
    if len(shown) > 24:  # keep the terminal table short; the CSV has every row
        shown = shown[shown["tolerance"] != ""] if (shown["tolerance"] != "").any() else shown
        shown = shown.head(24)
    if not shown.empty:
        t = Table(show_lines=False, pad_edge=False, box=None)
        for col in ("case", "system", "metric", "predicted", "paper", "ratio", "tol", "ok"):
            t.add_column(col, no_wrap=col != "case", overflow="fold")
        for _, r in shown.iterrows():
            w = r["within"]
            mark = "" if w is None or (isinstance(w, float) and math.isnan(w)) else ("[green]yes[/]" if w else "[red]no[/]")
            what = str(r["system"]) + (f" {r['device']}" if r["device"] else "")
            t.add_row(str(r["case"]), what, f"{r['metric']} ({r['unit']})", _f(r["predicted"]), _f(r["paper"]),
                      _f(r["ratio"], ratio=True), str(r["tolerance"] or ""), mark)
        con.print(t)
    held = sum(c.passed for c in res.claims)
    con.print(f"  {held}/{len(res.claims)} claims hold" + (" (failures below; every claim is in the claims CSV)"
                                                            if held < len(res.claims) else ""))
    for c in res.claims:
        if not c.passed or len(res.claims) <= 12:
            mark = "[green]ok[/]  " if c.passed else "[red]FAIL[/]"
            con.print(f"  {mark} {c.text} -- {c.detail}")
    if res.csv is not None:
        con.print(f"  wrote {res.csv}, {res.claims_csv}, {res.png}")


def _f(x: Any, ratio: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    x = float(x)
    if ratio:
        return f"{x:.2f}x"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def _summary(results: list[Any]) -> None:
    errs = error_summary(results)
    t = Table(title="reproduce all (errors: median |predicted / paper - 1| over the cells with a paper number; "
              "in-sample = cells a constant was fitted on)")
    for col in ("target", "result", "claims held", "in-sample cells, err", "out-of-sample cells, err", "seconds"):
        t.add_column(col)
    for r in results:
        held = sum(c.passed for c in r.claims)
        cols = []
        for split in ("in-sample", "out-of-sample"):
            e = errs[(errs["target"] == r.target) & (errs["split"] == split)]
            cols.append("-" if e.empty else f"{int(e['cells'].iloc[0])}, {e['median_err_pct'].iloc[0]:.0f} %")
        t.add_row(r.target, "[green]PASS[/]" if r.ok else "[red]FAIL[/]", f"{held}/{len(r.claims)}", *cols,
                  f"{r.elapsed_s:.1f}")
    console().print(t)
