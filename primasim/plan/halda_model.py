"""One optimisation model of Halda (data, rows, CVXPY problems) and its exact MILP.

prima.cpp's Halda (reference prima-cpp.md §1-2) minimises its cost model by iterating over set
assignments (each device's memory regime M1-M4 is fixed, one integer program per k is solved, the
sets are re-assigned from the answer). Here the whole decision is one mixed-integer program:

- ``w_m`` (window, layers per lap) and ``n_m`` (GPU layers per window) are integers;
- ``a_m`` is binary: device m takes part in the ring (device selection; the head always does);
- ``s_m`` is binary: device m's memory regime, overloaded (M1, M2 or M3 by its OS) or fitting (M4),
  with the paper's "must overload" / "must fit" rows switched by it;
- ``t_m`` is device m's disk time per token: Linux, Android and Metal-less macOS re-read their
  overflow (convex: max(0, overflow)/s), a Metal Mac in M2 re-reads its whole slice (the
  all-or-nothing jump, big-M rows on ``s_m`` plus the convex hull of the jump as a valid cut);
- the objective is the cost model's TPOT (``CostModel.cost_grid`` summed, plus the head's constant),
  including our per-hop communication term when the cost model has it;
- with a fixed k that does not divide L (``general``), binaries ``u_m`` (device m's window is full
  in the partial last lap), ``h_m`` (it has layers in that lap) and ``z_m`` (min(n_m, f_m)) give
  the prefix fill of the last lap exactly (Appendix A.3).

Free k: every (l_m, l_m^gpu) a plan with k laps reaches is reached with k = 1 and fewer windows,
and the cost model depends on the plan only through (l_m, l_m^gpu, windows_m), with costs
non-decreasing in windows; so k = 1 is optimal whenever k is free, and the model is solved at
k = 1 (experiments/halda_gap.py checks this against the MILP at every valid k). A fixed k
(``--k``) is solved as asked, or refused when no plan has that many laps.

Two solvers, one model (same variables, same rows, built once per shape as DPP problems):

- ``relax`` (the default ``prima`` planner, primasim.plan.halda_relax): the LP relaxation, its
  binaries rounded and the windows completed exactly for them (see there);
- ``exact`` (``solve_exact`` here): the MILP by HiGHS through CVXPY, MIP gap 0: the global optimum
  of the cost model, the reference every planner is measured against.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .cost import CostModel, totals_of
from .halda_common import cvxpy, quiet_highs

BIG_NEG = -1e3  # "no row" constant for the generic disk rows (a plan's scaled objective is O(10))


# ------------------------------------------------------------------------------ instance data
@dataclass
class ModelData:
    """Everything the rows need, per device in ring order (head first), for one k.

    Capacities are integers in total layers: ``C`` is the most layers (Metal: all layers; others:
    layers not on a RAM-relieving GPU) the device holds without overflowing its memory budget.
    """

    cm: CostModel
    k: int
    general: bool
    priority: float
    select: bool
    M: int = 0
    L: int = 0
    C: np.ndarray = field(default_factory=lambda: np.zeros(0))
    gf: np.ndarray = field(default_factory=lambda: np.zeros(0))
    gcap: np.ndarray = field(default_factory=lambda: np.zeros(0))
    kvcap: np.ndarray = field(default_factory=lambda: np.zeros(0))
    kvg: np.ndarray = field(default_factory=lambda: np.zeros(0))
    slow: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    hostable: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    U: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tables: dict[tuple[int, bytes], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    prio: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        cm = self.cm
        self.M, self.L = cm.M, cm.L
        M = self.M
        self.prio = np.ones(M)
        self.prio[cm.head] = self.priority
        # fit capacity: the largest integer x with x*b' + (c_gpu if Metal) + b_cio - budget <= 0
        extra = np.where(cm.is_metal, cm.c_gpu, 0.0) + cm.bcio - cm.budget
        C = np.floor(-extra / cm.bp).astype(np.int64)
        for m in range(M):  # exact comparison, as CostModel.cost_grid decides "overloaded"
            while C[m] * cm.bp + extra[m] > 0:
                C[m] -= 1
            while (C[m] + 1) * cm.bp + extra[m] <= 0:
                C[m] += 1
        self.C = C
        self.gf = np.where(cm.is_metal | cm.is_mac, 0.0, 1.0)  # GPU layers relieve RAM (not on macOS)
        self.gcap = np.where(cm.has_gpu, np.floor(cm.gpu_cap + 1e-7), 0.0)
        self.kvg = np.where(cm.has_gpu & ~cm.uma, 1.0, 0.0)
        self.kvcap = np.where(np.isfinite(cm.kv_cap), np.floor(np.minimum(cm.kv_cap, 4.0 * self.L) + 1e-7), 4.0 * self.L)
        self.slow = cm.slow_disk.copy()
        # the most layers a device can hold at all: KV cache in RAM + swap (+ VRAM), and slow disks
        # within memory (prima.cpp's M4 rule)
        U = np.minimum(float(self.L), self.kvcap + self.kvg * self.gcap)
        self.U = np.where(self.slow, np.minimum(U, self.C + self.gf * self.gcap), U)
        # devices that can hold one window at all (select=False keeps exactly these in the ring)
        q = self.k - 1 if self.general else self.k
        one = np.array([float(cm.cost_grid(m, np.array([q, q]), np.array([0, min(q, self.gcap[m])]), float(q)).min())
                        for m in range(M)])
        self.hostable = np.isfinite(one)

    # ---------------------------------------------------------------- exact objective
    def device_cost(self, m: int, lt: Any, lg: Any, windows: Any) -> np.ndarray:
        """Device m's share of the objective (head priority applied), +inf where invalid."""
        return self.cm.cost_grid(m, lt, lg, windows, priority=self.priority)

    def objective(self, w: np.ndarray, n: np.ndarray) -> float:
        """The model's objective for windows w and GPU layers n (0-window devices cost nothing)."""
        lt, lg, win = totals_of(w, n, self.L)
        if int(lt.sum()) != self.L or w[self.cm.head] < 1:
            return math.inf
        tot = self.cm.head_time()
        for m in np.flatnonzero(w > 0):
            tot += float(self.device_cost(int(m), lt[m], lg[m], win[m]))
        return tot


