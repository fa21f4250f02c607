"""`primasim plan` for every Table 4 Llama on prima-d1-d4 (q4k): the plan and predicted TPOT of
Halda's default (global) search and of prima.cpp's own loop, next to the paper's prima.cpp TPOT.

    python experiments/plan_table4.py   # -> experiments/results/plan_table4.md
"""

from __future__ import annotations

import csv
from pathlib import Path

from primasim import load_model, make_plan
from primasim.core.cluster import load_cluster
from primasim.core.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["llama3-8b", "llama3-14b", "llama1-30b", "llama3-45b", "llama3-60b", "llama1-65b", "llama3-70b"]


def cell(plan, sets) -> str:  # noqa: ANN001
    parts = []
    for d, s in zip(plan.devices, sets):
        if d.layers:
            parts.append(f"{d.name} {d.layers}({d.gpu_layers})" + (f" {s}" if s not in ("M4", "-") else ""))
    return ", ".join(parts)


def main() -> None:
    with open(ROOT / "data/paper/prima_table4.csv", newline="") as fh:
        paper = {(r["model"], r["system"]): r for r in csv.DictReader(fh)}
    cluster = load_cluster("prima-d1-d4")
    rows = ["| model | Halda (default: global) plan, k = 1 | predicted TPOT ms | prima.cpp's loop: plan | predicted TPOT ms | paper prima.cpp TPOT ms |",
            "|---|---|---|---|---|---|"]
    for name in MODELS:
        m = load_model(name, "q4k")
        out = []
        for mode in ("global", "loop"):
            o = make_plan("prima", m, cluster, planner=mode)
            sets = o.extra.get("halda", {}).get("sets", ["-"] * len(o.plan.devices))
            out.append((f"k={o.plan.k}: " if o.plan.k != 1 else "") + cell(o.plan, sets))
            out.append(f"{o.predicted_tpot * 1e3:.0f}")
        p = paper.get((name, "prima"), {}).get("tpot_ms", "")
        rows.append(f"| {name} | {out[0]} | {out[1]} | {out[2]} | {out[3]} | {p} |")
    text = ("# `primasim plan` on the paper's testbed (Table 4 Llamas, Q4K, prima-d1-d4, head D3)\n\n"
            "`python experiments/plan_table4.py`. Cells: device window(GPU layers) and the set when not M4. "
            "Predicted TPOT: prima.cpp's cost model, paper variant with per-hop communication (a sum of every "
            "device's time, no overlap; the simulator models the overlap).\n\n" + "\n".join(rows) + "\n")
    atomic_write_text(ROOT / "experiments/results/plan_table4.md", text)
    print(text)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
