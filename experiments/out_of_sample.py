"""Leave-one-figure-out: fit the simulator's constants on some of the papers' figures, predict the rest.

    python experiments/out_of_sample.py [--tokens 8]

Scenarios (primasim/sim/_fitted.py holds every constant, its prior and its cells):
- `priors`: nothing fitted; every constant at its prior (spec sheets and the literature);
- `fit on Table 4`: the constants fitted on Table 4's cells only (the D3 efficiencies on llama.cpp,
  Linux's idle share on llama.cpp's cliff, exo's factor); everything else at its prior;
  predicts Fig. 8, Fig. 10, Fig. 2 and Table 4's prima cells;
- `fit without Table 4`: the constants fitted on the other figures' cells only (Linux's idle share
  on Fig. 8, MDI-LLM's and Bud's on their papers); the D3 efficiencies and exo's factor at their
  priors; predicts Table 4;
- `committed`: the committed fit (every constant on every cell it names).

Reported per scenario and target: cells with a paper number, median and P90 of |predicted / paper
- 1| split into the cells fitted in that scenario and the others, toleranced cells within
tolerance, and the paper's claims that hold. Writes experiments/results/out_of_sample.md and .csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from primasim.core.io import atomic_csv, atomic_write_text
from primasim.loop.reproduce import TargetOptions, reproduce
from primasim.sim import _fitted as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("prima-table4", "prima-device-selection", "prima-halda-vs-heuristics", "prima-k-sweep", "mdi-llm-nodes",
           "bud-batching")


def fit_on(cells_kept: set[F.Cell], tokens: int) -> tuple[dict[str, float], set[F.Cell]]:
    """Fit every constant that has cells in `cells_kept` on those cells only; the rest at priors."""
    values = {n: f.prior for n, f in F.FITTED.items()}
    used: set[F.Cell] = set()
    for group in calibrate.GROUPS:
        cells = tuple(c for n in group for c in F.FITTED[n].cells if c in cells_kept)
        if not cells:
            continue
        with F.override(values):
            values.update(calibrate.fit_group(group, tokens, cells=tuple(dict.fromkeys(cells))))
        used |= set(cells)
    return values, used


def evaluate(values: dict[str, float], fitted_cells: set[F.Cell], tokens: int) -> list[dict]:
    rows = []
    with F.override(values):
        for t in TARGETS:
            res = reproduce(t, None, options=TargetOptions(tokens=tokens))
            df = res.rows[res.rows["paper"].notna() & res.rows["ratio"].notna()]
            for split in ("fitted here", "predicted"):
                keep = [(t, r.case, r.system, r.metric, r.device) in fitted_cells for r in df.itertuples()]
                d = df[np.array(keep) == (split == "fitted here")]
                if d.empty:
                    continue
                err = (d["ratio"].astype(float) - 1).abs()
                tol = d[d["tolerance"].astype(str) != ""]
                rows.append({"target": t, "cells": split, "n": len(d),
                             "median_err_pct": round(100 * float(np.median(err)), 1),
                             "p90_err_pct": round(100 * float(np.percentile(err, 90)), 1),
                             "within_tol": f"{int(tol['within'].astype(bool).sum())}/{len(tol)}" if len(tol) else "-",
                             "claims": f"{sum(c.passed for c in res.claims if c.kind != 'tolerance')}/"
                                       f"{sum(1 for c in res.claims if c.kind != 'tolerance')}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()
    t0 = time.time()
    all_cells = set(F.in_sample_cells())
    t4 = {c for c in all_cells if c[0] == F.T4}
    scenarios = {
        "priors": ({n: f.prior for n, f in F.FITTED.items()}, set()),
        "fit on Table 4": fit_on(t4, args.tokens),
        "fit without Table 4": fit_on(all_cells - t4, args.tokens),
        "committed": ({n: f.value for n, f in F.FITTED.items()}, all_cells),
    }
    out = []
    md = ["# Leave-one-figure-out: fitted on some figures, predicting the others", "",
          f"`python experiments/out_of_sample.py --tokens {args.tokens}` ({f'{0:.0f}'} s; see the docstring "
          "for the scenarios). Errors are |predicted / paper - 1| over the cells with a paper number; "
          "'fitted here' = cells the scenario's constants were fitted on, 'predicted' = all others. "
          "`claims` counts the paper's qualitative claims that hold (orderings, OOMs, crossovers, trends).", ""]
    md += ["| scenario | constants | value |", "|---|---|---|"]
    for name, (vals, _) in scenarios.items():
        md.append(f"| {name} | " + ", ".join(vals) + " | " + ", ".join(f"{v:.3g}" for v in vals.values()) + " |")
    md += ["", "| scenario | target | cells | n | median err | P90 err | within tolerance | claims |",
           "|---|---|---|---|---|---|---|---|"]
    for name, (vals, cells) in scenarios.items():
        for r in evaluate(vals, cells, args.tokens):
            r = {"scenario": name, **r}
            out.append(r)
            md.append(f"| {name} | {r['target']} | {r['cells']} | {r['n']} | {r['median_err_pct']} % | "
                      f"{r['p90_err_pct']} % | {r['within_tol']} | {r['claims']} |")
            print(md[-1], flush=True)
    md[2] = md[2].replace("(0 s;", f"({time.time() - t0:.0f} s;")
    import pandas as pd

    atomic_csv(ROOT / "experiments" / "results" / "out_of_sample.csv", pd.DataFrame(out), index=False)
    atomic_write_text(ROOT / "experiments" / "results" / "out_of_sample.md", "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