# ------------------------------------------------------------------------------ CVXPY problems
_ROWS = ("ca", "cb", "ct", "cx", "gf", "Cp", "C1", "gcap", "kvp", "kvg", "U",
         "r1l", "r1g", "r1a", "r1s", "r1c", "r2l", "r2c", "r3s", "r3c", "alo", "aup", "sup")
_CACHE: dict[tuple[str, int, bool], _Problem] = {}


def _bucket(M: int) -> int:
    for b in (2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128):
        if M <= b:
            return b
    return int(2 ** math.ceil(math.log2(M)))


class _Problem:
    """The model for Mb device columns as one DPP problem (LP relaxation or MILP).

    All per-device data live in one Parameter (rows of ``_ROWS``) plus a few scalars: CVXPY
    validates every Parameter it is given, so one matrix is much cheaper than two dozen vectors.
    Closed form (L = k*W): l = k*w, lg = k*n, windows k. General (fixed k, partial last lap):
    l = q*w + f, lg = q*n + g with q = k - 1, windows q + h.
    """

    def __init__(self, Mb: int, integer: bool, general: bool) -> None:
        cp = cvxpy()

        self.Mb, self.integer, self.general = Mb, integer, general
        P = cp.Parameter((len(_ROWS), Mb), name="rows")
        R = {nm: P[i, :] for i, nm in enumerate(_ROWS)}
        kk = cp.Parameter(nonneg=True, name="k")  # laps (closed) or q = k - 1 full laps (general)
        Lp = cp.Parameter(nonneg=True, name="L")
        Wb = cp.Parameter(nonneg=True, name="Wb")  # a bound on any window
        self.P, self.k, self.Lp, self.Wb = P, kk, Lp, Wb
        w = cp.Variable(Mb, integer=integer, name="w")
        n = cp.Variable(Mb, integer=integer, name="n")
        a = cp.Variable(Mb, boolean=integer, name="a")
        s = cp.Variable(Mb, boolean=integer, name="s")
        t = cp.Variable(Mb, nonneg=True, name="t")
        # totals as variables tied to (w, n): a parameter may multiply a variable but not an
        # expression that already holds one (DPP)
        lt, lg, win = cp.Variable(Mb, name="lt"), cp.Variable(Mb, name="lg"), cp.Variable(Mb, name="win")
        self.w, self.n, self.a, self.s, self.t = w, n, a, s, t
        cons = []
        if general:
            f = cp.Variable(Mb, integer=integer, name="f")
            g = cp.Variable(Mb, integer=integer, name="g")
            u = cp.Variable(Mb, boolean=integer, name="u")
            h = cp.Variable(Mb, boolean=integer, name="h")
            z = cp.Variable(Mb, boolean=integer, name="z")
            self.f, self.g, self.u, self.h, self.z = f, g, u, h, z
            cons += [
                lt == kk * w + f, lg == kk * n + g, win == kk * a + h,
                f >= 0, f <= w, f >= w - Wb + Wb * u, u[1:] <= u[:-1], f[1:] <= Wb * u[:-1],
                f <= Wb * h, h <= f, cp.sum(f) >= 1,
                g >= 0, g <= n, g <= f, g >= n - Wb * z, g >= f - Wb + Wb * z,
            ]
            if not integer:
                cons += [u >= 0, u <= 1, h >= 0, h <= 1, z >= 0, z <= 1]
        else:
            cons += [lt == kk * w, lg == kk * n, win == kk * a]
        cpu = lt - cp.multiply(R["gf"], lg)
        cons += [
            cp.sum(lt) == Lp,
            n >= 0, n <= w, lg <= cp.multiply(R["gcap"], a),
            # lt <= U a with U the most layers the device can hold: the convex hull of "no layers, no
            # hop" and "some layers, one hop per window" (a weaker U lets the LP spread single
            # layers over many devices nearly for free)
            w >= a, w <= Wb * a, lt <= cp.multiply(R["U"], a), a >= R["alo"], a <= R["aup"],
            s >= 0, s <= R["sup"], s <= a,
            lt - cp.multiply(R["kvg"], lg) <= cp.multiply(R["kvp"], a),
            cpu <= cp.multiply(R["Cp"], a) + Lp * s,  # "must fit" unless overloaded
            cpu >= cp.multiply(R["C1"], s),  # "must overload" when overloaded
            t >= cp.multiply(R["r1l"], lt) + cp.multiply(R["r1g"], lg) + cp.multiply(R["r1a"], a)
            + cp.multiply(R["r1s"], s) + R["r1c"],
            t >= cp.multiply(R["r2l"], lt) + cp.multiply(R["r2c"], a),
            t >= cp.multiply(R["r3s"], s) + R["r3c"],
        ]
        if not integer:
            cons += [a >= 0, a <= 1, s <= 1]
        obj = R["ca"] @ lt + R["cb"] @ lg + R["ct"] @ t + R["cx"] @ win
        self.lt, self.lg = lt, lg
        self.prob = cp.Problem(cp.Minimize(obj), cons)
        assert self.prob.is_dpp()

    def solve(self, vals: np.ndarray, k: float, L: float, Wb: float) -> bool:
        cp = cvxpy()

        self.P.value, self.k.value, self.Lp.value, self.Wb.value = vals, k, L, Wb
        opts: dict[str, Any] = {"mip_rel_gap": 0.0, "mip_abs_gap": 0.0} if self.integer else {}
        try:
            self.prob.solve(solver=cp.HIGHS, **opts)
        except cp.error.SolverError:
            return False
        return self.prob.status in ("optimal", "optimal_inaccurate")


