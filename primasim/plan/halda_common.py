"""What prima.cpp's Halda loop (primasim.plan.halda) and the one-model Halda (primasim.plan.halda_model)
share: the result type, the ring order, blocks of laps, and the integer allocation helpers (greedy
over sorted marginal costs and single-layer exchanges, exact for separable convex costs under one
sum constraint; the partial lap's reachable totals); and keeping HiGHS's banner off stdout."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from primasim.core.cluster import ClusterSpec
from primasim.core.errors import SpecError
from primasim.core.plan import Plan


@dataclass
class HaldaResult:
    """What Halda chose and how it got there."""

    plan: Plan
    objective: float  # s: the cost model's TPOT of `plan` (variant/comm as solved, no head priority)
    k: int
    sets: list[str]  # per device of plan.devices (dropped devices: "-")
    iterations: int  # outer iterations over all device-selection rounds
    solve_time: float  # s wall clock, everything included
    candidates: list[Plan] = field(default_factory=list)  # best plan per valid k (final round)
    dropped: list[str] = field(default_factory=list)  # devices removed by device selection
    rounds: int = 1
    notes: list[str] = field(default_factory=list)
    lower_bound: float | None = None  # s: the relaxation's bound (relax) or the optimum (exact), model objective
    model_objective: float | None = None  # s: the objective the solver minimised (head priority applied)
    trace: list[str] = field(default_factory=list)  # prima.cpp's loop: one line per iteration



@dataclass(frozen=True)
class _Block:
    k: int  # laps per token
    q: int  # full laps (k for a closed block, k-1 when the last lap is partial)
    p: int  # device whose window the partial lap ends in; -1 for a closed block (L = k*W)
    mult: tuple[int, ...]  # layers per unit of w_m: q+1 before p, q from p on (k for closed)

    @property
    def closed(self) -> bool:
        return self.p < 0



def _exchange(tables: np.ndarray, w: np.ndarray, total: int) -> np.ndarray | None:
    """Repair w to sum(w) = total, then improve by unit exchanges until none helps.

    `tables[m, x]` is device m's cost at window x (inf if infeasible); each row convex.
    """
    M, X = tables.shape
    w = w.copy()
    idx = np.arange(M)

    def up(v: np.ndarray) -> np.ndarray:  # cost of one more layer
        nxt = np.minimum(v + 1, X - 1)
        return np.where(v + 1 < X, tables[idx, nxt] - tables[idx, v], np.inf)

    def down(v: np.ndarray) -> np.ndarray:  # saving of one layer less
        prv = np.maximum(v - 1, 0)
        return np.where(v >= 1, tables[idx, v] - tables[idx, prv], -np.inf)

    with np.errstate(invalid="ignore"):
        s = int(w.sum())
        while s < total:
            u = up(w)
            j = int(np.argmin(u))
            if not np.isfinite(u[j]):
                return None
            w[j] += 1
            s += 1
        while s > total:
            dn = down(w)
            i = int(np.argmax(dn))
            if not np.isfinite(dn[i]):
                return None
            w[i] -= 1
            s -= 1
        for _ in range(4 * X * M + 10):
            u = up(w)
            u[np.isnan(u)] = np.inf
            dn = down(w)
            dn[np.isnan(dn)] = -np.inf
            j = int(np.argmin(u))
            i = int(np.argmax(dn))
            if i == j or not (np.isfinite(u[j]) and np.isfinite(dn[i])) \
                    or not u[j] < dn[i] - 1e-12 * max(1.0, abs(dn[i])):
                break
            w[i] -= 1
            w[j] += 1
    return w



def _class_curve(tables: list[np.ndarray]) -> tuple[int, np.ndarray, list[np.ndarray]]:
    """Greedy optimum of sum_m table_m(w_m) for every total t, for convex tables.

    Returns (t_min, F[t - t_min], per-device sorted marginal lists) so allocations can be rebuilt.
    """
    if not tables:
        return 0, np.zeros(1), []
    mins, base = [], 0.0
    margs, owners = [], []
    for m, t in enumerate(tables):
        fin = np.flatnonzero(np.isfinite(t))
        if fin.size == 0:
            return 0, np.full(1, np.inf), []
        lo, hi = int(fin[0]), int(fin[-1])
        mins.append(lo)
        base += float(t[lo])
        d = np.diff(t[lo:hi + 1])
        margs.append(d)
        owners.append(np.full(d.size, m))
    allm = np.concatenate(margs) if margs else np.zeros(0)
    own = np.concatenate(owners) if owners else np.zeros(0, np.int64)
    order = np.argsort(allm, kind="stable")
    F = base + np.r_[0.0, np.cumsum(allm[order])]
    return sum(mins), F, [np.asarray(mins), own[order]]


def _class_alloc(meta: list[np.ndarray], extra: int) -> np.ndarray:
    mins, owners = meta
    w = mins.copy()
    np.add.at(w, owners[:extra], 1)
    return w



@lru_cache(maxsize=64)
def _partial_reach(q: int, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Which (lt, lg) a device can have when the partial lap ends in its window (q full laps):
    lt = q*w + r with 1 <= r <= w, lg = q*n + min(n, r), 0 <= n <= w. Returns a mask over
    (lt, lg) and one (w, r, n) realising each pair."""
    w = np.arange(1, L + 1)[:, None, None]
    r = np.arange(1, L + 1)[None, :, None]
    n = np.arange(0, L + 1)[None, None, :]
    shape = (L, L, L + 1)
    lt = np.broadcast_to(q * w + r, shape)
    lg = np.broadcast_to(q * n + np.minimum(n, r), shape)
    ok = np.broadcast_to((r <= w) & (n <= w) & (q * w + r <= L), shape)
    mask = np.zeros((L + 1, L + 1), bool)
    W_ = np.zeros((L + 1, L + 1), np.int64)
    R_ = np.zeros_like(W_)
    N_ = np.zeros_like(W_)
    lt_b, lg_b = lt[ok], lg[ok]
    mask[lt_b, lg_b] = True
    W_[lt_b, lg_b] = np.broadcast_to(w, shape)[ok]
    R_[lt_b, lg_b] = np.broadcast_to(r, shape)[ok]
    N_[lt_b, lg_b] = np.broadcast_to(n, shape)[ok]
    return mask, W_, R_, N_



