"""Halda's one model (primasim.plan.halda_model), solved by its relaxation plus rounding.

The LP relaxation decides the discrete structure -- which devices form the ring, each Metal
device's memory set, and with a partial last lap the device it ends in -- and the rounding fixes
it: candidate rings from the LP's support and from a >= 0.5 and l >= 0.5, each completed exactly
(with the binaries fixed every device's cost is convex in its window and the layer total is the
only coupling), devices whose hop does not pay dropped one at a time, and the LP re-solved with the
least-used fractional device fixed out ("diving"), the best plan met kept.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .cost import totals_of
from .halda_common import (
    _Block,
    _class_alloc,
    _class_curve,
    _exchange,
    _partial_reach,
    _placed,
    _split_partial,
)
from .halda_model import _ROWS, ModelData, ModelSolution, _Problem, solve_model, totals

MAX_ADD = 6  # devices the general form's rounding tries to add (see _add)
MAX_DIVES = 4  # LP re-solves of the rounding (see solve_relax)
BOUND_TOL = 1e-6  # relative: a plan this close to an LP bound is taken as meeting it (HiGHS's tolerances)


def solve_relax(d: ModelData) -> ModelSolution | None:
    """LP relaxation + rounding (None: the relaxation, hence the model, is infeasible)."""
    solved = solve_model(d, integer=False)
    if solved is None:
        return None
    pr, vals, sc, bound, times = solved
    t2 = time.perf_counter()
    root = lp = _lp_values(pr, d)
    best = _round(d, lp)
    # diving: the least-used device whose selection binary the LP left fractional is fixed to 0
    # (the LP hesitated to pay its hop), the LP re-solved and rounded again, and so on down one
    # path; the best plan met is kept. The relaxation then proposes the devices that replace it.
    # A dive's LP value bounds every plan further down its path, so the path stops as soon as that
    # bound reaches the best plan (in particular at once when the rounding met the root's bound).
    v2 = vals.copy()
    row = _ROWS.index("aup")
    dives = 0
    path_bound = bound
    while d.select and dives < MAX_DIVES and (best is None or path_bound < best[2] * (1 - BOUND_TOL)):
        a = lp["a"]
        frac = [int(m) for m in np.argsort(a) if m != d.cm.head and 1e-3 < a[m] < 1 - 1e-3]
        if not frac:
            break
        v2[row, frac[0]] = 0.0
        if not pr.solve(v2, *totals(d)):
            break
        dives += 1
        path_bound = float(pr.prob.value) / sc + d.cm.head_time()
        lp = _lp_values(pr, d)
        r = _round(d, lp)
        if r is not None and (best is None or r[2] < best[2] - 1e-12 * max(1.0, abs(best[2]))):
            best = (r[0], r[1], r[2], r[3] + f",dive {dives}")
    t3 = time.perf_counter()
    if best is None:
        return None
    w, n, obj, how = best
    return ModelSolution(w, n, obj, bound, "relax", {**times, "round": t3 - t2, "dives": dives}, root, how)


def _lp_values(pr: _Problem, d: ModelData) -> dict[str, np.ndarray]:
    M = d.M
    lp = {"lt": np.asarray(pr.lt.value)[:M], "lg": np.asarray(pr.lg.value)[:M], "a": pr.a.value[:M],
          "s": pr.s.value[:M]}
    if d.general:
        lp["f"] = pr.f.value[:M]
        lp["u"] = pr.u.value[:M]
    return lp


# ------------------------------------------------------------------------------ rounding
def _tables(d: ModelData, mult: int, metal_regime: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-device exact cost T[m, w] and best GPU layers N[m, w] for w = 0..Wmax windows of `mult`
    layers each (windows = mult), with each Metal device's set fixed (0 fits, 1 overloaded, -1
    either); w = 0 costs 0 (device out of the ring; not allowed for the head). A Metal device's set
    depends on its total layers only, so fixing it masks windows of the unrestricted table."""
    key = (mult, metal_regime.tobytes())
    if key not in d.tables:
        T, N = _base_tables(d, mult)
        fix = np.flatnonzero(d.cm.is_metal & (metal_regime >= 0))
        if fix.size:
            T = T.copy()
            w = np.arange(T.shape[1])
            for m in fix:
                fits = mult * w <= d.C[m]
                keep = (fits if metal_regime[m] == 0 else ~fits) | (w == 0)
                T[m] = np.where(keep, T[m], np.inf)
        d.tables[key] = (T, N)
    return d.tables[key]


