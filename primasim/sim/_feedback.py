"""The simulator feeds Halda: simulated per-device coefficients, a fixed-point re-plan, and a
re-ranking of candidate plans by simulated TPOT.

Halda's closed form prices a device by analytic coefficients; the simulator sees what they hide:
prefetching that overlaps a reload with other devices' work, page-cache policies that re-read more
(LRU thrashing) or less (swap-out absorbing a small overflow) than the shortfall, and airtime
contention on the links. `sim_corrections` reads those effects off a simulated trace as
`DeviceCorrection`s (primasim.plan.cost): seconds per CPU/GPU layer, seconds per hop, the head's
seconds per token, and an *effective* disk rate -- the rate at which the cost model's own predicted
reload bytes would take as long as compute actually stalled on page faults. `sim_halda` alternates
Halda and the simulator until the plan stops changing; every plan it meets (Halda's choice, its
best candidate per k, and the plans of device subsets) is simulated, and the best one is kept.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from primasim.core.cluster import ClusterSpec
from primasim.core.errors import PlanError
from primasim.core.model import ModelSpec
from primasim.core.plan import DevicePlan, Plan
from primasim.plan.cost import DeviceCorrection, _plan_cost_model, _ring_totals

from ._api import simulate
from ._config import SimConfig
from ._context import SimResult

BIG_BPS = 1e13  # "reloads cost nothing": the simulated device never stalled on page faults


def sim_corrections(res: SimResult, model: ModelSpec, cluster: ClusterSpec) -> dict[str, DeviceCorrection]:
    """Per-device coefficients of a simulated ring plan (decode tokens only)."""
    if not res.feasible or res.trace is None or res.plan is None:
        return {}
    plan, tr = res.plan, res.trace
    n_dec = max(1, max((t.index for t in tr.tokens), default=0))
    tot = plan.totals()
    busy: dict[tuple[str, str], float] = {}
    head_busy: dict[str, float] = {}
    hops: dict[str, list[float]] = {}
    stall: dict[str, float] = {}
    for s in tr.spans:
        if s.token < 1:
            continue
        d = s.end - s.start
        if s.resource in ("cpu", "gpu") and s.name in ("output", "sample"):
            head_busy[s.device] = head_busy.get(s.device, 0.0) + d
        elif s.resource in ("cpu", "gpu"):
            busy[(s.device, s.resource)] = busy.get((s.device, s.resource), 0.0) + d
        elif s.resource == "send" and s.name.startswith("->"):
            hops.setdefault(s.device, []).append(d)
        elif s.resource == "wait":
            stall[s.device] = stall.get(s.device, 0.0) + d
    # reload bytes the cost model predicts for this plan, per device and token
    cm, _ = _plan_cost_model(plan, model, cluster, variant="paper", comm=True)
    lt, lg, wm = _ring_totals(plan)
    disk_s = cm.device_times(lt, lg, wm, pinned=plan.weights == "pinned")["disk"]
    pred_bytes = {nm: float(disk_s[i] * cm.disk[i]) for i, nm in enumerate(cm.names)}
    out: dict[str, DeviceCorrection] = {}
    for d in plan.devices:
        lm, lgm = tot.get(d.name, (0, 0))
        if lm == 0 and d.name != plan.head:
            continue
        kw: dict[str, Any] = {}
        if lm - lgm > 0 and busy.get((d.name, "cpu")):
            kw["cpu_layer_s"] = busy[(d.name, "cpu")] / (n_dec * (lm - lgm))
        if lgm > 0 and busy.get((d.name, "gpu")):
            kw["gpu_layer_s"] = busy[(d.name, "gpu")] / (n_dec * lgm)
        if hops.get(d.name):
            kw["hop_s"] = float(np.mean(hops[d.name]))
        if d.name == plan.head and head_busy.get(d.name):
            # DeviceCorrection.head_s replaces the *compute* part of kappa; the paper variant adds
            # the head's (b_i/V + b_o)/T^cpu read on top, which the simulated output span includes
            read = (model.input_bytes / model.vocab + model.output_bytes) / cluster.device(d.name).ram_bw
            kw["head_s"] = max(0.0, head_busy[d.name] / n_dec - read)
        pb = pred_bytes.get(d.name, 0.0) - (model.input_bytes / model.vocab if d.name == plan.head else 0.0)
        if pb > 1e6:
            st = stall.get(d.name, 0.0) / n_dec
            kw["disk_bps"] = BIG_BPS if st <= 1e-6 else min(BIG_BPS, pb / st)
        out[d.name] = DeviceCorrection(**kw)
    return out


def _key(p: Plan) -> tuple[Any, ...]:
    return (p.k, p.prefetch, tuple((d.name, d.layers, d.gpu_layers) for d in p.devices))


@dataclass
class Candidate:
    plan: Plan
    source: str  # "halda", "halda k=..", "subset ..", "sim-halda it ..."
    tpot_ms: float
    predicted_ms: float | None = None
    result: SimResult | None = field(default=None, repr=False)


@dataclass
class SimHaldaResult:
    best: Candidate
    closed_form: Candidate  # closed-form Halda's own choice, simulated
    candidates: list[Candidate]
    iterations: int
    converged: bool
    history: list[str] = field(default_factory=list)
    by_source: dict[str, Candidate] = field(default_factory=dict)  # every named plan met, simulated
    fixed_point: Candidate | None = None  # the plan Halda returned twice in a row (None: no fixed point)

    def summary(self) -> dict[str, Any]:
        return {"best": {"plan": self.best.plan.describe(), "source": self.best.source, "tpot_ms": self.best.tpot_ms},
                "closed_form": {"plan": self.closed_form.plan.describe(), "tpot_ms": self.closed_form.tpot_ms,
                                "predicted_ms": self.closed_form.predicted_ms},
                "iterations": self.iterations, "converged": self.converged, "history": self.history,
                "candidates": len(self.candidates)}


def _with_head(plan: Plan, cluster: ClusterSpec) -> Plan:
    """A subset plan in the full cluster's ring: devices left out keep 0 layers; the head stays first."""
    order = _ring(cluster)
    win = {d.name: d for d in plan.devices}
    devs = tuple(win.get(nm, DevicePlan(nm, 0, 0)) for nm in order)
    return plan.replace(devices=devs)