def _problem(Mb: int, integer: bool, general: bool) -> _Problem:
    quiet_highs()
    key = ("milp" if integer else "lp", Mb, general)
    if key not in _CACHE:
        _CACHE[key] = _Problem(Mb, integer, general)
    return _CACHE[key]


def _rows(d: ModelData, Mb: int) -> tuple[np.ndarray, float]:
    """Parameter matrix of one instance, padded to Mb columns, and the cost scale used."""
    cm, M, L = d.cm, d.M, d.L
    s = cm.disk
    prio = d.prio
    metal = cm.is_metal
    # costs scaled so that a plan's objective is O(10): HiGHS's tolerances are absolute (~1e-6), and
    # in seconds two plans 0.03 % apart on a 50 ms objective would look equal to it
    est = float(L * np.median(np.abs(cm.alpha + np.minimum(cm.beta, 0.0)))) or 1.0
    sc = 10.0 / est
    R = {nm: np.zeros(Mb) for nm in _ROWS}
    R["ca"][:M] = cm.alpha / prio * sc
    R["cb"][:M] = cm.beta * sc
    R["ct"][:M] = 1.0 / prio  # t is already in scaled units (the disk rows are scaled)
    R["cx"][:M] = cm.xi * sc
    R["gf"][:M] = d.gf
    # capacities rounded to the totals a plan can reach (valid for integer windows, much tighter
    # for the LP at large k): closed form, multiples of k; general form, q*w + f with 0 <= f <= w,
    # i.e. the union of [q w, (q+1) w] over w
    g = d.k - 1 if d.general else d.k

    def down(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, float)
        if d.general:
            return np.minimum(x, (g + 1) * np.floor(x / g))
        return g * np.floor(x / g)

    def up(x: np.ndarray) -> np.ndarray:  # the smallest reachable total >= x
        x = np.asarray(x, float)
        if d.general:
            return np.maximum(x, g * np.ceil(x / (g + 1)))
        return g * np.ceil(x / g)

    # every row below is in perspective form (x <= C a, ...): valid for a in {0, 1}, and the
    # relaxation sees a device's capacities only as far as it is in the ring
    R["Cp"][:M] = down(d.C)
    R["C1"][:M] = up(d.C + 1)
    R["gcap"][:M] = down(d.gcap)
    R["kvp"][:M] = down(d.kvcap)
    R["kvg"][:M] = d.kvg
    R["U"][:M] = down(d.U)
    # disk row 1: non-Metal t >= (b'(l - gf lg) + b_cio - budget)/s (inactive: 0);
    #             Metal t >= (b l + b_io)/s when overloaded (big-M on s), or always when it cannot
    #             hold one layer
    o0 = (cm.bcio - cm.budget) / s
    bigm = (cm.b * L + cm.bio) / s
    Ck = down(d.C)
    cant = metal & (Ck < g)  # a Metal device that cannot hold one window without reloading it all
    R["r1l"][:M] = np.where(metal, cm.b / s, cm.bp / s) * sc
    R["r1g"][:M] = np.where(metal, 0.0, -d.gf * cm.bp / s) * sc
    R["r1a"][:M] = np.where(metal, np.where(cant, cm.bio / s, 0.0), o0) * sc
    R["r1s"][:M] = np.where(metal & ~cant, bigm, 0.0) * sc
    R["r1c"][:M] = np.where(metal, np.where(cant, 0.0, cm.bio / s - bigm), 0.0) * sc
    # disk row 2 (Metal): the convex hull of the all-or-nothing jump, a valid cut for the relaxation
    Lmax = float(L)
    slope = np.where(metal & ~cant & (Ck < Lmax), (cm.b * Lmax + cm.bio) / s / np.maximum(Lmax - Ck, 1.0), 0.0)
    R["r2l"][:M] = slope * sc
    R["r2c"][:M] = -slope * Ck * sc  # times a (perspective); 0 rows: t >= 0
    # disk row 3: the head reads one embedding row per token when it does not overflow
    h = cm.head
    R["r3s"][:M] = 0.0
    R["r3c"][:M] = BIG_NEG
    R["r3s"][h] = -cm.bi_row / s[h] * sc
    R["r3c"][h] = cm.bi_row / s[h] * sc
    R["r1c"][M:] = BIG_NEG
    R["alo"][:M] = np.where(d.hostable, 1.0, 0.0) if not d.select else 0.0
    R["alo"][h] = 1.0
    R["aup"][:M] = 1.0
    R["sup"][:M] = np.where(d.slow, 0.0, 1.0)
    return np.vstack([R[nm] for nm in _ROWS]), sc


