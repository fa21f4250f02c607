"""Halda as one optimisation model, the planner: ``halda_model()`` (``--planner global``).

The model is primasim.plan.halda_model; it is solved by relaxation + rounding (primasim.plan.halda_relax,
the default) or exactly as a MILP. This module turns the answer into a validated Plan.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np

from primasim.core.cluster import ClusterSpec
from primasim.core.errors import PlanError, SpecError
from primasim.core.model import ModelSpec
from primasim.core.plan import DevicePlan, Plan, violations

from .cost import Corrections, CostModel, totals_of
from .halda_common import HaldaResult, _ring, check_k_and_priority
from .halda_model import ModelData, ModelSolution, solve_exact
from .halda_relax import _tables, solve_relax


def solve(d: ModelData, solver: str) -> ModelSolution | None:
    if solver == "exact":
        return solve_exact(d)
    if solver == "relax":
        return solve_relax(d)
    raise PlanError(f"unknown solver {solver!r} for the Halda model", where="--solver", fix="relax or exact")


# ------------------------------------------------------------------------------ the planner
def halda_model(model: ModelSpec, cluster: ClusterSpec, *, n_ctx: int = 1024, k: int | None = None,
                solver: str = "relax", variant: str = "paper", comm: bool = True, general: bool = False,
                select_devices: bool = True, master_priority: float = 1.01,
                corrections: Corrections | None = None, candidates: bool = False) -> HaldaResult:
    """Halda as one model (module docstring): the plan minimising the cost model, by relaxation +
    rounding (``solver="relax"``) or exactly (``"exact"``, the MILP).

    ``k=None`` solves at k = 1 (optimal when k is free, see the module docstring); a fixed ``k``
    is honoured or refused with a PlanError saying why: it must divide L unless ``general``, and
    some plan must have that many laps. ``select_devices=False`` keeps every device in the ring.
    ``candidates=True`` also solves every valid k (closed form) and returns the best plan of each
    in ``HaldaResult.candidates`` (for the simulator-in-the-loop planner).
    """
    t0 = time.perf_counter()
    if solver not in ("relax", "exact"):
        raise SpecError(f"unknown solver {solver!r}", where="--solver", fix="use relax or exact")
    L = model.n_layers
    check_k_and_priority(k, L, general, master_priority)
    ring = _ring(cluster)
    cm = CostModel(model, [cluster.device(nm) for nm in ring], cluster.network, 0, n_ctx=n_ctx, variant=variant,
                   comm=comm, corrections={nm: c for nm, c in (corrections or {}).items() if nm in ring})
    kk = 1 if k is None else k
    # with --general, k laps means any W with ceil(L/W) = k (the last lap may be partial); without,
    # L = k*W (prima.cpp); k = 1 has no partial lap either way
    d = ModelData(cm, kk, bool(general and kk >= 2), master_priority, select_devices)
    sol = solve(d, solver)
    notes: list[str] = []
    if (sol is None or not math.isfinite(sol.objective)) and cm.slow_disk.any():
        # prima.cpp keeps devices whose disk is slower than 0.1 GB/s in memory (M4); when no plan
        # can, let them overflow too, charged at their real disk speed, rather than return nothing
        slow = [nm for nm, x in zip(ring, cm.slow_disk) if x]
        cm = copy.copy(cm)
        cm.slow_disk = np.zeros(cm.M, bool)
        d = ModelData(cm, d.k, d.general, master_priority, select_devices)
        sol = solve(d, solver)
        notes.append(f"no plan keeps the slow-disk devices {', '.join(slow)} in memory (prima.cpp's M4 rule); "
                     "they may overflow here, at their disk speed")
    if sol is None or not math.isfinite(sol.objective):
        raise PlanError(_why_infeasible(cm, d, k), where="halda",
                        fix="add memory (devices, RAM, VRAM), shorten the context (--n-ctx), use a smaller model"
                        + (", or another --k" if k is not None else ""))
    opts: dict[str, Any] = {"planner": "halda-global", "solver": solver, "variant": variant, "comm": comm,
                            "general": general, "master_priority": master_priority}
    if k is not None:
        opts["k_fixed"] = k
    plan, objective, sets = _result_plan(sol.w, sol.n, cm, cluster, ring, model, n_ctx, opts)
    cands: list[Plan] = []
    if candidates:
        for kc in [x for x in range(1, L // 2 + 1) if L % x == 0 and x != kk]:
            dc = ModelData(cm, kc, False, master_priority, select_devices)
            sc = solve(dc, solver)
            if sc is not None and math.isfinite(sc.objective):
                cands.append(_result_plan(sc.w, sc.n, cm, cluster, ring, model, n_ctx, dict(opts, k_fixed=kc))[0])
        cands = sorted(cands + [plan], key=lambda p: p.k)
    dropped = [d_.name for d_ in plan.devices if d_.layers == 0]
    if dropped:
        notes.append(f"left out (no layers; the model's device selection): {', '.join(dropped)}")
    notes.append(f"{solver}: objective {sol.objective * 1e3:.2f} ms, lower bound {sol.bound * 1e3:.2f} ms"
                 + (f" (rounding: {sol.rounding})" if sol.rounding else ""))
    plan = plan.replace(notes=tuple(notes))
    return HaldaResult(plan=plan, objective=objective, k=plan.k, sets=sets, iterations=1,
                       solve_time=time.perf_counter() - t0, candidates=cands, dropped=dropped, rounds=1, notes=notes,
                       lower_bound=sol.bound, model_objective=sol.objective)


def _result_plan(w: np.ndarray, n: np.ndarray, cm: CostModel, cluster: ClusterSpec, ring: list[str],
                 model: ModelSpec, n_ctx: int, opts: dict[str, Any]) -> tuple[Plan, float, list[str]]:
    """The Plan for windows (w, n) in ring order, its cost-model TPOT and every device's set."""
    devs = tuple(DevicePlan(nm, int(w[i]), int(n[i])) for i, nm in enumerate(ring))
    W = int(w.sum())
    plan = Plan(system="prima", model=model.name, n_layers=model.n_layers, k=math.ceil(model.n_layers / W),
                devices=devs, quant=model.quant, schedule="ring", weights="mmap", prefetch=True, n_ctx=n_ctx,
                options=dict(opts))
    lt, lg, win = totals_of(w, n, model.n_layers)
    act = w > 0
    sets = cm.sets(lt, lg)
    sets = [s if act[i] else "-" for i, s in enumerate(sets)]
    # the plan's TPOT as predict_tpot computes it: the cost model over the active ring
    acm = CostModel(model, [cm.devices[i] for i in np.flatnonzero(act)], cluster.network, 0, n_ctx=n_ctx,
                    variant=cm.variant, comm=cm.comm,
                    corrections={nm: c for nm, c in cm.corrections.items() if w[ring.index(nm)] > 0})
    objective = acm.tpot(lt[act], lg[act], win[act])
    plan = plan.replace(predicted_tpot_ms=objective * 1e3)
    vs = violations(plan, model, cluster)
    if vs:
        raise PlanError("the Halda model produced an invalid plan: " + "; ".join(map(str, vs)), where="halda",
                        fix="this is a bug: report the cluster and model")
    return plan, objective, sets


def _why_infeasible(cm: CostModel, d: ModelData, k: int | None) -> str:
    """One sentence on why no plan exists (for the PlanError)."""
    head = cm.names[cm.head]
    T, _ = _tables(d, 1, np.full(d.M, -1))
    if not np.isfinite(T[cm.head, 1:]).any():
        why = ("its disk is slower than 0.1 GB/s, so prima.cpp requires it to fit in memory" if cm.slow_disk[cm.head]
               else "its KV cache and buffers do not fit in RAM + swap")
        return f"the head {head} cannot hold one layer plus the output layer: {why}"
    if k is not None:
        hosts = int(np.isfinite(T[:, 1:]).any(axis=1).sum())
        return (f"no plan of {cm.model.name} on these {cm.M} devices has k = {k} laps ({hosts} devices can hold a "
                f"layer; with k = {k} each holds a multiple of {k} layers and the memory rows must hold)")
    return f"no allocation of {cm.model.name} fits on {cm.M} devices (memory, KV cache or slow disks)"
