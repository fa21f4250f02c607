"""The study's answer in numbers, from the committed sweep (experiments/studies/wifi_ram/results/):
when does prima.cpp's piped ring beat exo, distributed-llama, MDI-LLM and llama.cpp as the Wi-Fi
gets slower and free RAM shrinks?

    primasim sweep experiments/studies/wifi_ram/spec.toml --out experiments/studies/wifi_ram --no-csv
    primasim sweep-report experiments/studies/wifi_ram
    python experiments/studies/wifi_ram/answer.py      # -> answer.md, answer.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from primasim.core.io import atomic_savefig, atomic_write_text
from primasim.loop.sweep import load_results
from primasim.loop.sweep.figures import plain_log_axis
from primasim.loop.sweep.report import _md, prepare

HERE = Path(__file__).parent
RIVALS = ["exo", "dllama", "mdi-llm"]  # the distributed systems prima.cpp compares itself with
MODELS = ["llama3-8b", "llama3-14b", "llama1-30b", "llama3-70b"]


def wide(per: pd.DataFrame) -> pd.DataFrame:
    w = per.pivot_table(index=["model", "cluster", "bandwidth_mbps", "ram_scale"], columns="system", values="tpot_ms",
                        aggfunc="first", dropna=False).reset_index()
    w["rivals"] = w[RIVALS].min(axis=1)  # the best distributed rival (NaN: all OOM)
    w["where"] = np.where(w["cluster"] == "prima-d1-d4", "paper testbed D1-D4", "generated home clusters")
    return w


def versus_rivals(w: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (where, model), g in w.groupby(["where", "model"], sort=False):
        both = g.dropna(subset=["prima", "rivals"])
        r = both["rivals"] / both["prima"]
        rows.append({"clusters": where, "model": model, "scenarios": len(g),
                     "rivals run": len(both), "only prima runs": int((g["prima"].notna() & g["rivals"].isna()).sum()),
                     "prima faster": int((r > 1.01).sum()),
                     "speed-up geomean": float(np.exp(np.log(r).mean())) if len(r) else np.nan,
                     "speed-up min": float(r.min()) if len(r) else np.nan,
                     "speed-up max": float(r.max()) if len(r) else np.nan})
    return pd.DataFrame(rows)


def rivals_ram(w: pd.DataFrame) -> pd.DataFrame:
    """The smallest ram_scale at which each rival runs, on the paper's testbed."""
    d = w[w["cluster"] == "prima-d1-d4"]
    rows = []
    for model, g in d.groupby("model", sort=False):
        row = {"model": model}
        for s in RIVALS + ["prima", "llama.cpp"]:
            ok = g[g[s].notna()]["ram_scale"]
            row[s] = f">= {ok.min():g}" if len(ok) else "never (OOM)"
        rows.append(row)
    return pd.DataFrame(rows)


def versus_llamacpp(w: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (where, model, ram), g in w.groupby(["where", "model", "ram_scale"], sort=False):
        r = (g["llama.cpp"] / g["prima"]).dropna()
        rows.append({"clusters": where, "model": model, "ram_scale": ram,
                     "prima / llama.cpp speed-up (geomean)": float(np.exp(np.log(r).mean())) if len(r) else np.nan,
                     "prima faster": int((r > 1.01).sum()), "tie (1 %)": int(((r >= 0.99) & (r <= 1.01)).sum()),
                     "prima slower": int((r < 0.99).sum())})
    return pd.DataFrame(rows)


def bandwidth_effect(w: pd.DataFrame) -> pd.DataFrame:
    """TPOT at 5 Mbit/s over TPOT at 1000 Mbit/s, per system (median over models, clusters, RAM)."""
    rows = []
    for s in ["prima", "llama.cpp"] + RIVALS:
        lo = w[w["bandwidth_mbps"] == 5].set_index(["model", "cluster", "ram_scale"])[s]
        hi = w[w["bandwidth_mbps"] == 1000].set_index(["model", "cluster", "ram_scale"])[s]
        r = (lo / hi).dropna()
        rows.append({"system": s, "cells": len(r), "median slow-down 1000 -> 5 Mbit/s": float(r.median()) if len(r) else np.nan,
                     "max": float(r.max()) if len(r) else np.nan})
    return pd.DataFrame(rows)


def figure(w: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = w[w["cluster"] == "prima-d1-d4"]
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5), layout="constrained", sharex=True)
    colours = {"prima": "C0", "llama.cpp": "C1", "exo": "C2", "dllama": "C3", "mdi-llm": "C4"}
    for j, model in enumerate(MODELS):
        for i, bw in enumerate([10, 500]):
            ax = axes[i][j]
            g = d[(d["model"] == model) & (d["bandwidth_mbps"] == bw)].sort_values("ram_scale")
            for s, c in colours.items():
                if g[s].notna().any():
                    ax.plot(g["ram_scale"], g[s], marker="o", ms=3, color=c, label=s)
            ax.set_yscale("log")
            plain_log_axis(ax.yaxis)
            ax.set_title(f"{model}, Wi-Fi {bw} Mbit/s", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if i == 1:
                ax.set_xlabel("free RAM (x the testbed's)")
            if j == 0:
                ax.set_ylabel("TPOT (ms)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("prima.cpp's testbed D1-D4 (simulated): TPOT as free RAM shrinks; a missing point is an OOM")
    atomic_savefig(fig, path, dpi=110)


def main() -> None:
    df = load_results(HERE)
    rep = prepare(df)
    w = wide(rep.per_system)
    a, b, c, d = versus_rivals(w), rivals_ram(w), versus_llamacpp(w), bandwidth_effect(w)
    lost = w[(w["llama.cpp"] < 0.99 * w["prima"])]
    md = ["# wifi-ram: the answer in numbers", "",
          f"`python experiments/studies/wifi_ram/answer.py` over {len(df):,} simulated cells "
          f"({df['cluster'].nunique()} clusters, {df['model'].nunique()} models, "
          f"{df['bandwidth_mbps'].nunique()} Wi-Fi bandwidths, {df['ram_scale'].nunique()} RAM scales). "
          "Speed-up = the other's TPOT / prima's; mdi-llm with its better S per scenario.", "",
          "## prima against the best of exo, dllama and mdi-llm", "", _md(a), "",
          "## The smallest free-RAM scale at which each system runs (testbed D1-D4)", "", _md(b), "",
          "## prima against llama.cpp on one device, by free RAM", "", _md(c, max_rows=100), "",
          "## How much a slow Wi-Fi costs (5 vs 1000 Mbit/s)", "", _md(d), "",
          f"Scenarios where llama.cpp beats prima by more than 1 %: {len(lost)} of {len(w)}; by cluster: "
          + ", ".join(f"{k} {v}" for k, v in lost["cluster"].value_counts().sort_index().items()) + ".", "",
          "![TPOT against free RAM on D1-D4](answer.png)", ""]
    atomic_write_text(HERE / "answer.md", "\n".join(md))
    figure(w, HERE / "answer.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
