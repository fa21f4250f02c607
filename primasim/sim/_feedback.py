"""The simulator feeds Halda: per-device coefficients read off a simulated trace.

Halda's closed form prices a device by analytic coefficients; the simulator sees what they hide:
prefetching that overlaps a reload with other devices' work, page-cache policies that re-read more
(LRU thrashing) or less (swap-out absorbing a small overflow) than the shortfall, and airtime
contention on the links. `sim_corrections` reads those effects off a simulated trace as
`DeviceCorrection`s (primasim.plan.cost): seconds per CPU/GPU layer, seconds per hop, the head's
seconds per token, and an *effective* disk rate -- the rate at which the cost model's own predicted
reload bytes would take as long as compute actually stalled on page faults. The simulator-in-the-
loop planner (primasim.sim._planner) re-solves Halda with them to generate candidate plans.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from primasim.core.cluster import ClusterSpec
from primasim.core.model import ModelSpec
from primasim.plan.cost import DeviceCorrection, _plan_cost_model, _ring_totals

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
