"""A planner whose objective is the simulator: local search from Halda's plan (``--planner sim``).

Halda minimises prima.cpp's cost model, a sum of per-device times with no overlap; the simulator
sees what that hides (prefetch overlapping a reload, page-cache policies, airtime, and with
``SimConfig(runtime=True)`` primasim's own runtime). This planner takes Halda's plan as its start
and improves it by moves, each judged by simulating the plan:

- Halda re-solves fed by simulated coefficients (``sim_corrections`` of the current plan: seconds
  per CPU/GPU layer, effective disk rate, seconds per hop), at the current k and at k = 1;
- one window moved from one device to another (donors and receivers ranked by the marginal costs
  of Halda's model with those coefficients), with or without a GPU layer;
- one GPU layer more or less on a device;
- a device dropped (Halda re-solved on the others);
- one lap more or less (the same split re-lapped, Halda at that k, an even split at that k), and
  the same split or an even one at any k up to ``MAX_LAPS`` (a lap more can pay off only once
  windows are small enough to prefetch), unless the user fixed k;
- prefetch switched (with ``prefetch_moves``, for the runtime, whose prefetch costs memory).

A move is accepted only if it lowers the simulated TPOT by more than ``rel_tol`` (first
improvement, candidates in ranked order), so the simulated TPOT decreases strictly from round to
round: the search terminates (finitely many plans), and it never returns a plan that simulates
slower than Halda's, which it evaluated first. A round costs O(M) simulations (M devices) and at
most ``max_rounds`` rounds run; ``time_budget_s`` stops it early with the best plan so far.

Candidates that Halda's cost model, fed the current plan's simulated coefficients (but the disks'
own read rates), prices at more than ``screen`` times the current plan are not simulated: they
overflow memory badly, and simulating a thrashing plan costs tens of times a normal one
(``screened`` counts them).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from primasim.core.cluster import ClusterSpec
from primasim.core.errors import PlanError
from primasim.core.model import ModelSpec
from primasim.core.plan import DevicePlan, Plan, violations
from primasim.plan.cost import CostModel, DeviceCorrection, predict_tpot, totals_of
from primasim.plan.halda_common import _ring
from primasim.plan.halda_global import halda_model
from primasim.plan.halda_model import ModelData
from primasim.plan.halda_relax import _tables

from ._api import simulate_plan
from ._config import SimConfig
from ._feedback import sim_corrections

MAX_LAPS = 6  # lap counts the search jumps to (beyond one more or less)


@dataclass
class SimPlanResult:
    """The sim planner's answer and how it got there."""

    plan: Plan
    tpot_ms: float  # simulated TPOT of `plan`
    start: Plan  # Halda's plan, where the search started
    start_tpot_ms: float
    history: list[str] = field(default_factory=list)  # accepted moves, in order
    evaluations: int = 0  # plans simulated
    rounds: int = 0
    converged: bool = False  # True: no move improves (False: stopped by max_rounds or time_budget_s)
    seconds: float = 0.0
    trajectory: list[float] = field(default_factory=list)  # simulated TPOT after each accepted move (ms)
    screened: int = 0  # candidates not simulated: the corrected cost model prices them > screen x current

    def summary(self) -> dict[str, Any]:
        return {"plan": self.plan.describe(), "simulated_tpot_ms": self.tpot_ms, "start": self.start.describe(),
                "start_simulated_tpot_ms": self.start_tpot_ms, "gain": self.start_tpot_ms / self.tpot_ms
                if self.tpot_ms > 0 else math.nan, "moves": self.history, "evaluations": self.evaluations,
                "rounds": self.rounds, "converged": self.converged, "seconds": self.seconds}


def _key(p: Plan) -> tuple[Any, ...]:
    return (p.k, p.prefetch, tuple((d.name, d.layers, d.gpu_layers) for d in p.devices))


def _with(plan: Plan, w: dict[str, int], n: dict[str, int]) -> Plan:
    devs = tuple(DevicePlan(d.name, int(w.get(d.name, d.layers)), int(n.get(d.name, d.gpu_layers)))
                 for d in plan.devices)
    W = sum(d.layers for d in devs)
    return plan.replace(devices=devs, k=math.ceil(plan.n_layers / W) if W else plan.k)


def _pf(plan: Plan | None, prefetch: bool) -> Plan | None:
    return None if plan is None else plan.replace(prefetch=prefetch)


