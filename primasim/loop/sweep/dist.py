"""Distributions in a sweep spec: a fixed value, a list of choices, or a range {low, high, log, integer}.

One syntax for sampled knobs (`[sample.ranges]`) and for generated clusters (`[generate.NAME]`,
`[classes.NAME]`): a value maps a uniform number u in [0, 1) to a draw, so the same object serves
random draws (u from a seeded numpy Generator) and quasi-random designs (u from scipy.stats.qmc).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from primasim.core.errors import SpecError

RANGE_KEYS = ("low", "high", "log", "integer", "round")


@dataclass(frozen=True)
class Dist:
    """A fixed value (`choices` of one), a uniform choice among `choices`, or a range [low, high]."""

    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False
    round: int | None = None  # decimal places kept of a continuous draw

    @property
    def is_range(self) -> bool:
        return not self.choices

    def at(self, u: float) -> Any:
        """The draw for a uniform number u in [0, 1)."""
        if self.choices:
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        if self.integer:
            lo, hi = math.ceil(self.low), math.floor(self.high)
            if self.log:  # log-uniform over [lo, hi + 1), floored: each integer gets its log-width
                v = math.exp(math.log(lo) + u * (math.log(hi + 1) - math.log(lo)))
                return int(min(max(math.floor(v), lo), hi))
            return int(min(lo + math.floor(u * (hi - lo + 1)), hi))
        if self.log:
            v = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            v = self.low + u * (self.high - self.low)
        return round(v, self.round) if self.round is not None else v

    def draw(self, rng: np.random.Generator) -> Any:
        return self.at(float(rng.random()))

    def describe(self) -> str:
        if self.choices:
            return " | ".join(map(str, self.choices)) if len(self.choices) > 1 else str(self.choices[0])
        kind = "integers" if self.integer else "numbers"
        return f"{kind} in [{self.low:g}, {self.high:g}]" + (" (log-uniform)" if self.log else "")

    def values(self) -> list[Any]:
        """Values to validate: every choice, or a range's two ends."""
        if self.choices:
            return list(self.choices)
        if self.integer:
            return [math.ceil(self.low), math.floor(self.high)]
        return [self.low, self.high]


def parse_dist(raw: Any, where: str, *, integer: bool = False) -> Dist:
    """A Dist from a spec value: scalar, non-empty list, or {low, high[, log][, integer][, round]}."""
    if isinstance(raw, dict):
        extra = set(raw) - set(RANGE_KEYS)
        if extra:
            raise SpecError(f"unknown key(s) {sorted(extra)} in a range", where=where,
                            fix="a range is {low = A, high = B} with optional log, integer, round")
        if "low" not in raw or "high" not in raw:
            raise SpecError("a range needs low and high", where=where, fix="write {low = A, high = B}")
        lo, hi = raw["low"], raw["high"]
        for name, v in (("low", lo), ("high", hi)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise SpecError(f"{name} = {v!r} is not a finite number", where=where, fix=f"give {name} as a number")
        if lo > hi:
            raise SpecError(f"low ({lo}) is above high ({hi})", where=where, fix="swap low and high")
        log = raw.get("log", False)
        is_int = raw.get("integer", integer)
        rnd = raw.get("round")
        if not isinstance(log, bool) or not isinstance(is_int, bool):
            raise SpecError("log and integer are true or false", where=where, fix="write log = true")
        if rnd is not None and (isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0):
            raise SpecError(f"round = {rnd!r} is not a number of decimal places", where=where, fix="e.g. round = 2")
        if log and lo <= 0:
            raise SpecError(f"a log range needs low > 0, got {lo}", where=where, fix="raise low above 0 or drop log")
        if is_int and math.ceil(lo) > math.floor(hi):
            raise SpecError(f"no integer in [{lo}, {hi}]", where=where, fix="widen the range")
        if integer and not is_int:
            raise SpecError("this knob takes whole numbers", where=where, fix="drop integer = false")
        return Dist(low=float(lo), high=float(hi), log=log, integer=is_int, round=rnd)
    if isinstance(raw, list):
        if not raw:
            raise SpecError("an empty list", where=where, fix="give at least one value")
        for v in raw:
            if isinstance(v, dict | list):
                raise SpecError(f"{v!r} is not a plain value", where=where, fix="list numbers, strings or booleans")
        return Dist(choices=tuple(raw))
    if isinstance(raw, float) and not math.isfinite(raw):
        raise SpecError(f"{raw!r} is not a finite number", where=where, fix="give a finite value")
    return Dist(choices=(raw,))


def parse_weights(raw: Any, where: str, known: list[str] | tuple[str, ...]) -> dict[str, float]:
    """{name: weight} (relative, >= 0, not all 0), or a list of names (equal weights)."""
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, list):
        raw = {str(k): 1.0 for k in raw}
    if not isinstance(raw, dict) or not raw:
        raise SpecError("expected a table of weights or a list of names", where=where,
                        fix=f"e.g. {{ {known[0]} = 2, {known[-1]} = 1 }}")
    out: dict[str, float] = {}
    for k, w in raw.items():
        if k not in known:
            raise SpecError(f"unknown name {k!r}", where=where, fix=f"use {', '.join(known)}")
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise SpecError(f"weight {k} = {w!r} is not a number >= 0", where=where, fix="use relative weights like 1, 2")
        out[k] = float(w)
    if sum(out.values()) <= 0:
        raise SpecError("every weight is 0", where=where, fix="give at least one a positive weight")
    return out