def _ring(cluster: ClusterSpec) -> list[str]:
    """Device names in ring order starting at the head (the listing order is the ring)."""
    names = cluster.names
    h = names.index(cluster.head)
    return names[h:] + names[:h]



_BANNER_DONE = False


class _NoJax:
    """A meta-path finder that hides jax while cvxpy is first imported (see `cvxpy`)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "jax" or name.startswith("jax."):
            raise ModuleNotFoundError("jax is hidden from cvxpy's solver probe", name=name)


def cvxpy() -> Any:
    """cvxpy, imported lazily (~1 s: only when a problem is built; a baseline's plan never is) and
    without jax: cvxpy probes every solver interface at import and its MPAX probe imports jax
    (~1-2 s, ~200 MB) for a solver Halda never uses, so planning-only commands would load jax."""
    if "cvxpy" not in sys.modules and "jax" not in sys.modules:
        hide = _NoJax()
        sys.meta_path.insert(0, hide)
        try:
            import cvxpy as cp
        finally:
            sys.meta_path.remove(hide)
        return cp
    import cvxpy as cp

    return cp


def quiet_highs() -> None:
    """highspy prints its banner to stdout when the first Highs object of a process is made (CVXPY
    makes one per solve); make that first one here with stdout pointed at /dev/null, so that
    ``primasim plan --json`` prints only JSON and a command's stderr carries only its own messages."""
    global _BANNER_DONE
    if _BANNER_DONE:
        return
    _BANNER_DONE = True
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def check_k_and_priority(k: int | None, L: int, general: bool, master_priority: float) -> None:
    """Both Halda planners' argument checks: k a whole number of laps in [1, L] (dividing L unless
    `general`), the head's priority a positive finite number."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > L):
        raise SpecError(f"k must be an integer in [1, {L}], got {k!r}", where="--k",
                        fix="pick a number of laps that divides the layer count (or use --general)")
    if k is not None and not general and L % k:
        raise SpecError(f"k = {k} does not divide L = {L}", where="--k",
                        fix="pick a divisor of the layer count or add --general (partial last lap)")
    if not (master_priority > 0 and math.isfinite(master_priority)):
        raise SpecError(f"master_priority must be positive, got {master_priority}", where="master_priority",
                        fix="use e.g. 1.01")


def _split_partial(cp_: np.ndarray, tabA: list[np.ndarray], tabB: list[np.ndarray], L: int,
                   q: int) -> tuple[int, np.ndarray, np.ndarray] | None:
    """The exact split of a general block (q full laps and a partial one ending inside device p's
    window) given p's cost per total (`cp_`, inf where unreachable) and the cost tables of the
    devices before p (q + 1 windows each) and after it (q windows): p's total and both classes'
    windows, cheapest in sum (class curves); None when no split reaches L."""
    a0, FA, metaA = _class_curve(tabA)
    b0, FB, metaB = _class_curve(tabB)
    lp = np.flatnonzero(np.isfinite(cp_))
    if lp.size == 0 or not np.isfinite(FA).any() or not np.isfinite(FB).any():
        return None
    At = a0 + np.arange(FA.size)
    rem = L - lp[:, None] - (q + 1) * At[None, :]
    if tabB:
        okB = (rem >= q * b0) & (rem % q == 0) & (rem // q - b0 < FB.size)
        idxB = np.where(okB, rem // q - b0, 0)
        tot = np.where(okB, cp_[lp][:, None] + FA[None, :] + FB[idxB], np.inf)
    else:
        tot = np.where(rem == 0, cp_[lp][:, None] + FA[None, :], np.inf)
    if not np.isfinite(tot).any():
        return None
    i, j = np.unravel_index(int(np.argmin(tot)), tot.shape)
    wa = _class_alloc(metaA, int(j)) if tabA else np.zeros(0, np.int64)
    wb = _class_alloc(metaB, int(rem[i, j] // q - b0)) if tabB else np.zeros(0, np.int64)
    return int(lp[i]), wa, wb


def _placed(M: int, classes: list[tuple[list[int], np.ndarray, list[int]]]) -> tuple[np.ndarray, np.ndarray]:
    """Windows and GPU layers of M devices from (devices, their windows, their GPU layers) per class."""
    w = np.zeros(M, np.int64)
    n = np.zeros(M, np.int64)
    for devs, wins, gpu in classes:
        w[devs], n[devs] = wins, gpu
    return w, n
