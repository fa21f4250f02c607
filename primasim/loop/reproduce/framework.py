"""`primasim reproduce NAME`: the seed papers' tables and figures, predicted by the simulator and set
beside the reported numbers.

A target (registry ``TARGETS``) simulates one table or figure of a paper and returns
- rows: one per reported number (case, system, device, metric, predicted, paper value, ratio =
  predicted / paper, the tolerance that applies and whether it is met; every row names its source
  in data/paper/), plus rows the paper has no number for (predicted only);
- claims: the paper's qualitative statements checked on the prediction (an ordering, an OOM, a
  crossover, a trend, a ratio) and the per-cell tolerances of the target; ``Result.ok`` is True when
  every claim holds, and ``primasim reproduce`` exits 1 when one does not;
- a figure in the paper's style (matplotlib).

``reproduce(name, out)`` writes ``<out>/<name>.csv`` (rows), ``<name>.claims.csv`` and ``<name>.png``.
Device parameters come from data/clusters/ (prima-d1-d6, prima-fig2-cpu4, prima-fig10) and
primasim/sim/_testbeds.py; they are estimated once and shared by every target -- nothing here is
tuned per cell. The tolerances are stated per target in ``Target.tolerance`` (and README).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt  # headless, matplotlib picks Agg; in Jupyter, its inline backend
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from primasim.core.cluster import ClusterSpec, load_cluster
from primasim.core.errors import lookup
from primasim.core.io import atomic_csv, atomic_savefig
from primasim.core.paths import data_dir
from primasim.sim import SimConfig, SimResult
from primasim.sim._fitted import calibrated

from ..row import Row

TABLE4_MODELS = ("llama3-8b", "llama3-14b", "llama1-30b", "llama3-45b", "llama3-60b", "llama1-65b", "llama3-70b")
SIZE = {"llama3-8b": "8B", "llama3-14b": "14B", "llama1-30b": "30B", "llama3-45b": "45B", "llama3-60b": "60B",
        "llama1-65b": "65B", "llama3-70b": "70B", "qwen2.5-32b": "32B", "qwen2.5-72b": "72B"}
ROW_FIELDS = ("target", "case", "system", "device", "metric", "unit", "predicted", "paper", "ratio", "tolerance",
              "within", "split", "source", "note")


# ----------------------------------------------------------------------------------------- results
@dataclass
class Claim:
    """One statement of a paper (or one tolerance of a target) checked on the prediction."""

    text: str
    kind: str  # ordering | oom | crossover | trend | ratio | bound | equality | argmin | tolerance
    passed: bool
    detail: str
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"claim": self.text, "kind": self.kind, "passed": self.passed, "detail": self.detail,
                "source": self.source}


@dataclass
class Output:
    """What a target function returns."""

    rows: list[Row]
    claims: list[Claim]
    plot: Callable[[pd.DataFrame], Figure]
    notes: list[str] = field(default_factory=list)


@dataclass
class Result:
    """One reproduced target: its rows, claims, figure and where they were written."""

    target: str
    title: str
    source: str
    tolerance: str
    rows: pd.DataFrame
    claims: list[Claim]
    notes: list[str]
    elapsed_s: float
    csv: Path | None = None
    claims_csv: Path | None = None
    png: Path | None = None

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.claims)

    @property
    def failed(self) -> list[Claim]:
        return [c for c in self.claims if not c.passed]

    def to_json(self) -> dict[str, Any]:
        rows = [{k: _json_num(v) for k, v in r.items()} for r in self.rows.to_dict(orient="records")]
        return {"target": self.target, "title": self.title, "source": self.source, "tolerance": self.tolerance,
                "ok": self.ok, "claims": [c.as_dict() for c in self.claims], "rows": rows, "notes": self.notes,
                "elapsed_s": round(self.elapsed_s, 2), "csv": str(self.csv) if self.csv else None,
                "claims_csv": str(self.claims_csv) if self.claims_csv else None,
                "png": str(self.png) if self.png else None}


def _json_num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item"):
        v = v.item()
    if v is not None and isinstance(v, float) and math.isnan(v):
        return None
    return v


@dataclass(frozen=True)
class Target:
    name: str
    title: str
    source: str  # the paper's table/figure
    tolerance: str  # what is checked, stated once (README copies it)
    fn: Callable[[TargetOptions], Output]


@dataclass(frozen=True)
class TargetOptions:
    """Knobs shared by every target (the defaults are what the committed results use)."""

    tokens: int = 16
    seed: int = 0


TARGETS: dict[str, Target] = {}


def register(name: str, title: str, source: str) -> Callable[[Callable[[TargetOptions], Output]],
                                                             Callable[[TargetOptions], Output]]:
    """Register a target; its docstring states the tolerances it checks (`Target.tolerance`)."""

    def deco(fn: Callable[[TargetOptions], Output]) -> Callable[[TargetOptions], Output]:
        if name in TARGETS:
            raise ValueError(f"target {name!r} registered twice")
        TARGETS[name] = Target(name, title, source, " ".join((fn.__doc__ or "").split()), fn)
        return fn

    return deco


def target_names() -> list[str]:
    return list(TARGETS)


def get_target(name: str) -> Target:
    return lookup(TARGETS, name, what="reproduce target", where="primasim reproduce",
                  fix=f"use one of {', '.join(TARGETS)} or `all` (list them with --list)")


def reproduce(name: str, out: str | Path | None = None, *, options: TargetOptions | None = None) -> Result:
    """Run target `name`; with `out`, write <out>/<name>.csv, <name>.claims.csv and <name>.png."""

    tgt = get_target(name)
    opts = options or TargetOptions()
    t0 = time.perf_counter()
    got = tgt.fn(opts)
    df = pd.DataFrame([r.as_dict(name) for r in got.rows], columns=list(ROW_FIELDS))
    claims = list(got.claims) + _tolerance_claims(got.rows)
    res = Result(name, tgt.title, tgt.source, tgt.tolerance, df, claims, got.notes, time.perf_counter() - t0)
    if out is not None:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        res.csv = d / f"{name}.csv"
        _atomic_csv(res.csv, df)
        res.claims_csv = d / f"{name}.claims.csv"
        _atomic_csv(res.claims_csv, pd.DataFrame([c.as_dict() for c in claims],
                                                 columns=["claim", "kind", "passed", "detail", "source"]))
        res.png = d / f"{name}.png"
        fig = got.plot(df)
        atomic_savefig(fig, res.png, dpi=110, bbox_inches="tight", format="png")

        plt.close(fig)
    return res


def _atomic_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_csv(path, df, index=False)


def error_summary(results: Iterable[Result]) -> pd.DataFrame:
    """Per target and split (in-sample / out-of-sample): how many cells have a paper number, the
    median and P90 of |predicted / paper - 1|, and how many toleranced cells are within tolerance."""

    out = []
    for res in results:
        df = res.rows[res.rows["split"].astype(str) != ""]
        for split in ("in-sample", "out-of-sample"):
            d = df[df["split"] == split]
            if d.empty:
                continue
            err = (d["ratio"].astype(float) - 1.0).abs()
            tol = d[d["tolerance"].astype(str) != ""]
            out.append({"target": res.target, "split": split, "cells": len(d),
                        "median_err_pct": round(100 * float(np.median(err)), 1),
                        "p90_err_pct": round(100 * float(np.percentile(err, 90)), 1),
                        "toleranced": len(tol), "within": int(tol["within"].astype(bool).sum())})
    return pd.DataFrame(out, columns=["target", "split", "cells", "median_err_pct", "p90_err_pct", "toleranced",
                                      "within"])


def _tolerance_claims(rows: list[Row]) -> list[Claim]:
    """One claim per (system, metric, tolerance) group: every cell of the group within tolerance."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        if r.within is not None:
            groups.setdefault((r.system, r.metric, r.tolerance), []).append(r)
    out = []
    for (system, metric, tol), rs in groups.items():
        bad = [r for r in rs if not r.within]
        quorum = min(r.quorum for r in rs)
        detail = f"{len(rs) - len(bad)}/{len(rs)} cells within" + (
            "; outside: " + ", ".join(f"{row_label(r)} {fmt(r.predicted)} vs {fmt(r.reference)}" for r in bad) if bad else "")
        need = "" if quorum >= 1 else f" in >= {quorum:.0%} of cells"
        ok = (len(rs) - len(bad)) >= quorum * len(rs) - 1e-9
        out.append(Claim(f"{system} {metric} within {tol} of the paper per cell{need}", "tolerance", ok, detail,
                         rs[0].source))
    return out


