"""A trace's timeline: one row per device and resource, spans coloured by kind (matplotlib)."""

from __future__ import annotations

from typing import Any

from .framework import new_figure

# =========================================================================== timelines
_TRACK_COLORS = {"cpu": "#1f77b4", "gpu": "#d62728", "disk": "#8c564b", "prefetch": "#bcbd22", "wait": "#c7c7c7",
                 "send": "#2ca02c", "net": "#98df8a", "pcie": "#9467bd"}


def plot_timeline(trace: Any, *, ax: Any = None, t0: float | None = None, t1: float | None = None,
                  title: str = "") -> Any:
    """A Gantt chart of a Trace (simulated or measured): one row per device and resource, ms on x.

    `t0`/`t1` (seconds) clip the window shown (default: the second and third decoded tokens, where
    the steady state shows). Returns the matplotlib Axes."""
    if ax is None:
        _, (ax,) = new_figure(1, 10, 3.5)
    toks = sorted({t.time for t in trace.tokens})
    if t0 is None:
        t0 = toks[1] if len(toks) > 2 else (toks[0] if toks else 0.0)
    if t1 is None:
        t1 = toks[3] if len(toks) > 3 else max((s.end for s in trace.spans), default=t0 + 1e-3)
    rows = sorted({(s.device, s.resource) for s in trace.spans}, key=lambda r: (r[0], r[1]))
    for i, (dev, res) in enumerate(rows):
        bars = [(max(s.start, t0) * 1e3, (min(s.end, t1) - max(s.start, t0)) * 1e3) for s in trace.spans
                if s.device == dev and s.resource == res and s.end > t0 and s.start < t1]
        if bars:
            ax.broken_barh(bars, (i - 0.4, 0.8), color=_TRACK_COLORS.get(res, "#7f7f7f"))
    for t in toks:
        if t0 <= t <= t1:
            ax.axvline(t * 1e3, color="black", lw=0.6, ls=":")
    ax.set_yticks(range(len(rows)), [f"{d} {r}" for d, r in rows], fontsize=7)
    ax.set_xlim(t0 * 1e3, t1 * 1e3)
    ax.set_xlabel("time (ms); dotted: a token is out")
    if title:
        ax.set_title(title, fontsize=9)
    return ax