def _move(cur: Plan, a: str, b: str, gpu: bool, step: int) -> Plan | None:
    """`step` windows from device a to device b (each with one GPU layer on b if `gpu`)."""
    w = {d.name: d.layers for d in cur.devices}
    n = {d.name: d.gpu_layers for d in cur.devices}
    if w[a] - step < (1 if a == cur.head else 0):
        return None
    wa, wb = w[a] - step, w[b] + step
    return _with(cur, {a: wa, b: wb}, {a: min(n[a], wa), b: n[b] + (step if gpu else 0)})


class _Search:
    def __init__(self, model: ModelSpec, cluster: ClusterSpec, cfg: SimConfig, system: str, n_ctx: int,
                 k: int | None, prefetch_moves: bool, halda_kw: dict[str, Any]) -> None:
        self.model, self.cluster, self.cfg, self.system = model, cluster, cfg, system
        self.n_ctx, self.k, self.prefetch_moves, self.halda_kw = n_ctx, k, prefetch_moves, halda_kw
        self.ring = _ring(cluster)
        self.seen: dict[tuple[Any, ...], float] = {}
        self.evaluations = 0
        self._corr: dict[tuple[Any, ...], dict[str, DeviceCorrection]] = {}

    # ---------------------------------------------------------------- objective
    def tpot(self, plan: Plan) -> float:
        key = _key(plan)
        if key not in self.seen:
            if violations(plan, self.model, self.cluster):
                self.seen[key] = math.inf
            else:
                self.evaluations += 1
                res = simulate_plan(self.system, self.model, self.cluster, plan, self.cfg.replace(record_spans=False))
                self.seen[key] = res.tpot_ms if res.feasible else math.inf
        return self.seen[key]

    def corrections(self, plan: Plan) -> dict[str, DeviceCorrection]:
        """Simulated coefficients of `plan` (one more simulation, with the trace's spans)."""
        key = _key(plan)
        if key not in self._corr:
            res = simulate_plan(self.system, self.model, self.cluster, plan, self.cfg.replace(record_spans=True))
            self.evaluations += 1
            self._corr[key] = sim_corrections(res, self.model, self.cluster) if res.feasible else {}
        return self._corr[key]

    # ---------------------------------------------------------------- Halda as a candidate generator
    def halda(self, corr: dict[str, DeviceCorrection], k: int | None, names: list[str] | None = None,
              prefetch: bool = True) -> Plan | None:
        names = names or self.ring
        cl = self.cluster if len(names) == len(self.ring) else self.cluster.subset(names)
        general = k is not None and self.model.n_layers % k != 0
        try:
            r = halda_model(self.model, cl, n_ctx=self.n_ctx, k=k, general=general,
                            corrections={n: c for n, c in corr.items() if n in names}, **self.halda_kw)
        except PlanError:
            return None
        got = {d.name: d for d in r.plan.devices}
        devs = tuple(got.get(nm, DevicePlan(nm, 0, 0)) for nm in self.ring)
        return r.plan.replace(devices=devs, prefetch=prefetch, system=self.system)

    # ---------------------------------------------------------------- moves
    def moves(self, cur: Plan, last: tuple[str, str, bool, int] | None = None
              ) -> Iterator[tuple[str, Callable[[], Plan | None]]]:
        corr = self.corrections(cur)
        fixed_k = self.k is not None
        if last is not None:  # the window move just accepted, again: twice as far, then as far
            a, b, gpu, size = last
            for step in (2 * size, size):
                yield f"{step} window(s) {a} -> {b}" + (" (on its GPU)" if gpu else ""), \
                    lambda step=step: _move(cur, a, b, gpu, step)
        yield "Halda with simulated coefficients", lambda: self.halda(corr, cur.k, prefetch=cur.prefetch)
        if not fixed_k and cur.k != 1:
            yield "Halda with simulated coefficients, k = 1", lambda: self.halda(corr, None, prefetch=cur.prefetch)
        if not fixed_k:  # one lap more or less
            for k2 in (cur.k + 1, cur.k - 1):
                if 1 <= k2 <= self.model.n_layers:
                    yield f"k = {k2}: the same split", lambda k2=k2: self._relap(cur, k2)
                    yield f"k = {k2}: Halda with simulated coefficients", lambda k2=k2: self.halda(corr, k2, prefetch=cur.prefetch)
                    yield f"k = {k2}: even split", lambda k2=k2: self._even(cur, k2)
        if self.prefetch_moves:
            yield f"prefetch {'off' if cur.prefetch else 'on'}", lambda: cur.replace(prefetch=not cur.prefetch)
        # single-window moves, ranked by the marginal costs of Halda's model with those coefficients
        for name, mk in self._window_moves(cur, corr):
            yield name, mk
        for name, mk in self._gpu_moves(cur):
            yield name, mk
        act = [d.name for d in cur.devices if d.layers > 0]
        for nm in act[1:]:
            yield f"drop {nm}", lambda nm=nm: self.halda(corr, cur.k if fixed_k else None,
                                                          [x for x in self.ring if x != nm and (x in act or x == self.ring[0])],
                                                          prefetch=cur.prefetch)
        if not fixed_k:  # lap counts further away (a lap more can pay only after two: prefetch windows)
            for k2 in range(1, MAX_LAPS + 1):
                if abs(k2 - cur.k) <= 1:
                    continue
                for pf in ((cur.prefetch, not cur.prefetch) if self.prefetch_moves else (cur.prefetch,)):
                    tag = "" if pf == cur.prefetch else f", prefetch {'on' if pf else 'off'}"
                    yield f"k = {k2}: the same split{tag}", \
                        lambda k2=k2, pf=pf: _pf(self._relap(cur, k2), pf)
                    yield f"k = {k2}: even split{tag}", lambda k2=k2, pf=pf: _pf(self._even(cur, k2), pf)

    def _marginals(self, cur: Plan, corr: dict[str, DeviceCorrection]) -> tuple[np.ndarray, np.ndarray]:
        """Cost-model seconds (with simulated coefficients) of one window (k layers) more / less per
        device: the ranking of window moves."""
        cm = CostModel(self.model, [self.cluster.device(n) for n in self.ring], self.cluster.network, 0,
                       n_ctx=self.n_ctx, variant="paper", comm=True, corrections=corr)
        d = ModelData(cm, 1, False, 1.0, True)
        T, _ = _tables(d, 1, np.full(cm.M, -1))  # by total layers (the plan may have a partial lap)
        tot = cur.totals()
        lt = np.array([tot[nm][0] for nm in self.ring])
        k, X = cur.k, T.shape[1]
        with np.errstate(invalid="ignore"):  # inf - inf: a window the device cannot take either way
            up = np.array([T[m, lt[m] + k] - T[m, lt[m]] if lt[m] + k < X else math.inf for m in range(cm.M)])
            down = np.array([T[m, lt[m]] - T[m, lt[m] - k] if lt[m] >= k else -math.inf for m in range(cm.M)])
        return np.nan_to_num(up, nan=math.inf), np.nan_to_num(down, nan=-math.inf)

    def _window_moves(self, cur: Plan, corr: dict[str, DeviceCorrection]) -> Iterator[tuple[str, Callable[[], Plan | None]]]:
        up, down = self._marginals(cur, corr)
        w = {d.name: d.layers for d in cur.devices}
        donors = [self.ring[i] for i in np.argsort(-down) if w[self.ring[i]] > (1 if i == 0 else 0)]
        receivers = [self.ring[i] for i in np.argsort(up)]
        pairs = [(a, b) for a in donors for b in receivers if a != b]
        # the most promising first: largest saving minus cost
        idx = {nm: i for i, nm in enumerate(self.ring)}
        pairs.sort(key=lambda ab: up[idx[ab[1]]] - down[idx[ab[0]]])
        for a, b in pairs[: 2 * len(self.ring)]:
            for gpu in (True, False):
                gb = self.cluster.device(b).gpu is not None
                if gpu and not gb:
                    continue

                yield f"1 window(s) {a} -> {b}" + (" (on its GPU)" if gpu else ""), \
                    lambda a=a, b=b, gpu=gpu: _move(cur, a, b, gpu, 1)

    def _gpu_moves(self, cur: Plan) -> Iterator[tuple[str, Callable[[], Plan | None]]]:
        for d in cur.devices:
            if d.layers == 0 or self.cluster.device(d.name).gpu is None:
                continue
            if d.gpu_layers < d.layers:
                yield f"one GPU layer more on {d.name}", lambda d=d: _with(cur, {}, {d.name: d.gpu_layers + 1})
            if d.gpu_layers > 0:
                yield f"one GPU layer less on {d.name}", lambda d=d: _with(cur, {}, {d.name: d.gpu_layers - 1})

    def _relap(self, cur: Plan, k2: int) -> Plan | None:
        """The same share of layers per device, in k2 laps."""
        L = self.model.n_layers
        lt, lg, _ = totals_of([d.layers for d in cur.devices], [d.gpu_layers for d in cur.devices], L)
        w = np.maximum(np.where(lt > 0, np.rint(lt / k2), 0), np.where(lt > 0, 1, 0)).astype(int)
        if w.sum() == 0 or math.ceil(L / w.sum()) != k2:
            return None
        n = np.minimum(w, np.rint(lg / k2)).astype(int)
        return _with(cur, dict(zip(self.ring, w.tolist())), dict(zip(self.ring, n.tolist())))

    def _even(self, cur: Plan, k2: int) -> Plan | None:
        """Equal windows on the devices in use, k2 laps; GPU layers as many as the window."""
        act = [d.name for d in cur.devices if d.layers > 0]
        L = self.model.n_layers
        per = math.ceil(L / k2 / len(act))
        if per < 1 or math.ceil(L / (per * len(act))) != k2:
            return None
        w = {nm: per for nm in act}
        n = {nm: per if self.cluster.device(nm).gpu is not None else 0 for nm in act}
        return _with(cur, w, n)