def _base_tables(d: ModelData, mult: int) -> tuple[np.ndarray, np.ndarray]:
    key = (mult, b"any")
    if key in d.tables:
        return d.tables[key]
    cm, M, L = d.cm, d.M, d.L
    Wmax = L // mult
    wv = np.arange(0, Wmax + 1)[:, None]
    nv = np.arange(0, Wmax + 1)[None, :]
    T = np.full((M, Wmax + 1), np.inf)
    N = np.zeros((M, Wmax + 1), np.int64)
    rows = np.arange(Wmax + 1)
    for m in range(M):
        gmax = int(min(Wmax, d.gcap[m] // mult))
        nn = nv[:, :gmax + 1]
        grid = d.device_cost(m, mult * wv, mult * nn, float(mult))
        grid = np.where(nn <= wv, grid, np.inf)
        bn = np.argmin(grid, axis=1)
        T[m] = grid[rows, bn]
        N[m] = bn
        T[m, 0] = np.inf if m == cm.head else 0.0
        N[m, 0] = 0
    d.tables[key] = (T, N)
    return T, N


def _complete(T: np.ndarray, active: np.ndarray, total: int) -> np.ndarray | None:
    """The best integer windows for the active devices summing to `total` (inactive devices get 0):
    the `total` cheapest marginal windows over all devices (greedy, exact for convex rows), then
    single-window exchanges (which also repair a row that is not quite convex)."""
    M, X = T.shape
    idx = np.flatnonzero(active)
    sub = T[idx].copy()
    sub[:, 0] = np.inf  # an active device keeps >= 1 window
    fin = np.isfinite(sub)
    if not fin.any(axis=1).all():
        return None
    lo = fin.argmax(axis=1)
    hi = X - 1 - fin[:, ::-1].argmax(axis=1)
    if lo.sum() > total or hi.sum() < total:
        return None
    t_min, _, meta = _class_curve(list(sub))
    w = _exchange(sub, _class_alloc(meta, total - t_min), total)
    if w is None:
        return None
    out = np.zeros(M, np.int64)
    out[idx] = w
    return out


def _structures(d: ModelData, lp: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Rounded binaries: (name, active set, Metal regime) candidates from the LP solution."""
    cm, M = d.cm, d.M
    lt, a = lp["lt"], lp["a"]
    head = np.arange(M) == cm.head
    metal = cm.is_metal
    out = []
    for name, act in (("support", (lt > 1e-6) | head), ("a>=0.5", (a >= 0.5) | head),
                      ("l>=0.5", (lt >= 0.5 * d.k) | head)):
        if not d.select:
            act = d.hostable | head
        over = np.where(metal, (lt > d.C + 0.5).astype(np.int64), -1)
        out.append((name, act, over))
        if (metal & act).any():  # the same devices with every Metal device fitting
            out.append((name + ",metal-fit", act, np.where(metal, 0, -1)))
    uniq: dict[tuple[bytes, bytes], tuple[str, np.ndarray, np.ndarray]] = {}
    for nm, act, over in out:
        uniq.setdefault((act.tobytes(), over.tobytes()), (nm, act, over))
    return list(uniq.values())


def _round(d: ModelData, lp: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, float, str] | None:
    """Closed form: every rounded structure completed exactly; the best one."""
    if d.general:
        return _round_general(d, lp)
    k, M = d.k, d.M
    tabs: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def attempt(act: np.ndarray, over: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
        key = over.tobytes()
        if key not in tabs:
            tabs[key] = _tables(d, k, over)
        T, N = tabs[key]
        w = _complete(T, act, d.L // k)
        if w is None:
            return None
        return w, N[np.arange(M), w], float(T[np.arange(M), w].sum()) + d.cm.head_time()

    best = _best_structure(d, lp, attempt, lambda cand, over: _polish(d, lp, cand, over, attempt), k)
    if best is None:
        return None
    w, n, _, name = best
    return w, n, d.objective(w, n), name


def _polish(d: ModelData, lp: dict[str, np.ndarray], cand: tuple[np.ndarray, np.ndarray, float, str],
            over: np.ndarray, attempt: Any) -> tuple[np.ndarray, np.ndarray, float, str]:
    """Device selection the LP cannot see (a hop is a fixed charge; the relaxation pays it in
    proportion to the layers): drop the device of the rounded ring whose removal lowers the
    objective most, completed exactly, and repeat while a drop helps."""
    w, n, obj, name = cand
    frac = [int(m) for m in np.flatnonzero(w > 0) if m != d.cm.head]
    w, n, obj, dropped = _flip_while_better((w, n, obj), frac, False, over, attempt)
    return (w, n, obj, name + (f",dropped {dropped}" if dropped else ""))


def _flip_while_better(sol: tuple[np.ndarray, np.ndarray, float], pool: list[int], to: bool, over: np.ndarray,
                       attempt: Any) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Greedy device selection: set the device of `pool` whose flip (into the ring: to=True, out
    of it: False) lowers the objective most, completed exactly by `attempt`, while one does;
    returns the plan and how many devices flipped."""
    w, n, obj = sol
    act = w > 0
    pool = list(pool)
    flipped = 0
    while pool:
        trials = []
        for m in pool:
            trial = act.copy()
            trial[m] = to
            r = attempt(trial, over)
            if r is not None:
                trials.append((r[2], m, r))
        if not trials:
            break
        val, m, r = min(trials, key=lambda x: x[0])
        if val >= obj - 1e-12 * max(1.0, abs(obj)):
            break
        w, n, obj = r
        act[m] = to
        pool.remove(m)
        flipped += 1
    return w, n, obj, flipped


def _round_general(d: ModelData, lp: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, float, str] | None:
    """Fixed k with a partial last lap: the rounded active set and Metal regimes as in the closed
    form; the device p whose window the last lap ends in (a one-hot choice, M options) is chosen
    exactly, each p completed by class curves (as _halda's general blocks)."""
    M, k = d.M, d.k
    q = k - 1

    def attempt(act: np.ndarray, over: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
        best_p: tuple[np.ndarray, np.ndarray, float] | None = None
        for p in np.flatnonzero(act):
            mult = tuple(k if m <= p else q for m in range(M))
            sol = _complete_general(d, _Block(k, q, int(p), mult), act, over)
            if sol is None:
                continue
            obj = d.objective(*sol)
            if best_p is None or obj < best_p[2] - 1e-15:
                best_p = (sol[0], sol[1], obj)
        return best_p

    return _best_structure(d, lp, attempt, lambda cand, over: _polish(d, lp, _add(d, cand, over, attempt), over,
                                                                     attempt), q)


def _best_structure(d: ModelData, lp: dict[str, np.ndarray], attempt: Any, select: Any,
                    mult: int) -> tuple[np.ndarray, np.ndarray, float, str] | None:
    """The best plan over the rounded structures (active set, Metal regimes) of the relaxation,
    each completed exactly by `attempt` and, with device selection on, improved by `select`; as a
    last resort every device that can hold a window (`mult` windows), either Metal regime."""
    best: tuple[np.ndarray, np.ndarray, float, str] | None = None
    for name, act, over in _structures(d, lp):
        r = attempt(act, over)
        if r is None:
            continue
        cand = (*r, name)
        if d.select:
            cand = select(cand, over)
        if best is None or cand[2] < best[2] - 1e-15:
            best = cand
    if best is None:
        anyr = np.full(d.M, -1)
        r = attempt(np.isfinite(_tables(d, mult, anyr)[0][:, 1:]).any(axis=1), anyr)
        if r is not None:
            best = (*r, "fallback")
    return best


def _add(d: ModelData, cand: tuple[np.ndarray, np.ndarray, float, str], over: np.ndarray,
         attempt: Any) -> tuple[np.ndarray, np.ndarray, float, str]:
    """General form only: the relaxation cannot see which totals q*w + f a device reaches (nor
    how many of them its GPU takes), so it may leave out a device the integer plan needs; add
    the one (of the MAX_ADD cheapest per layer) that lowers the objective most, while one helps."""
    cm = d.cm
    w, n, obj, name = cand
    act = w > 0
    per_layer = cm.alpha + np.minimum(cm.beta, 0.0)
    pool = [int(m) for m in np.argsort(per_layer) if not act[m] and d.hostable[m]][:MAX_ADD]
    w, n, obj, added = _flip_while_better((w, n, obj), pool, True, over, attempt)
    return (w, n, obj, name + (f",added {added}" if added else ""))


def _complete_general(d: ModelData, blk: Any, act: np.ndarray, over: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact windows for a fixed (active set, Metal regime, partial device p): the devices before p
    have k windows, p has q full ones plus r layers, the ones after p have q (class curves)."""
    cm, M, L, q, p = d.cm, d.M, d.L, blk.q, blk.p
    k = q + 1
    idx = np.arange(L + 1)
    mask, W_, R_, N_ = _partial_reach(q, L)
    grid = d.device_cost(p, idx[:, None], idx[None, :], float(k))
    grid = np.where(mask, grid, np.inf)
    if cm.is_metal[p] and over[p] >= 0:
        fits = idx[:, None] <= d.C[p]
        grid = np.where(fits if over[p] == 0 else ~fits, grid, np.inf)
    blg = np.argmin(grid, axis=1)
    cp_ = grid[idx, blg]
    A = [m for m in range(M) if m < p and act[m]]
    B = [m for m in range(M) if m > p and act[m]]
    TA, NA = _tables(d, k, over)
    TB, NB = _tables(d, q, over)
    tabA = [np.where(np.arange(TA.shape[1]) == 0, np.inf, TA[m]) for m in A]
    tabB = [np.where(np.arange(TB.shape[1]) == 0, np.inf, TB[m]) for m in B]
    split = _split_partial(cp_, tabA, tabB, L, q)
    if split is None:
        return None
    lsel, wa, wb = split
    w, n = _placed(M, [(A, wa, [NA[m, x] for m, x in zip(A, wa)]), (B, wb, [NB[m, x] for m, x in zip(B, wb)])])
    w[p] = W_[lsel, blg[lsel]]
    n[p] = N_[lsel, blg[lsel]]
    lt, _, _ = totals_of(w, n, L)
    if int(lt.sum()) != L:
        return None
    return w, n