# ------------------------------------------------------------------------------ solutions
@dataclass
class ModelSolution:
    w: np.ndarray
    n: np.ndarray
    objective: float  # the model's objective (head priority applied), s
    bound: float  # lower bound on the objective (LP value; the optimum for exact), s
    solver: str
    times: dict[str, float] = field(default_factory=dict)  # s: build, lp/milp, round
    lp: dict[str, np.ndarray] = field(default_factory=dict)  # the relaxation's values
    rounding: str = ""  # which rounding candidate won


def totals(d: ModelData) -> tuple[float, float, float]:
    """The right-hand sides `_Problem.solve` takes besides the rows: full laps, L, the window cap."""
    q = d.k - 1 if d.general else d.k
    return float(q), float(d.L), float(math.ceil(d.L / max(q, 1)))


def solve_model(d: ModelData, integer: bool) -> tuple[_Problem, np.ndarray, float, float, dict[str, float]] | None:
    """The problem of d's shape (built once per shape), loaded with d's rows and solved: (problem,
    rows, their scale, the objective's bound in s, times {build, milp|lp}); None if infeasible."""
    t0 = time.perf_counter()
    pr = _problem(_bucket(d.M), integer, d.general)
    vals, sc = _rows(d, _bucket(d.M))
    t1 = time.perf_counter()
    ok = pr.solve(vals, *totals(d))
    t2 = time.perf_counter()
    if not ok:
        return None
    bound = float(pr.prob.value) / sc + d.cm.head_time()
    return pr, vals, sc, bound, {"build": t1 - t0, "milp" if integer else "lp": t2 - t1}


def solve_exact(d: ModelData) -> ModelSolution | None:
    """The MILP: global optimum of the cost model for this k (None: no plan exists)."""
    solved = solve_model(d, integer=True)
    if solved is None:
        return None
    pr, _, _, bound, times = solved
    w = np.rint(pr.w.value[:d.M]).astype(np.int64)
    n = np.rint(pr.n.value[:d.M]).astype(np.int64)
    return ModelSolution(w, n, d.objective(w, n), bound, "exact", times)