def row_label(r: Row) -> str:
    return r.case + (f"/{r.device}" if r.device else "")


def fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


# ----------------------------------------------------------------------------------------- helpers
def paper_rows(name: str) -> list[dict[str, str]]:
    """The rows of data/paper/<name>.csv."""
    path = data_dir() / "paper" / f"{name}.csv"
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def num(s: str | None) -> float | None:
    if s is None or str(s).strip() == "":
        return None
    return float(s)


def testbed(name: str) -> ClusterSpec:
    """A built-in testbed with the fitted constants in force (primasim.sim._fitted.override)."""

    return calibrated(load_cluster(name))


def sim_config(opts: TargetOptions, **kw: Any) -> SimConfig:
    return SimConfig(tokens=kw.pop("tokens", opts.tokens), seed=opts.seed, **kw)


def tpot(res: SimResult) -> float:
    return res.tpot_ms if res.feasible else math.inf


def ordering_claim(text: str, lesser: tuple[str, float], greater: tuple[str, float], source: str,
                   kind: str = "ordering") -> Claim:
    (na, a), (nb, b) = lesser, greater
    return Claim(text, kind, a < b, f"{na} {fmt(a)} < {nb} {fmt(b)}" if a < b else
                 f"{na} {fmt(a)} >= {nb} {fmt(b)}", source)


def new_figure(ncols: int = 1, w: float = 7.0, h: float = 4.0) -> tuple[Figure, Any]:
    fig, axes = plt.subplots(1, ncols, figsize=(w, h), squeeze=False)
    return fig, axes[0]


def select(df: pd.DataFrame, **eq: Any) -> pd.DataFrame:
    m = None
    for k, v in eq.items():
        c = df[k] == v
        m = c if m is None else (m & c)
    return df[m] if m is not None else df


def cell_value(df: pd.DataFrame, col: str = "predicted", **eq: Any) -> float | None:
    s = select(df, **eq)
    if s.empty:
        return None
    v = s.iloc[0][col]
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


