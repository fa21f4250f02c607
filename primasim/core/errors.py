"""User-facing errors: each says what is wrong, where, and how to fix it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


class PrimasimError(Exception):
    """Base class of every error a user should see as one clear message (no traceback)."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = []
        if self.where:
            parts.append(f"{self.where}: ")
        parts.append(self.what)
        if self.fix:
            parts.append(f" (fix: {self.fix})")
        return "".join(parts)


class SpecError(PrimasimError):
    """A model, device or cluster description is malformed or incomplete."""


class PlanError(PrimasimError):
    """A plan is invalid for its model and cluster, or no plan fits."""


class CheckpointError(PrimasimError):
    """A checkpoint file is missing, truncated, corrupted or does not match its config."""


class WireError(PrimasimError):
    """A network message is malformed, of the wrong version, or a peer misbehaved."""


class WorkerError(PrimasimError):
    """A worker died, timed out, or reported a failure."""


class EmulationError(PrimasimError):
    """The emulated cluster could not be set up (cgroups, namespaces, tc)."""


def lookup(table: Mapping[str, T], name: str, *, what: str, where: str, fix: str) -> T:
    """`table[name]`, or one SpecError saying which `what` is unknown and how to fix it."""
    try:
        return table[name]
    except KeyError:
        raise SpecError(f"unknown {what} {name!r}", where=where, fix=fix) from None