def _ring(cluster: ClusterSpec) -> list[str]:
    names = cluster.names
    h = names.index(cluster.head)
    return names[h:] + names[:h]


class _Evaluator:
    def __init__(self, model: ModelSpec, cluster: ClusterSpec, cfg: SimConfig, system: str) -> None:
        self.model, self.cluster, self.cfg, self.system = model, cluster, cfg, system
        self.seen: dict[tuple[Any, ...], Candidate] = {}
        self.sources: dict[str, Candidate] = {}

    def __call__(self, plan: Plan, source: str, predicted_ms: float | None = None) -> Candidate:
        key = _key(plan)
        if key in self.seen:
            self.sources.setdefault(source, self.seen[key])
            return self.seen[key]
        res = simulate(self.system, self.model, self.cluster, plan=plan, config=self.cfg)
        c = Candidate(plan, source, res.tpot_ms if res.feasible else math.inf, predicted_ms, res)
        self.seen[key] = c
        self.sources[source] = c
        return c


def rerank(model: ModelSpec, cluster: ClusterSpec, *, config: SimConfig | None = None, n_ctx: int = 1024,
           k: int | None = None, subsets: bool = True, system: str = "prima",
           corrections: dict[str, DeviceCorrection] | None = None, _ev: _Evaluator | None = None,
           extra: Sequence[tuple[str, Plan]] = (), prefetch_variants: bool = False,
           **halda_kw: Any) -> list[Candidate]:
    """Closed-form Halda's plan, its best plan per k, and the Halda plans of device subsets, each
    simulated; sorted by simulated TPOT (best first). `extra`: more (source, plan) candidates
    (e.g. even splits); `prefetch_variants`: also every candidate with prefetch switched."""
    from primasim.plan.halda import halda

    cfg = config or SimConfig()
    ev = _ev or _Evaluator(model, cluster, cfg, system)
    kw = {"n_ctx": n_ctx, "k": k, "variant": "paper", "comm": True, **halda_kw}
    # both of Halda's searches: prima.cpp's local one over set assignments, and the global one
    modes = [{"global_opt": g} for g in (False, True)] if "global_opt" not in halda_kw else [{}]
    out: list[Candidate] = []
    for mode in modes:
        tag = "halda" + ("-global" if mode.get("global_opt") else "")
        h = halda(model, cluster, corrections=corrections, **kw, **mode)
        out.append(ev(h.plan, tag, h.objective * 1e3))
        for c in h.candidates:
            out.append(ev(c, f"{tag} k={c.k}", c.predicted_tpot_ms))
        if not subsets:
            continue
        names = cluster.names
        for r in range(1, len(names)):
            for sub in itertools.combinations(names, r):
                cs = cluster.subset(list(sub))
                corr = {n: c for n, c in (corrections or {}).items() if n in sub}
                try:
                    hs = halda(model, cs, corrections=corr, **kw, **mode)
                except PlanError:
                    continue  # the subset cannot hold the model
                out.append(ev(_with_head(hs.plan, cluster), f"{tag} subset {'+'.join(sub)}", hs.objective * 1e3))
    out += [ev(p, src) for src, p in extra]
    if prefetch_variants:
        out += [ev(c.plan.replace(prefetch=not c.plan.prefetch), f"{c.source} prefetch {'off' if c.plan.prefetch else 'on'}")
                for c in list(out)]
    uniq: dict[tuple[Any, ...], Candidate] = {}
    for c in out:
        uniq.setdefault(_key(c.plan), c)
    return sorted(uniq.values(), key=lambda c: c.tpot_ms)


