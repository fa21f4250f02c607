"""Figures of a sweep report: which system wins over two knobs, by how much the focus system wins,
and each system's metric along one knob (where the curves cross). matplotlib, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from primasim.core import io as _io

from .tables import Report, _better, _fmt, _system_sort, binned

NONE = "none feasible"
MAX_PANELS = 6


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colours(systems: list[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    out = {s: cmap(i % 10) for i, s in enumerate(_system_sort(systems))}
    out[NONE] = (0.85, 0.85, 0.85, 1.0)
    return out


def _panels(df: pd.DataFrame, facets: list[str], order: list[Any] | None = None) -> list[tuple[str, pd.DataFrame]]:
    """One panel per facet value, in `order` (the sweep's order) where given."""
    if not facets:
        return [("", df)]
    f = facets[0]
    present = set(df[f])
    vals = [v for v in (order or list(dict.fromkeys(df[f]))) if v in present][:MAX_PANELS]
    return [(f"{f} = {_fmt(v)}", df[df[f] == v]) for v in vals]


def _order(rep: Report, facets: list[str]) -> list[Any] | None:
    return list(dict.fromkeys(rep.per_system[facets[0]])) if facets else None


def plain_log_axis(axis: Any, values: Any = None) -> None:
    """A log axis labelled with plain numbers (at the data's values when given); within less than
    a decade the minor ticks are labelled too, so every panel has numbers on it."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    if values is not None:
        axis.set_ticks(sorted(set(values)))
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:.2g}")
    axis.set_major_formatter(plain)
    lo, hi = axis.get_view_interval()
    axis.set_minor_formatter(plain if 0 < lo and hi < 10 * lo else NullFormatter())


def _ticks(ax: Any, xs: list[float], ys: list[Any], x: str, y: str) -> None:
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([_fmt(round(v, 3)) if isinstance(v, float) else str(v) for v in xs], rotation=45, fontsize=7)
    ax.set_yticks(range(len(ys)))
    ax.set_yticklabels([_fmt(round(v, 3)) if isinstance(v, float) else str(v) for v in ys], fontsize=7)
    ax.set_xlabel(x)
    ax.set_ylabel(y)


def _grid(df: pd.DataFrame, x: str, y: str) -> tuple[pd.DataFrame, list[Any], list[Any]]:
    d = df.assign(_x=binned(df[x]) if pd.api.types.is_numeric_dtype(df[x]) else df[x],
                  _y=binned(df[y]) if pd.api.types.is_numeric_dtype(df[y]) else df[y])
    return d, sorted(d["_x"].dropna().unique()), sorted(d["_y"].dropna().unique())


def heatmap_best(rep: Report, best: pd.DataFrame, x: str, y: str, facets: list[str], path: Path) -> Path:
    """Colour = the system that wins most scenarios in each (x, y) cell; text = its share if < 100 %."""
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    systems = _system_sort(list(rep.per_system["system"].unique()))
    col = colours(systems)
    names = systems + [NONE]
    cmap = ListedColormap([col[s] for s in names])
    panels = _panels(best, facets, _order(rep, facets))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels) + 1.5, 3.6), squeeze=False,
                             layout="constrained")
    seen: set[str] = set()
    for ax, (title, sub) in zip(axes[0], panels):
        d, xs, ys = _grid(sub, x, y)
        img = np.full((len(ys), len(xs)), np.nan)
        for (xv, yv), g in d.groupby(["_x", "_y"]):
            counts = g["best"].value_counts()
            win = counts.index[0]
            seen.add(win)
            img[ys.index(yv), xs.index(xv)] = names.index(win)
            share = counts.iloc[0] / len(g)
            if share < 0.995:
                ax.text(xs.index(xv), ys.index(yv), f"{100 * share:.0f}%", ha="center", va="center", fontsize=6)
        ax.imshow(img, origin="lower", cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, aspect="auto")
        _ticks(ax, xs, ys, x, y)
        ax.set_title(title, fontsize=9)
    handles = [Patch(color=col[s], label=s) for s in names if s in seen]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, title=f"best {rep.metric}")
    _io.atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path


def heatmap_speedup(rep: Report, focus: str, x: str, y: str, facets: list[str], path: Path) -> Path:
    """The focus system against the best other system: geometric mean of the ratio per (x, y) cell
    (> 1: the focus system is faster); grey where it is infeasible, 'only' where nothing else runs."""
    plt = _plt()
    from matplotlib.colors import TwoSlopeNorm

    m, scen = rep.metric, rep.scenario_keys
    per = rep.per_system
    mine = per[per["system"] == focus].set_index(scen)[m]
    others = per[per["system"] != focus]
    agg = "min" if _better(m) == "min" else "max"
    best_other = others.groupby(scen, dropna=False)[m].agg(agg)
    j = pd.DataFrame({"mine": mine, "other": best_other.reindex(mine.index)}).reset_index()
    j["ratio"] = j["other"] / j["mine"] if agg == "min" else j["mine"] / j["other"]
    panels = _panels(j, facets, _order(rep, facets))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels) + 1.2, 3.6), squeeze=False,
                             layout="constrained")
    lim = 1.0
    images = []
    for ax, (title, sub) in zip(axes[0], panels):
        d, xs, ys = _grid(sub, x, y)
        img = np.full((len(ys), len(xs)), np.nan)
        for (xv, yv), g in d.groupby(["_x", "_y"]):
            r = g["ratio"].dropna()
            r = r[r > 0]
            i, k = ys.index(yv), xs.index(xv)
            if len(r):
                img[i, k] = np.log10(np.exp(np.log(r).mean()))
                ax.text(k, i, f"{10 ** img[i, k]:.2g}x", ha="center", va="center", fontsize=6)
            elif g["mine"].notna().any():
                ax.text(k, i, "only", ha="center", va="center", fontsize=6)
            else:
                ax.text(k, i, "OOM", ha="center", va="center", fontsize=6, color="0.4")
        lim = max(lim, float(np.nanmax(np.abs(img))) if np.isfinite(img).any() else 1.0)
        images.append((ax, img, xs, ys, title))
    norm = TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim)
    im = None
    for ax, img, xs, ys, title in images:
        ax.set_facecolor("0.9")
        im = ax.imshow(img, origin="lower", cmap="RdBu", norm=norm, aspect="auto")
        _ticks(ax, xs, ys, x, y)
        ax.set_title(title, fontsize=9)
    cb = fig.colorbar(im, ax=axes[0].tolist(), shrink=0.85)
    cb.set_label(f"log10 speed-up of {focus} over the best other")
    _io.atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path


def crossover_figure(rep: Report, cur: pd.DataFrame, x: str, y: str | None, facets: list[str], path: Path) -> Path:
    """Metric against x, one line per system (median over the other knobs; a gap where most are infeasible)."""
    plt = _plt()
    systems = _system_sort(list(cur["system"].unique()))
    col = colours(systems)
    rows = _panels(cur, facets, _order(rep, facets))
    ycol = y if y is not None and y in cur.columns else None
    yvals = sorted(cur[ycol].unique()) if ycol else [None]
    fig, axes = plt.subplots(len(rows), len(yvals), figsize=(3.6 * len(yvals) + 1.4, 2.9 * len(rows)),
                             squeeze=False, sharex=True, layout="constrained")
    for r, (title, sub) in enumerate(rows):
        for c, yv in enumerate(yvals):
            ax = axes[r][c]
            s = sub if ycol is None else sub[sub[ycol] == yv]
            for name in systems:
                g = s[s["system"] == name].sort_values(x)
                if g["value"].notna().any():
                    ax.plot(g[x], g["value"], marker="o", ms=3, color=col[name], label=name)
            ax.set_yscale("log")
            plain_log_axis(ax.yaxis)
            xv = cur[x].astype(float)
            if (xv > 0).all() and xv.max() / xv.min() >= 20:
                ax.set_xscale("log")
                plain_log_axis(ax.xaxis, xv if xv.nunique() <= 10 else None)
            head = ", ".join(t for t in (title, f"{ycol} = {_fmt(yv)}" if ycol else "") if t)
            ax.set_title(head, fontsize=8)
            ax.grid(alpha=0.3, which="both")
            if r == len(rows) - 1:
                ax.set_xlabel(x)
            if c == 0:
                ax.set_ylabel(rep.metric)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    _io.atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(df: pd.DataFrame, x: str, y: str = "tpot_ms", hue: str = "system", out: str | Path | None = None,
               *, facet: str | None = None, logy: bool = False) -> Any:
    """A quick view: `y` against knob `x`, one line per `hue` (mean of feasible cells), a panel per `facet`."""
    plt = _plt()
    data = df[df["feasible"] == True] if "feasible" in df else df  # noqa: E712
    panels = sorted(data[facet].dropna().unique()) if facet else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        sub = data if panel is None else data[data[facet] == panel]
        for key, g in sub.groupby(hue):
            g = g.groupby(x, as_index=False)[y].mean().sort_values(x)
            ax.plot(g[x], g[y], marker="o", label=str(key))
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if logy:
            ax.set_yscale("log")
        if panel is not None:
            ax.set_title(f"{facet} = {panel}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    if out is not None:
        _io.atomic_savefig(fig, out, dpi=120)
    return fig
