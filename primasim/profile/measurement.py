"""A profiled figure: repeated samples of one quantity, summarised by median and spread."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Measurement:
    """Repeated samples of one quantity (SI units), summarised by median and spread."""

    name: str
    samples: tuple[float, ...]
    unit: str  # display unit, e.g. "GB/s"
    scale: float  # SI value / scale = display value
    how: str = ""  # one line: method, sizes, threads

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError(f"measurement {self.name!r} has no samples")

    @property
    def value(self) -> float:
        return float(statistics.median(self.samples))

    def quantile(self, q: float) -> float:
        s = sorted(self.samples)
        if len(s) == 1:
            return s[0]
        pos = q * (len(s) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def spread(self) -> tuple[float, float]:
        """Inter-quartile range (p25, p75) of the samples."""
        return self.quantile(0.25), self.quantile(0.75)

    @property
    def rel_spread(self) -> float:
        """IQR / median: how noisy the figure is (0 = identical samples)."""
        lo, hi = self.spread
        return (hi - lo) / self.value if self.value else 0.0

    def describe(self) -> str:
        """'17.2 GB/s (IQR 16.9-17.5, min 16.1, max 17.8, n=5)'."""
        lo, hi = self.spread
        s = self.scale
        return (f"{_g(self.value / s)} {self.unit} (IQR {_g(lo / s)}-{_g(hi / s)}, min {_g(min(self.samples) / s)}, "
                f"max {_g(max(self.samples) / s)}, n={len(self.samples)})")

    def to_json(self) -> dict[str, Any]:
        lo, hi = self.spread
        return {"value": self.value, "unit_si": _si_unit(self.unit), "display_unit": self.unit,
                "display_value": self.value / self.scale, "p25": lo, "p75": hi, "min": min(self.samples),
                "max": max(self.samples), "n": len(self.samples), "samples": list(self.samples), "how": self.how}


def _g(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _si_unit(display: str) -> str:
    return {"GB/s": "B/s", "MB/s": "B/s", "GFLOPS": "FLOP/s", "ms": "s", "us": "s", "GiB": "B",
            "Mbps": "B/s"}.get(display, display)


def measurement(name: str, samples: Iterable[float], unit: str, scale: float, how: str) -> Measurement:
    return Measurement(name, tuple(float(x) for x in samples), unit, scale, how)
