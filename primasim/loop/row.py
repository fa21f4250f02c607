"""One compared quantity, for every comparison the toolkit makes: what the simulator (or the cost
model) predicts beside a reference -- a paper's reported number (`primasim reproduce`) or what the
runtime measured (`primasim validate`) -- with the ratio, the error and the tolerance that applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from primasim.sim._fitted import split_of


@dataclass
class Row:
    case: str  # the case compared (a model, a device set, ...; "" for validate's one case)
    system: str
    metric: str
    unit: str  # display unit
    predicted: float | None
    reference: float | None = None  # the paper's number, or the measurement
    device: str = ""
    rel_tol: float | None = None  # |predicted/reference - 1| <= rel_tol
    abs_tol: float | None = None  # |predicted - reference| <= abs_tol (in `unit`)
    source: str = ""
    note: str = ""
    paper_bound: str = "="  # "<=": the paper gives an upper bound (e.g. "<= 1.0 %")
    quorum: float = 1.0  # fraction of the group's cells that must be within tolerance
    scale: float = 1.0  # stored value / scale = display value (validate stores SI units)

    @property
    def ratio(self) -> float | None:
        p, r = self.predicted, self.reference
        if p is None or r is None or r == 0 or not math.isfinite(p):
            return None
        return p / r

    @property
    def error_pct(self) -> float:
        """(predicted - reference) / |reference| in %; NaN for quantities that are themselves shares
        (memory pressure: a relative error of a few-percent share says little), see `error_pp`."""
        p, r = nan_if_none(self.predicted), nan_if_none(self.reference)
        if self.unit == "%" or not (math.isfinite(p) and math.isfinite(r)) or r == 0:
            return float("nan")
        return 100.0 * (p - r) / abs(r)

    @property
    def error_pp(self) -> float:
        """predicted - reference in percentage points (shares only)."""
        return (nan_if_none(self.predicted) - nan_if_none(self.reference)) / self.scale if self.unit == "%" else float("nan")

    @property
    def tolerance(self) -> str:
        if self.rel_tol is not None:
            return f"+/-{self.rel_tol:.0%}"
        if self.abs_tol is not None:
            return f"+/-{self.abs_tol:g} {self.unit}"
        return ""

    @property
    def within(self) -> bool | None:
        ref = self.reference
        if ref is None or (self.rel_tol is None and self.abs_tol is None):
            return None
        if self.predicted is None or not math.isfinite(self.predicted):
            return False
        if self.paper_bound == "<=":
            slack = self.abs_tol if self.abs_tol is not None else ref * (self.rel_tol or 0.0)
            return self.predicted <= ref + slack
        if self.rel_tol is not None:
            return abs(self.predicted / ref - 1.0) <= self.rel_tol + 1e-12
        assert self.abs_tol is not None
        return abs(self.predicted - ref) <= self.abs_tol + 1e-12

    def split(self, target: str) -> str:
        """in-sample: a fitted constant was fitted on this cell (primasim/sim/_fitted.py); else
        out-of-sample; empty when the paper has no number for it."""
        if self.reference is None or self.ratio is None:
            return ""
        return split_of(target, self.case, self.system, self.metric, self.device)

    def as_dict(self, target: str) -> dict[str, Any]:
        """`primasim reproduce`'s CSV/JSON row (the reference is the paper's number)."""
        r = self.ratio
        return {"target": target, "case": self.case, "system": self.system, "device": self.device,
                "metric": self.metric, "unit": self.unit,
                "predicted": None if self.predicted is None else _round(self.predicted),
                "paper": self.reference,
                "ratio": None if r is None else round(r, 4), "tolerance": self.tolerance,
                "within": self.within, "split": self.split(target), "source": self.source,
                "note": (f"paper {self.paper_bound} {self.reference:g}; "
                         if self.paper_bound != "=" and self.reference is not None else "") + self.note}

    def to_json(self) -> dict[str, Any]:
        """`primasim validate`'s row (the reference is the measurement), in display units."""
        return {"metric": self.metric, "device": self.device, "unit": self.unit,
                "predicted": nan_if_none(self.predicted) / self.scale, "measured": nan_if_none(self.reference) / self.scale,
                "error_pct": self.error_pct, "error_pp": self.error_pp}


def nan_if_none(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _round(x: float) -> float:
    if not math.isfinite(x):
        return x
    if abs(x) >= 100:
        return round(x, 1)
    return round(x, 4)
