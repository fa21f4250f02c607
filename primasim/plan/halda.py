"""Halda: prima.cpp's layer-to-device allocation (Algorithm 1 + device selection).

The outer loop follows prima.cpp's code path (reference prima-cpp.md §2.2-2.3): initialise the
windows proportionally to the memory budgets, assign devices to the sets M1..M4, solve one
fixed-k subproblem per valid k, calibrate (force the slowest-disk overloaded device into M4 while a
GPU has free memory), roll back when no k is feasible, and finally drop devices that got only one
layer and re-run.

The fixed-k subproblem ("block") is an integer linear program in the windows w and GPU layers n.
It is solved in one of two ways:

- ``solver="relax"`` (default): the LP relaxations of *all* blocks of an iteration are stacked into
  one CVXPY problem (independent blocks, so the sum of their objectives is minimised block by
  block), built once per shape with Parameters (DPP) and re-solved with HiGHS. Each block's
  fractional solution is then rounded, repaired to feasibility and improved by unit exchanges of
  layers between devices. With every device's cost convex in its window (the best n for a given w
  is an end point of an interval whose ends are linear in w, see ``_device_table``) and one sum
  constraint, a point no exchange improves is optimal (separable convex resource allocation), so
  the rounded solution is the block's integer optimum; the LP supplies the starting point, the
  infeasibility test (penalised slacks) and a lower bound.
- ``solver="exact"``: every block as a CVXPY integer program solved by HiGHS's MIP solver (what
  prima.cpp does in C++), also built once per shape with Parameters.

Options beyond prima.cpp (both default off, as in prima.cpp): ``comm=True`` adds the per-hop
communication time to the cost, ``general=True`` drops L = k*W: a block is then (q, p), q full
laps plus a partial lap that ends inside device p's window (reference Appendix A.3).

Longer than ~600 lines: prima.cpp's loop is one algorithm (blocks, each block's LP stack or MILP,
rounding, calibration, rounds, device selection) kept in one file so it reads side by side with
prima.cpp's source; Halda as one optimisation model lives in halda_model/halda_relax/halda_global.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from primasim.core.cluster import ClusterSpec
from primasim.core.errors import PlanError, SpecError
from primasim.core.model import ModelSpec
from primasim.core.plan import DevicePlan, Plan, violations

from .cost import Corrections, CostModel, totals_of
from .halda_common import (
    HaldaResult,
    _Block,
    _exchange,
    _partial_reach,
    _placed,
    _ring,
    _split_partial,
    check_k_and_priority,
    cvxpy,
    quiet_highs,
)
from .halda_global import halda_model

EPS = 1e-7  # integrality tolerance on the constraint rows (HiGHS's feasibility tolerance)


# ------------------------------------------------------------------------------ blocks
def _blocks(L: int, M: int, k_fixed: int | None, general: bool) -> list[_Block]:
    if k_fixed is not None:
        ks = [k_fixed]
    elif general:
        ks = list(range(1, math.ceil(L / M) + 1))
    else:
        # prima.cpp: the factors of L up to L/2 (W >= M since every window >= 1); k = 1 always
        ks = [k for k in range(1, max(1, L // 2) + 1) if L % k == 0 and L // k >= M] or [1]
    out = []
    for k in ks:
        if L % k == 0 and L // k >= M:
            out.append(_Block(k, k, -1, (k,) * M))
        if general and k >= 2:
            q = k - 1
            for p in range(M):
                mult = tuple(q + 1 if m < p else q for m in range(M))
                if sum(mult) + 1 <= L:
                    out.append(_Block(k, q, p, mult))
    return out


@dataclass
class _Sol:
    block: _Block
    w: np.ndarray
    n: np.ndarray
    r: int = 0  # layers of the partial window (general blocks)
    objective: float = math.inf  # weighted (head priority) model objective, s
    bound: float = -math.inf  # LP lower bound

    def totals(self, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return totals_of(self.w, self.n, L)


# ------------------------------------------------------------------------------ per-device integer structure
def _device_table(mult: int, a: float, b: float, g_lo: float, D_lo: float, g_up: float, D_up: float,
                  gcap: float, L: int, wlo: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Cost (mult*(a w + b n*(w))) and best n*(w) for w = 0..L on a device of a block.

    Rows in total-layer units: lt - g_lo*lg >= D_lo, lt - g_up*lg <= D_up, lg <= gcap, 0 <= n <= w,
    with lt = mult*w, lg = mult*n. Infeasible w get cost +inf. For fixed w the feasible n form an
    interval [nlo(w), nhi(w)] with nlo convex and nhi concave in w, and the cost is linear in n, so
    the best n is an end point and the cost is convex in w.
    """
    w = np.arange(L + 1, dtype=np.int64)
    gi = math.floor(gcap / mult + EPS) if math.isfinite(gcap) else L
    nhi = np.minimum(w, gi)
    nlo = np.zeros_like(w)
    ok = w >= wlo
    if math.isfinite(D_lo):
        lo_w = math.ceil(D_lo / mult - EPS)
        if g_lo:
            nhi = np.minimum(nhi, w - lo_w)
        ok &= w >= lo_w
    if math.isfinite(D_up):
        up_w = math.floor(D_up / mult + EPS)
        if g_up:
            nlo = np.maximum(nlo, w - up_w)
        else:
            ok &= w <= up_w
    ok &= nlo <= nhi
    nbest = nhi if b < 0 else nlo
    cost = np.where(ok, mult * (a * w + b * nbest), np.inf)
    return cost, np.where(ok, nbest, 0)


