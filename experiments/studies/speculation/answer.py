"""The study's answer from the committed sweep (experiments/studies/speculation/results/): per model
and cluster, the best (draft, K, plan) for speculative decoding and what it saves over no draft.

    primasim sweep experiments/studies/speculation/spec.toml --out experiments/studies/speculation --no-csv
    python experiments/studies/speculation/answer.py      # -> answer.md, answer.png
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from primasim.core.io import atomic_savefig, atomic_write_text
from primasim.loop.sweep import load_results

HERE = Path(__file__).parent


def best_per_case(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (model, cluster), g in df.groupby(["model", "cluster"], sort=True):
        ok = g[g["feasible"].astype(bool) & g["tpot_ms"].notna()]
        plain = ok[ok["draft_tokens"] == 0]["tpot_ms"].min()
        b = ok.loc[ok["tpot_ms"].idxmin()]
        per_draft = {d: ok[(ok["draft"] == d) & (ok["draft_tokens"] > 0)]["tpot_ms"].min() for d in sorted(ok["draft"].unique())}
        rows.append({"model": model, "cluster": cluster, "no draft ms": round(plain, 1),
                     "best draft": b["draft"] if b["draft_tokens"] > 0 else "none", "best K": int(b["draft_tokens"]),
                     "best ms": round(b["tpot_ms"], 1), "saves": f"{100 * (1 - b['tpot_ms'] / plain):.0f} %",
                     **{f"best with {d} ms": round(v, 1) for d, v in per_draft.items()},
                     "plan": b["plan"]})
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, path: Path) -> None:
    cases = sorted(df.groupby(["model", "cluster"]).groups)
    fig, axes = plt.subplots(2, (len(cases) + 1) // 2, figsize=(4 * ((len(cases) + 1) // 2), 7), squeeze=False)
    for ax, (model, cluster) in zip(axes.flat, cases, strict=False):
        g = df[(df["model"] == model) & (df["cluster"] == cluster)]
        for d, mk in zip(sorted(g["draft"].unique()), ("o", "s"), strict=False):
            s = g[g["draft"] == d].sort_values("draft_tokens")
            ax.plot(s["draft_tokens"], s["tpot_ms"], mk + "-", label=f"{d} (acceptance {s['acceptance'].iloc[0]:g})")
        b = g.loc[g["tpot_ms"].idxmin()]
        ax.scatter([b["draft_tokens"]], [b["tpot_ms"]], s=160, facecolors="none", edgecolors="red", zorder=3,
                   label="best")
        ax.set_title(f"{model} on {cluster}", fontsize=9)
        ax.set_xlabel("drafted tokens per pass K (0 = no draft)")
        ax.set_ylabel("TPOT (ms)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.suptitle("speculative decoding on prima.cpp's ring: draft and K (simulated, Halda plans every cell)")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def main() -> None:
    df = load_results(HERE)
    best = best_per_case(df)
    lines = ["# Study: the best draft, K and plan for speculative decoding (simulated)", "",
             "From `primasim sweep experiments/studies/speculation/spec.toml` (spec.toml says what is assumed); "
             "`python experiments/studies/speculation/answer.py` writes this file and answer.png.", "",
             "| " + " | ".join(best.columns) + " |", "|" + "---|" * len(best.columns)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in best.itertuples(index=False)]
    atomic_write_text(HERE / "answer.md", "\n".join(lines) + "\n")
    plot(df, HERE / "answer.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