def sim_halda(model: ModelSpec, cluster: ClusterSpec, *, config: SimConfig | None = None, n_ctx: int = 1024,
              k: int | None = None, max_iter: int = 6, subsets: bool = True, system: str = "prima",
              extra: Sequence[tuple[str, Plan]] = (), prefetch_variants: bool = False,
              **halda_kw: Any) -> SimHaldaResult:
    """Halda with simulator-in-the-loop coefficients, iterated to a fixed point, plus re-ranking.

    Iteration i: Halda (its global search, which optimises whatever coefficients it is given)
    solves with the corrections read off simulating iteration i-1's plan; stop when Halda returns
    the plan it returned before (plan and coefficients agree) or after `max_iter` rounds. Every
    plan met on the way -- closed-form Halda's (both searches), its best plan per k, with
    `subsets` the closed-form plans of every device subset -- is simulated; the result keeps the
    best by simulated TPOT. `closed_form` is prima.cpp's own (local-search) Halda, simulated.
    """
    from primasim.plan.halda import halda

    cfg = config or SimConfig()
    ev = _Evaluator(model, cluster, cfg, system)
    kw = {"n_ctx": n_ctx, "k": k, "variant": "paper", "comm": True, "global_opt": True, **halda_kw}
    rerank(model, cluster, config=cfg, n_ctx=n_ctx, k=k, subsets=subsets, system=system, _ev=ev, extra=extra,
           prefetch_variants=prefetch_variants, **halda_kw)
    closed = ev.sources["halda-global" if halda_kw.get("global_opt") else "halda"]
    start = ev.sources.get("halda-global", closed)
    history = [f"closed form: {closed.plan.describe()} -> {closed.tpot_ms:.1f} ms simulated",
               f"fixed point starts from: {start.plan.describe()} -> {start.tpot_ms:.1f} ms simulated"]
    cur = start
    corr: dict[str, DeviceCorrection] = {}
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        corr = _blend(corr, sim_corrections(cur.result, model, cluster) if cur.result is not None else {})
        try:
            h = halda(model, cluster, corrections=corr, **kw)
        except PlanError as exc:
            history.append(f"iteration {it}: Halda failed with simulated coefficients ({exc.what})")
            break
        nxt = ev(h.plan, f"sim-halda it {it}", h.objective * 1e3)
        ev.sources[f"sim-halda it {it}"] = nxt
        for c in h.candidates:
            ev(c, f"sim-halda it {it} k={c.k}", c.predicted_tpot_ms)
        history.append(f"iteration {it}: {h.plan.describe()} -> {nxt.tpot_ms:.1f} ms simulated "
                       f"(Halda with simulated coefficients predicts {h.objective * 1e3:.1f} ms)")
        if _key(nxt.plan) == _key(cur.plan):
            converged = True
            break
        cur = nxt
    allc = sorted(ev.seen.values(), key=lambda c: c.tpot_ms)
    return SimHaldaResult(best=allc[0], closed_form=closed, candidates=allc, iterations=it, converged=converged,
                          history=history, by_source=dict(ev.sources), fixed_point=cur if converged else None)


def _blend(old: dict[str, DeviceCorrection], new: dict[str, DeviceCorrection]) -> dict[str, DeviceCorrection]:
    """Next iteration's coefficients: the new observations, with the effective disk rate damped
    (geometric mean with the previous one) so that a device that thrashed in one plan and sat idle
    in the next does not make the re-plan oscillate; devices the new plan left out keep theirs."""
    out = dict(old)
    for name, c in new.items():
        prev = old.get(name)
        disk = c.disk_bps
        if prev is not None and prev.disk_bps is not None:
            disk = math.sqrt(prev.disk_bps * disk) if disk is not None else prev.disk_bps
        out[name] = DeviceCorrection(c.cpu_layer_s, c.gpu_layer_s, disk, c.hop_s, c.head_s)
    return out