def _partial_table(q: int, a: float, b: float, g_lo: float, D_lo: float, g_up: float, D_up: float,
                   gcap: float, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best (cost, w, r, n) per total lt = q*w + r (1 <= r <= w) of the device whose window the
    partial lap ends in; its GPU layers are lg = q*n + min(n, r) (first n of every window)."""
    W = np.arange(1, L + 1)[:, None]
    R = np.arange(1, L + 1)[None, :]
    lt = q * W + R
    ok = (R <= W) & (lt <= L)
    lghi = np.minimum(lt, math.floor(gcap + EPS) if math.isfinite(gcap) else L)
    lglo = np.zeros_like(lt)
    if math.isfinite(D_lo):
        if g_lo:
            lghi = np.minimum(lghi, np.floor(lt - D_lo + EPS).astype(np.int64))
        else:
            ok &= lt >= math.ceil(D_lo - EPS)
    if math.isfinite(D_up):
        if g_up:
            lglo = np.maximum(lglo, np.ceil(lt - D_up - EPS).astype(np.int64))
        else:
            ok &= lt <= math.floor(D_up + EPS)
    knee = (q + 1) * R  # lg at n = r

    def lg_of(n: np.ndarray) -> np.ndarray:
        return q * n + np.minimum(n, R)

    if b < 0:  # as many GPU layers as allowed
        n = np.where(lghi >= knee, R + np.floor_divide(lghi - knee, q), np.floor_divide(lghi, q + 1))
        n = np.minimum(n, W)
        ok &= (n >= 0) & (lg_of(n) >= lglo)
    else:
        n = np.where(lglo <= knee, -np.floor_divide(-lglo, q + 1), R + -np.floor_divide(-(lglo - knee), q))
        n = np.maximum(n, 0)
        ok &= (n <= W) & (lg_of(n) <= lghi)
    cost = np.where(ok, a * lt + b * lg_of(n), np.inf)
    best = np.full(L + 1, np.inf)
    bw = np.zeros(L + 1, np.int64)
    br = np.zeros(L + 1, np.int64)
    bn = np.zeros(L + 1, np.int64)
    if ok.any():
        li, ci = lt[ok], cost[ok]
        order = np.lexsort((ci, li))
        li, ci = li[order], ci[order]
        first = np.r_[True, li[1:] != li[:-1]]
        wi = np.broadcast_to(W, lt.shape)[ok][order][first]
        ri = np.broadcast_to(R, lt.shape)[ok][order][first]
        ni = n[ok][order][first]
        best[li[first]] = ci[first]
        bw[li[first]], br[li[first]], bn[li[first]] = wi, ri, ni
    return best, bw, br, bn


# ------------------------------------------------------------------------------ CVXPY problems (built once)
_LP_CACHE: dict[tuple[int, int], _LPStack] = {}
_MILP_CACHE: dict[int, _MILPBlock] = {}


def _bucket(x: int) -> int:
    """Round shapes up so a handful of compiled problems serve every cluster size."""
    for b in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256):
        if x <= b:
            return b
    return int(2 ** math.ceil(math.log2(x)))


_MAT = ("cw", "cn", "mult", "ep", "alo_n", "aup_n", "alo_g", "aup_g", "Dlo", "Dup", "wlo", "whi", "G")
_VEC = ("cr", "cg", "rlo", "rhi", "Lp", "pen")


class _LPStack:
    """K stacked LP relaxations of fixed-k blocks over M device columns, as one DPP problem.

    All data live in two Parameters (sliced per role): CVXPY validates every Parameter it is given
    a value for, and with one Parameter per role that alone took ~1.3 ms per solve."""

    def __init__(self, K: int, M: int) -> None:
        cp = cvxpy()

        self.K, self.M = K, M
        w, n = cp.Variable((K, M), name="w"), cp.Variable((K, M), name="n")
        r, g = cp.Variable(K, name="r"), cp.Variable(K, name="g")
        slo, sup = cp.Variable((K, M), nonneg=True), cp.Variable((K, M), nonneg=True)
        self.A = cp.Parameter((K, len(_MAT) * M), name="A")
        self.B = cp.Parameter((K, len(_VEC)), name="B")
        P: dict[str, Any] = {nm: self.A[:, i * M:(i + 1) * M] for i, nm in enumerate(_MAT)}
        P.update({nm: self.B[:, j] for j, nm in enumerate(_VEC)})
        ones = np.ones((1, M))
        Rb = cp.reshape(r, (K, 1), order="F") @ ones
        Gb = cp.reshape(g, (K, 1), order="F") @ ones
        lw = cp.multiply(P["mult"], w) + cp.multiply(P["ep"], Rb)
        cons = [
            cp.sum(cp.multiply(P["mult"], w), axis=1) + r == P["Lp"],
            lw + cp.multiply(P["alo_n"], n) + cp.multiply(P["alo_g"], Gb) + slo >= P["Dlo"],
            lw + cp.multiply(P["aup_n"], n) + cp.multiply(P["aup_g"], Gb) - sup <= P["Dup"],
            cp.multiply(P["mult"], n) + cp.multiply(P["ep"], Gb) <= P["G"],
            w >= P["wlo"], w <= P["whi"], n >= 0, n <= w,
            r >= P["rlo"], r <= P["rhi"], g >= 0, g <= r,
            cp.sum(cp.multiply(P["ep"], w), axis=1) >= r,
            cp.sum(cp.multiply(P["ep"], n), axis=1) >= g,
        ]
        slack = cp.sum(slo, axis=1) + cp.sum(sup, axis=1)
        obj = (cp.sum(cp.multiply(P["cw"], w)) + cp.sum(cp.multiply(P["cn"], n)) + P["cr"] @ r + P["cg"] @ g
               + P["pen"] @ slack)
        self.prob = cp.Problem(cp.Minimize(obj), cons)
        assert self.prob.is_dpp()
        self.w, self.n, self.r, self.g, self.slo, self.sup = w, n, r, g, slo, sup
        self.last_values: dict[str, Any] = {}

    def load(self, values: dict[str, Any]) -> None:
        """Set the data: (K, M) arrays for the matrix roles, length-K vectors (or scalars) for the rest."""
        K = self.K
        self.A.value = np.hstack([np.broadcast_to(np.asarray(values[nm], float), (K, self.M)) for nm in _MAT])
        self.B.value = np.column_stack([np.broadcast_to(np.asarray(values[nm], float), (K,)) for nm in _VEC])
        self.last_values = values

    def solve(self, values: dict[str, Any], solver: str = "HIGHS") -> None:
        cp = cvxpy()

        self.load(values)
        self.prob.solve(solver=getattr(cp, solver))
        if self.prob.status not in ("optimal", "optimal_inaccurate"):
            raise PlanError(f"LP relaxation failed with status {self.prob.status}", where="halda",
                            fix="report this instance; try --solver exact")


class _MILPBlock:
    """One fixed-k (or (q, p)) block as a DPP integer program (HiGHS MIP via CVXPY)."""

    def __init__(self, M: int) -> None:
        cp = cvxpy()

        self.M = M
        w, n = cp.Variable(M, integer=True, name="w"), cp.Variable(M, integer=True, name="n")
        r, g = cp.Variable(integer=True, name="r"), cp.Variable(integer=True, name="g")
        zb = cp.Variable(boolean=True, name="zb")
        P = {nm: cp.Parameter(M, name=nm) for nm in
             ("cw", "cn", "mult", "ep", "alo_n", "aup_n", "alo_g", "aup_g", "Dlo", "Dup", "wlo", "whi")}
        P["G"] = cp.Parameter(M, nonneg=True, name="G")
        for nm in ("cr", "cg", "rlo", "rhi", "Lp", "bigM"):
            P[nm] = cp.Parameter(name=nm)
        lw = cp.multiply(P["mult"], w) + P["ep"] * r
        np_ = P["ep"] @ n
        cons = [
            P["mult"] @ w + r == P["Lp"],
            lw + cp.multiply(P["alo_n"], n) + P["alo_g"] * g >= P["Dlo"],
            lw + cp.multiply(P["aup_n"], n) + P["aup_g"] * g <= P["Dup"],
            cp.multiply(P["mult"], n) + P["ep"] * g <= P["G"],
            w >= P["wlo"], w <= P["whi"], n >= 0, n <= w,
            r >= P["rlo"], r <= P["rhi"], g >= 0, g <= r, P["ep"] @ w >= r, np_ >= g,
            # g = min(n_p, r): the partial window's first min(n_p, r) layers run on the GPU
            g >= np_ - P["bigM"] * zb, g >= r - P["bigM"] + P["bigM"] * zb,
        ]
        obj = P["cw"] @ w + P["cn"] @ n + P["cr"] * r + P["cg"] * g
        self.prob = cp.Problem(cp.Minimize(obj), cons)
        assert self.prob.is_dpp()
        self.P, self.w, self.n, self.r, self.g = P, w, n, r, g

    def solve(self, values: dict[str, Any]) -> bool:
        cp = cvxpy()

        for k, v in values.items():
            self.P[k].value = v
        try:
            # a reference must be optimal, not within HiGHS's default 0.01 % MIP gap
            self.prob.solve(solver=cp.HIGHS, mip_rel_gap=0.0, mip_abs_gap=0.0)
        except cp.error.SolverError:
            return False
        return self.prob.status in ("optimal", "optimal_inaccurate")


# ------------------------------------------------------------------------------ block data
class _Data:
    """Per-iteration numbers shared by the LP, the MILP and the rounding."""

    def __init__(self, cm: CostModel, sets: Sequence[str], priority: float) -> None:
        coef = cm.coefficients(sets)
        self.coef = coef
        self.a_true = coef.a.copy()
        self.a = coef.a.copy()
        self.a[cm.head] /= priority  # prima.cpp: cost of w_0 divided by master_priority
        self.b = coef.b
        self.c = coef.c
        self.kappa = coef.kappa
        self.g_lo, self.D_lo, self.g_up, self.D_up = cm.rows(sets)
        self.G = cm.gpu_cap
        self.L, self.M = cm.L, cm.M
        # finite stand-ins for the solvers (an inactive row must hold for any window)
        self.D_lo_f = np.where(np.isfinite(self.D_lo), self.D_lo, -1.0)
        self.D_up_f = np.where(np.isfinite(self.D_up), self.D_up, 2.0 * cm.L + 1)
        self.G_f = np.minimum(self.G, 2.0 * cm.L)

    def objective(self, lt: np.ndarray, lg: np.ndarray, windows: np.ndarray, *, weighted: bool = True) -> float:
        a = self.a if weighted else self.a_true
        return float(a @ lt + self.b @ lg + self.c @ windows + self.kappa)

    def constant(self, blk: _Block) -> float:
        win = np.array([blk.q + 1 if (blk.p >= 0 and m <= blk.p) else blk.q for m in range(self.M)])
        return float(self.c @ win + self.kappa)


def _param_rows(d: _Data, blk: _Block, Mb: int) -> dict[str, Any]:
    """Parameter values of one block, padded to Mb device columns."""
    M, L = d.M, d.L
    z = np.zeros(Mb)

    def pad(x: np.ndarray, fill: float = 0.0) -> np.ndarray:
        out = np.full(Mb, fill)
        out[:M] = x
        return out

    mult = z.copy()
    mult[:M] = blk.mult
    ep = z.copy()
    if blk.p >= 0:
        ep[blk.p] = 1.0
    g_lo, g_up = pad(d.g_lo), pad(d.g_up)
    part = blk.p >= 0
    return {
        "cw": pad(d.a) * mult, "cn": pad(d.b) * mult,
        "cr": float(d.a[blk.p]) if part else 0.0, "cg": float(d.b[blk.p]) if part else 0.0,
        "mult": mult, "ep": ep, "alo_n": -g_lo * mult, "aup_n": -g_up * mult,
        "alo_g": -g_lo * ep, "aup_g": -g_up * ep, "Dlo": pad(d.D_lo_f, -1.0), "Dup": pad(d.D_up_f, 2.0 * L + 1),
        "G": pad(d.G_f), "wlo": pad(np.ones(M)), "whi": pad(np.full(M, float(L))),
        "rlo": 1.0 if part else 0.0, "rhi": float(L) if part else 0.0, "Lp": float(L),
    }


# ------------------------------------------------------------------------------ solving blocks
def _round_block(d: _Data, blk: _Block, w_lp: np.ndarray | None) -> _Sol | None:
    """Integer optimum of a block from its LP solution (round, repair, exchange; see module doc)."""
    M, L = d.M, d.L
    if blk.closed:
        k = blk.k
        tabs, nb = zip(*(_device_table(k, d.a[m], d.b[m], d.g_lo[m], d.D_lo[m], d.g_up[m], d.D_up[m], d.G[m], L)
                         for m in range(M)))
        T = np.vstack(tabs)
        if not np.isfinite(T).any(axis=1).all():
            return None
        Wt = L // k
        fin = np.isfinite(T)
        lo = fin.argmax(axis=1)
        hi = L - fin[:, ::-1].argmax(axis=1)
        if lo.sum() > Wt or hi.sum() < Wt:
            return None
        start = np.clip(np.rint(w_lp).astype(np.int64) if w_lp is not None else lo, lo, hi)
        w = _exchange(T, start, Wt)
        if w is None:
            return None
        n = np.array([nb[m][w[m]] for m in range(M)])
        sol = _Sol(blk, w, n)
    else:
        q, p = blk.q, blk.p
        cp_, bw, br, bn = _partial_table(q, d.a[p], d.b[p], d.g_lo[p], d.D_lo[p], d.g_up[p], d.D_up[p], d.G[p], L)
        A = [m for m in range(M) if m < p]
        B = [m for m in range(M) if m > p]
        tabA = [_device_table(q + 1, d.a[m], d.b[m], d.g_lo[m], d.D_lo[m], d.g_up[m], d.D_up[m], d.G[m], L) for m in A]
        tabB = [_device_table(q, d.a[m], d.b[m], d.g_lo[m], d.D_lo[m], d.g_up[m], d.D_up[m], d.G[m], L) for m in B]
        split = _split_partial(cp_, [t for t, _ in tabA], [t for t, _ in tabB], L, q)
        if split is None:
            return None
        lsel, wa, wb = split
        w, n = _placed(M, [(A, wa, [tabA[x][1][wa[x]] for x in range(len(A))]),
                           (B, wb, [tabB[x][1][wb[x]] for x in range(len(B))])])
        w[p], n[p] = bw[lsel], bn[lsel]
        sol = _Sol(blk, w, n, int(br[lsel]))
    lt, lg, win = sol.totals(L)
    if int(lt.sum()) != L:  # defensive: the block structure guarantees this
        return None
    sol.objective = d.objective(lt, lg, win)
    return sol


def _cost_scale(d: _Data) -> float:
    """Objective scale for the solvers: the largest per-layer cost becomes 1. In seconds, GPU-vs-GPU
    differences (1e-8 s) would sit below HiGHS's 1e-7 optimality tolerance (prima.cpp uses ms)."""
    top = float(np.max(np.abs(np.r_[d.a, d.b]))) if d.M else 0.0
    return 1.0 / top if top > 0 else 1.0


def _solve_relax(d: _Data, blocks: list[_Block]) -> list[_Sol | None]:
    if not blocks:
        return []
    quiet_highs()
    Kb, Mb = _bucket(len(blocks)), _bucket(d.M)
    key = (Kb, Mb)
    if key not in _LP_CACHE:
        _LP_CACHE[key] = _LPStack(Kb, Mb)
    lp = _LP_CACHE[key]
    rows = [_param_rows(d, blk, Mb) for blk in blocks]
    rows += [rows[0]] * (Kb - len(blocks))  # padding blocks repeat block 0 (ignored)
    vals: dict[str, Any] = {}
    for nm in rows[0]:
        vals[nm] = np.array([r[nm] for r in rows], dtype=float)
    sc = _cost_scale(d)
    for nm in ("cw", "cn", "cr", "cg"):
        vals[nm] = vals[nm] * sc
    vals["pen"] = 100.0 * max(blk.k for blk in blocks)  # exact penalty: above any dual (costs scaled to <= 1)
    lp.solve(vals)
    W, S1, S2 = lp.w.value, lp.slo.value, lp.sup.value
    obj_rows = ((vals["cw"] * W + vals["cn"] * lp.n.value).sum(axis=1) + vals["cr"] * lp.r.value
                + vals["cg"] * lp.g.value) / sc
    out: list[_Sol | None] = []
    for j, blk in enumerate(blocks):
        if S1[j].sum() + S2[j].sum() > 1e-6:
            out.append(None)  # LP relaxation infeasible -> so is the integer block
            continue
        sol = _round_block(d, blk, W[j, :d.M])
        if sol is not None:
            sol.bound = float(obj_rows[j]) + d.constant(blk)
        out.append(sol)
    return out


def _solve_exact(d: _Data, blocks: list[_Block]) -> list[_Sol | None]:
    quiet_highs()
    Mb = _bucket(d.M)
    if Mb not in _MILP_CACHE:
        _MILP_CACHE[Mb] = _MILPBlock(Mb)
    mp = _MILP_CACHE[Mb]
    out: list[_Sol | None] = []
    sc = _cost_scale(d)
    for blk in blocks:
        vals = _param_rows(d, blk, Mb)
        for nm in ("cw", "cn", "cr", "cg"):
            vals[nm] = vals[nm] * sc
        vals["bigM"] = float(d.L)
        if not mp.solve(vals):
            out.append(None)
            continue
        w = np.rint(mp.w.value[:d.M]).astype(np.int64)
        n = np.rint(mp.n.value[:d.M]).astype(np.int64)
        sol = _Sol(blk, w, n, int(round(float(mp.r.value))))
        lt, lg, win = sol.totals(d.L)
        sol.objective = d.objective(lt, lg, win)
        sol.bound = float(mp.prob.value) / sc + d.constant(blk)
        out.append(sol)
    return out


# ------------------------------------------------------------------------------ the algorithm
def _init_split(cm: CostModel, revision: str = "head") -> tuple[np.ndarray, np.ndarray]:
    """prima.cpp's start: w proportional to the memory budgets (sum L); n = w on GPU devices
    ("assume all layers can run on GPU", HEAD) or n = 0 (v1, commit f97a9700, the code of the
    paper's Table 4)."""
    L, M = cm.L, cm.M
    budget = np.maximum(cm.budget, 0.0)
    if budget.sum() <= 0:
        budget = np.ones(M)
    w = np.rint(budget / budget.sum() * L).astype(np.int64)
    for m in np.flatnonzero(w == 0):  # no 0 is allowed in w: 1, taken from the largest window
        w[m] = 1
        j = int(np.argmax(w))
        if w[j] > 1:
            w[j] -= 1
    diff = L - int(w.sum())
    if diff > 0:
        w[int(np.argmax(budget))] += diff
    elif diff < 0:
        j = int(np.argmin(budget))
        if w[j] + diff < 1:  # prima.cpp would go below one layer here; take from the largest instead
            j = int(np.argmax(w))
        w[j] += diff
    n = np.where(cm.has_gpu, w, 0) if revision == "head" else np.zeros(M, np.int64)
    return w, n.astype(np.int64)


def _calibrate(d: _Data, sol: _Sol, sets: list[str], forced: np.ndarray, cm: CostModel, k_cur: int,
               revision: str = "head") -> int | None:
    """prima.cpp's check after a solve: the device to force into M4, or None.

    As in the code, "free GPU memory" compares the solution's n_m with floor(W * z_gpu_m), where W
    is the windows' sum of the iterate the solve started from (the loop's outer W), i.e. the GPU
    capacity in layers divided by that iterate's k, not by the solution's."""
    w, n = sol.w, sol.n
    weak = bool(np.any((w == 1) & (n == 0)))
    free_gpu = gpu_over = cpu_over = False
    for m in range(d.M):
        if cm.has_gpu[m]:
            free = n[m] < math.floor(d.G[m] / k_cur + EPS)
            free_gpu |= free
            if w[m] > n[m] and (revision == "head" or not free):  # v1 tested it only without free VRAM
                gpu_over = True
        elif sets[m] != "M4":
            cpu_over = True
    if weak or not free_gpu or not (gpu_over or cpu_over):
        return None
    cand = [m for m in range(d.M) if sets[m] != "M4"]
    if not cand:
        return None
    return min(cand, key=lambda m: cm.disk[m])


@dataclass
class _Round:
    sol: _Sol | None
    sets: list[str]
    iterations: int
    candidates: list[_Sol]
    last: _Sol | None
    notes: list[str]
    trace: list[str] = field(default_factory=list)


def _halda_round(cm: CostModel, *, k: int | None, solver: str, general: bool, priority: float,
                 revision: str = "head") -> _Round:
    """Algorithm 1 on one device list, as prima.cpp's ``assign_layers_to_device`` does it: from the
    memory-ratio start, assign sets, solve every valid k, calibrate, accept, until the sets or the
    solution stop changing; the answer is the last accepted solution (or the rollback)."""
    L, M = cm.L, cm.M
    blocks = _blocks(L, M, k, general)
    notes: list[str] = []
    if not blocks:
        return _Round(None, [], 0, [], None, [f"no valid k for L={L} on {M} devices"])
    w, n = _init_split(cm, revision)
    forced = np.zeros(M, bool)
    prev_sets: list[str] | None = None
    final: _Sol | None = None
    final_sets: list[str] = []
    final_cands: list[_Sol] = []
    rollback: tuple[_Sol, list[str], list[_Sol]] | None = None
    it = 0
    solve = _solve_relax if solver == "relax" else _solve_exact
    trace: list[str] = []
    while it < 4 * M + 16:  # prima.cpp has no cap; the sets or the solution repeat long before
        lt, lg, _ = totals_of(w, n, L)
        k_cur = max(1, L // max(1, int(np.sum(w))))
        sets = cm.sets(lt, lg, forced)
        if sets == prev_sets:  # converged: the set assignment no longer changes
            break
        prev_sets = sets
        it += 1
        d = _Data(cm, sets, priority)
        sols = solve(d, blocks)
        feas = [s for s in sols if s is not None]
        if not feas:
            notes.append(f"iteration {it}: no k feasible for sets {sets}; rolled back")
            if rollback is not None:
                final, final_sets, final_cands = rollback
            break  # prima.cpp: roll back to the previous iteration's best
        best = min(feas, key=lambda s: s.objective)
        per_k: dict[int, _Sol] = {}
        for s in feas:
            if s.block.k not in per_k or s.objective < per_k[s.block.k].objective:
                per_k[s.block.k] = s
        cands = sorted(per_k.values(), key=lambda s: s.block.k)
        rollback = (best, sets, cands)
        trace.append(f"iteration {it}: k={k_cur} sets {' '.join(sets)} -> k={best.block.k} w={best.w.tolist()} "
                     f"n={best.n.tolist()} objective {best.objective * 1e3:.1f} ms")
        dev = _calibrate(d, best, sets, forced, cm, k_cur, revision)
        if dev is not None:
            # free VRAM while something is overloaded: force the slowest-disk overloaded device to
            # fit in memory and re-solve from the same (w, n)
            forced[dev] = True
            notes.append(f"iteration {it}: calibration forced {cm.names[dev]} into M4")
            trace.append(notes[-1])
            continue
        unchanged = final is not None and final.block == best.block and np.array_equal(final.w, best.w) \
            and np.array_equal(final.n, best.n)
        w, n = best.w, best.n
        final, final_sets, final_cands = best, sets, cands
        if unchanged:
            break
    if final is None:
        return _Round(None, prev_sets or [], it, [], None, notes, trace)
    return _Round(final, final_sets, it, final_cands, final, notes, trace)


# ------------------------------------------------------------------------------ beyond prima.cpp: global optimum
def _global_block(cm: CostModel, blk: _Block, priority: float, select: bool = True) -> _Sol | None:
    """Exact optimum of one block over *all* set assignments: per-device exact cost tables over
    total layers (min over GPU layers), then dynamic programming over devices (min-plus
    convolution), O(M L^2). No set iteration, so no device is ever locked into an overloaded set.
    Non-head devices may get no layers at all (then they leave the ring and cost nothing)."""
    L, M = cm.L, cm.M
    tabs = np.full((M, L + 1), np.inf)
    rep_w = np.zeros((M, L + 1), np.int64)
    rep_n = np.zeros((M, L + 1), np.int64)
    rep_r = np.zeros((M, L + 1), np.int64)
    idx = np.arange(L + 1)
    for m in range(M):
        if m == blk.p:
            mask, W_, R_, N_ = _partial_reach(blk.q, L)
            grid = cm.cost_grid(m, idx[:, None], idx[None, :], float(blk.q + 1), priority=priority)
            grid = np.where(mask, grid, np.inf)
            best_lg = np.argmin(grid, axis=1)
            tabs[m] = grid[idx, best_lg]
            rep_w[m], rep_r[m], rep_n[m] = W_[idx, best_lg], R_[idx, best_lg], N_[idx, best_lg]
        else:
            k = blk.mult[m]
            wmax = L // k
            w = np.arange(1, wmax + 1)[:, None]
            n = np.arange(0, wmax + 1)[None, :]
            grid = cm.cost_grid(m, k * w, k * n, float(k), priority=priority)
            grid = np.where(n <= w, grid, np.inf)
            bn = np.argmin(grid, axis=1)
            tabs[m, k * w[:, 0]] = grid[np.arange(wmax), bn]
            rep_w[m, k * w[:, 0]] = w[:, 0]
            rep_n[m, k * w[:, 0]] = bn
            if m != cm.head and (select or not np.isfinite(tabs[m]).any()):
                # a device may also stay out of the ring (no window, no hop): the cost model itself
                # selects devices, e.g. drops a weak one whose hop costs more than its layers save
                # (without selection only a device that cannot hold a window stays out)
                tabs[m, 0] = 0.0
    # DP: F[s] = best cost of devices 0..m holding s layers in total
    F = tabs[0].copy()
    choice = np.zeros((M, L + 1), np.int64)
    choice[0] = idx
    for m in range(1, M):
        G = np.full(L + 1, np.inf)
        arg = np.zeros(L + 1, np.int64)
        for x in np.flatnonzero(np.isfinite(tabs[m])):
            cand = F[: L + 1 - x] + tabs[m, x]
            better = cand < G[x:]
            G[x:] = np.where(better, cand, G[x:])
            arg[x:] = np.where(better, x, arg[x:])
        F, choice[m] = G, arg
    if not np.isfinite(F[L]):
        return None
    lt = np.zeros(M, np.int64)
    rest = L
    for m in range(M - 1, -1, -1):
        lt[m] = choice[m, rest]
        rest -= lt[m]
    rows = np.arange(M)
    sol = _Sol(blk, rep_w[rows, lt], rep_n[rows, lt], int(rep_r[blk.p, lt[blk.p]]) if blk.p >= 0 else 0)
    chk, _, _ = sol.totals(L)
    if not np.array_equal(chk, lt):  # the representative windows must reproduce the totals
        return None
    sol.objective = float(F[L]) + cm.head_time()
    sol.bound = sol.objective
    return sol


def _dp_blocks(L: int, M: int, k: int | None, general: bool) -> list[_Block]:
    """The dynamic programme's blocks: devices may hold nothing, so every window count is allowed."""
    ks = [k] if k is not None else [x for x in range(1, max(1, L // 2) + 1) if L % x == 0]
    out = []
    for kk in ks:
        if L % kk == 0:
            out.append(_Block(kk, kk, -1, (kk,) * M))
        if general and kk >= 2:
            q = kk - 1
            out += [_Block(kk, q, p, tuple(q + 1 if m < p else q for m in range(M))) for p in range(M)]
    return out


def _halda_round_global(cm: CostModel, *, k: int | None, general: bool, priority: float,
                        select: bool = True) -> _Round:
    blocks = _dp_blocks(cm.L, cm.M, k, general)
    sols = [s for s in (_global_block(cm, b, priority, select) for b in blocks) if s is not None]
    if not sols:
        return _Round(None, [], 1, [], None, ["no allocation fits (global optimisation)"])
    best = min(sols, key=lambda s: s.objective)
    per_k: dict[int, _Sol] = {}
    for s in sols:
        if s.block.k not in per_k or s.objective < per_k[s.block.k].objective:
            per_k[s.block.k] = s
    lt, lg, _ = best.totals(cm.L)
    return _Round(best, cm.sets(lt, lg), 1, sorted(per_k.values(), key=lambda s: s.block.k), best, [])


def _to_plan(sol: _Sol, names: Sequence[str], all_names: Sequence[str], model: ModelSpec, n_ctx: int,
             system: str, options: dict[str, Any]) -> Plan:
    win = {nm: (int(sol.w[i]), int(sol.n[i])) for i, nm in enumerate(names)}
    devs = tuple(DevicePlan(nm, *win.get(nm, (0, 0))) for nm in all_names)
    W = int(sol.w.sum())
    k = math.ceil(model.n_layers / W)
    return Plan(system=system, model=model.name, n_layers=model.n_layers, k=k, devices=devs, quant=model.quant,
                schedule="ring", weights="mmap", prefetch=True, n_ctx=n_ctx, options=dict(options))


def halda(model: ModelSpec, cluster: ClusterSpec, *, n_ctx: int = 1024, k: int | None = None,
          solver: Literal["relax", "exact", "dp"] = "relax", variant: Literal["code", "paper"] = "code",
          comm: bool = False, general: bool = False, select_devices: bool = True,
          master_priority: float = 1.01, corrections: Corrections | None = None,
          global_opt: bool = False, revision: Literal["head", "v1"] = "head") -> HaldaResult:
    """Halda: prima.cpp's own algorithm (default) or, with ``global_opt``, one optimisation model.

    - ``global_opt=False``: prima.cpp's Algorithm 1 as its code runs it (``assign_layers_to_device``
      + ``assign_layers_and_select_devices``, reference §2.2-2.3): memory-ratio start, set
      assignment, one integer program per valid k, calibration, rollback, the last accepted solution,
      then device selection (drop devices given one layer, re-run from scratch). ``solver``:
      ``"relax"`` (each block's LP relaxation + exact rounding) or ``"exact"`` (HiGHS MIP, what
      prima.cpp does). ``revision``: ``"head"`` (prima.cpp main, 2025-07) or ``"v1"`` (commit
      f97a9700, the code of the paper's Table 4: GPU layers start at 0, see docs/planning.md).
      Deviations, each in ``notes``: devices that cannot hold one layer are left out instead of
      aborting, and an infeasible device-selection re-run keeps the previous round.
    - ``global_opt=True``: beyond prima.cpp: minimise the cost model over windows, GPU layers, memory
      regimes and device selection at once (one optimisation model, primasim.plan.halda_model) instead
      of the set-assignment loop, which can lock a device into an overloaded set; devices may get
      no layers, so with ``comm=True`` the hop costs take part in device selection. ``solver``:
      ``"relax"`` (its relaxation + rounding, default), ``"exact"`` (its MILP, the global optimum)
      or ``"dp"`` (dynamic programming over devices per k, a cross-check of the exact optimum).
    - ``k``: fix the number of laps (prima.cpp ``-k``): honoured or refused (PlanError), never
      changed; default: every valid k (the model: k = 1, optimal when k is free).
    - ``variant``/``comm``: the cost model (see primasim.plan.cost); prima.cpp = ``"code"``, no comm.
    - ``general``: allow a partial last lap (W need not divide L).
    - ``select_devices``: device selection (the loop: prima.cpp's one-layer rule; the model: its
      own binaries); ``False`` keeps every device that can hold a window in the ring.
    - ``master_priority``: the head's per-layer cost is divided by it (prima.cpp default 1.01).
    - ``corrections``: ``{device name: DeviceCorrection(...) or dict}`` of measured coefficients
      (seconds per layer on CPU/GPU, effective disk bytes/s, seconds per hop, head seconds per
      token) that replace the analytic ones, so Halda re-plans with what the simulator (or the
      runtime) observed. See :class:`primasim.plan.cost.DeviceCorrection`.

    The plan lists every cluster device in ring order from the head; dropped devices get
    ``layers = 0``. ``objective`` is the plan's cost-model TPOT (as ``predict_tpot`` computes it
    for the same variant and comm).
    """
    t0 = time.perf_counter()
    if global_opt and solver in ("relax", "exact"):
        return halda_model(model, cluster, n_ctx=n_ctx, k=k, solver=solver, variant=variant, comm=comm,
                           general=general, select_devices=select_devices, master_priority=master_priority,
                           corrections=corrections)
    if solver not in ("relax", "exact", "dp") or (solver == "dp" and not global_opt):
        raise SpecError(f"unknown solver {solver!r}" + (" for prima.cpp's loop" if solver == "dp" else ""),
                        where="--solver", fix="use relax or exact (dp only with the global model)")
    check_k_and_priority(k, model.n_layers, general, master_priority)
    ring = _ring(cluster)
    L = model.n_layers
    head = ring[0]
    dropped: list[str] = []
    notes: list[str] = []
    trace: list[str] = []
    names = list(ring)
    if not global_opt and (len(names) > L or (k is not None and len(names) > (L if general else L // k))):
        limit = L if (k is None or general) else L // k
        ranked = sorted(names[1:], key=lambda nm: -cluster.device(nm).mem_budget)
        keep = set(ranked[:max(0, limit - 1)]) | {head}
        cut = [nm for nm in names if nm not in keep]
        names = [nm for nm in names if nm in keep]
        dropped += cut
        notes.append(f"{len(cut)} device(s) with the smallest memory budgets left out: every window needs >= 1 "
                     f"of {L} layers: {cut}")
    opts = {"planner": "halda-global" if global_opt else "halda", "solver": solver, "variant": variant,
            "comm": comm, "general": general, "master_priority": master_priority}
    if k is not None:
        opts["k_fixed"] = k
    if global_opt:  # the dynamic programme: one pass, it selects devices itself
        cm = CostModel(model, [cluster.device(nm) for nm in names], cluster.network, 0, n_ctx=n_ctx,
                       variant=variant, comm=comm,
                       corrections={nm: c for nm, c in (corrections or {}).items() if nm in names})
        rnd = _halda_round_global(cm, k=k, general=general, priority=master_priority, select=select_devices)
        if rnd.sol is None and cm.slow_disk.any():  # as the model does: let slow disks overflow too
            cm = copy.copy(cm)
            cm.slow_disk = np.zeros(cm.M, bool)
            rnd = _halda_round_global(cm, k=k, general=general, priority=master_priority, select=select_devices)
            notes.append("no plan keeps the slow-disk devices in memory (prima.cpp's M4 rule); they may overflow "
                         "here, at their disk speed")
        if rnd.sol is None:
            raise PlanError(f"no allocation of {model.name} on {cluster.name} fits the cost model's rules",
                            where="halda", fix="add memory (devices, RAM, VRAM), shorten the context (--n-ctx), "
                            "or use a smaller model")
        return _result(rnd, names, cm, ring, model, cluster, n_ctx, opts, notes + rnd.notes, dropped, 1, 1, t0)
    iterations = 0
    rounds = 0
    result: tuple[_Round, list[str], CostModel] | None = None
    while True:
        rounds += 1
        devs = [cluster.device(nm) for nm in names]
        cm = CostModel(model, devs, cluster.network, 0, n_ctx=n_ctx, variant=variant, comm=comm,
                       corrections={nm: c for nm, c in (corrections or {}).items() if nm in names})
        rnd = _halda_round(cm, k=k, solver=solver, general=general, priority=master_priority, revision=revision)
        iterations += rnd.iterations
        notes += rnd.notes
        trace.append(f"round {rounds} on {', '.join(names)}:")
        trace += ["  " + x for x in rnd.trace]
        if rnd.sol is None and result is None and len(names) > 1:
            # Beyond prima.cpp (which aborts): leave out the devices that cannot hold even one layer
            # (a slow disk with too little RAM, a KV cache that does not fit) and try again.
            can_host = [bool(np.isfinite(cm.cost_grid(i, np.array([1.0, 1.0]), np.array([0.0, 1.0]), 1.0)).any())
                        for i in range(len(names))]
            if not can_host[0]:
                raise PlanError(f"the head {head} cannot hold one layer plus the output layer: "
                                + ("its disk is slower than 0.1 GB/s, so prima.cpp requires it to fit in memory"
                                   if cm.slow_disk[0] else "its KV cache and buffers do not fit in RAM + swap"),
                                where="halda", fix="pick another head (--head) or give this device more memory")
            hopeless = [nm for i, nm in enumerate(names) if i > 0 and not can_host[i]]
            if hopeless:
                dropped += hopeless
                notes.append(f"no feasible allocation on {names}; left out {hopeless} (cannot hold one layer; "
                             "prima.cpp would abort) and retried")
                names = [nm for nm in names if nm not in hopeless]
                continue
        if rnd.sol is None:
            if result is not None:
                notes.append(f"round {rounds}: re-run on {names} infeasible; kept the previous round "
                             "(prima.cpp would stop with an error)")
            break
        result = (rnd, names, cm)
        if not select_devices:
            break
        # prima.cpp's device selection: drop every device given one layer (not the head) and re-run
        # Halda from scratch (memory-ratio start) on the survivors
        drop = [nm for i, nm in enumerate(names) if i > 0 and rnd.sol.w[i] <= 1]
        if not drop:
            break
        dropped += drop
        names = [nm for nm in names if nm not in drop]
    if result is None:
        reason = "; ".join(notes[-3:]) or "no feasible set assignment"
        raise PlanError(f"prima.cpp's Halda found no feasible allocation of {model.name} on {cluster.name}: {reason}",
                        where="halda", fix="add memory (devices, RAM, VRAM), shorten the context (--n-ctx), "
                        "use a smaller model, or use the global model (--planner global)")
    rnd, names, cm = result
    return _result(rnd, names, cm, ring, model, cluster, n_ctx, opts, notes, dropped, iterations, rounds, t0,
                   trace=trace)


def _result(rnd: _Round, names: list[str], cm: CostModel, ring: list[str], model: ModelSpec, cluster: ClusterSpec,
            n_ctx: int, opts: dict[str, Any], notes: list[str], dropped: list[str], iterations: int, rounds: int,
            t0: float, trace: list[str] | None = None) -> HaldaResult:
    sol = rnd.sol
    assert sol is not None
    L = model.n_layers
    plan = _to_plan(sol, names, ring, model, n_ctx, "prima", opts)
    lt, lg, win = sol.totals(L)
    act = lt > 0
    # the plan's cost as predict_tpot computes it: the cost model over the devices in the ring
    acm = cm if act.all() else CostModel(model, [cm.devices[i] for i in np.flatnonzero(act)], cluster.network, 0,
                                         n_ctx=n_ctx, variant=cm.variant, comm=cm.comm,
                                         corrections={k: v for k, v in cm.corrections.items()
                                                      if k in {names[i] for i in np.flatnonzero(act)}})
    objective = acm.tpot(lt[act], lg[act], win[act])
    dropped = dropped + [nm for i, nm in enumerate(names) if not act[i]]
    plan = plan.replace(predicted_tpot_ms=objective * 1e3,
                        notes=tuple(notes[-8:]) + ((f"dropped: {', '.join(dropped)}",) if dropped else ()))
    vs = violations(plan, model, cluster)
    if vs:
        raise PlanError("Halda produced an invalid plan: " + "; ".join(map(str, vs)), where="halda",
                        fix="shorten the context (--n-ctx) or add memory; this is a bug if the plan looks feasible")
    set_of = {nm: (s if act[i] else "-") for i, (nm, s) in enumerate(zip(names, rnd.sets))}
    sets_out = [set_of.get(nm, "-") for nm in ring]
    cands = [_to_plan(c, names, ring, model, n_ctx, "prima", opts) for c in rnd.candidates]
    return HaldaResult(plan=plan, objective=objective, k=plan.k, sets=sets_out, iterations=iterations,
                       solve_time=time.perf_counter() - t0, candidates=cands, dropped=dropped, rounds=rounds,
                       notes=notes, trace=list(trace or []), model_objective=sol.objective)