def sim_plan(model: ModelSpec, cluster: ClusterSpec, *, config: SimConfig | None = None, n_ctx: int = 1024,
             k: int | None = None, system: str = "prima", start: Plan | None = None, prefetch_moves: bool = False,
             max_rounds: int = 40, rel_tol: float = 0.002, time_budget_s: float | None = None,
             screen: float = 2.0, **halda_kw: Any) -> SimPlanResult:
    """Local search over plans with the simulator as the objective (module docstring), from
    Halda's plan (``start`` overrides it). ``k`` fixes the laps: every move keeps it.
    ``halda_kw`` go to Halda (primasim.plan.halda_model.halda_model: solver, variant, comm, ...)."""
    t0 = time.perf_counter()
    cfg = config or SimConfig(tokens=8)
    search = _Search(model, cluster, cfg, system, n_ctx, k, prefetch_moves, halda_kw)
    if start is None:
        general = k is not None and model.n_layers % k != 0
        start = halda_model(model, cluster, n_ctx=n_ctx, k=k, general=general, **halda_kw).plan
        start = start.replace(system=system)
    cur, cur_t = start, search.tpot(start)
    if not math.isfinite(cur_t):
        raise PlanError(f"Halda's plan does not simulate ({system}, {model.name} on {cluster.name})",
                        where="--planner sim", fix="check the plan with `primasim simulate`")
    res = SimPlanResult(plan=cur, tpot_ms=cur_t, start=start, start_tpot_ms=cur_t, trajectory=[cur_t])
    last: tuple[str, str, bool, int] | None = None
    for rnd in range(1, max_rounds + 1):
        res.rounds = rnd
        improved = False
        # the screen prices reloads at the disks' own rates (an effective rate read off a plan that
        # never stalled is "infinite" and would let every thrashing candidate through)
        corr = {n: dataclasses.replace(c, disk_bps=None) for n, c in search.corrections(cur).items()}
        ref = predict_tpot(cur, model, cluster, corrections=corr)
        for name, make in search.moves(cur, last):
            if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                break
            cand = make()
            if cand is None or _key(cand) in search.seen and search.seen[_key(cand)] >= cur_t:
                continue
            if violations(cand, model, cluster):
                continue
            if predict_tpot(cand, model, cluster, corrections=corr) > screen * ref:
                res.screened += 1
                continue
            t = search.tpot(cand)
            if t < cur_t * (1 - rel_tol):
                res.history.append(f"round {rnd}: {name}: {cand.describe()} -> {t:.1f} ms (was {cur_t:.1f})")
                cur, cur_t = cand, t
                m_ = re.match(r"(\d+) window\(s\) (\S+) -> (\S+)( \(on its GPU\))?", name)
                last = (m_.group(2), m_.group(3), bool(m_.group(4)), int(m_.group(1))) if m_ else None
                res.trajectory.append(t)
                improved = True
                break
        else:
            if not improved:
                res.converged = True
        if not improved:
            break
    res.plan, res.tpot_ms = cur, cur_t
    res.evaluations = search.evaluations
    res.seconds = time.perf_counter() - t0
    return res
