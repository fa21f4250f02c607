"""`simulate()`: plan (or take a plan), check it, and run the system's schedule on the devices."""

from __future__ import annotations

from typing import Any

from primasim.core.cluster import ClusterSpec
from primasim.core.errors import PlanError
from primasim.core.model import ModelSpec
from primasim.core.plan import Plan, violations

from ._config import SimConfig
from ._context import SimContext, SimResult, infeasible
from ._systems import get_system


def plan_for(system: str, model: ModelSpec, cluster: ClusterSpec, cfg: SimConfig, **options: Any) -> Any:
    """The planner's outcome for `system` (primasim.plan.planners.make_plan)."""
    try:
        from primasim.plan.planners import make_plan
    except ModuleNotFoundError as exc:  # the planners module is another part of the toolkit
        if exc.name != "primasim.plan.planners":
            raise
        raise PlanError("no planner available (primasim.plan.planners is missing)", where=system,
                        fix="pass a plan explicitly (simulate(..., plan=...) or --plan FILE)") from None
    return make_plan(system, model, cluster, n_ctx=int(options.pop("n_ctx", 1024)),
                     prompt_tokens=cfg.prompt_tokens, **options)


def simulate(system: str, model: ModelSpec, cluster: ClusterSpec, *, plan: Plan | None = None,
             config: SimConfig | None = None, **plan_options: Any) -> SimResult:
    """Simulate `system` serving `model` on `cluster`; plans with the system's planner if no plan.

    Returns a SimResult (trace, metrics, plan); an infeasible case (OOM, no valid plan) comes back
    with `feasible = False` and the reason, never as an exception.
    """
    cfg = config or SimConfig()
    entry = get_system(system)
    if plan is None:
        outcome = plan_for(system, model, cluster, cfg, **plan_options)
        if not outcome.feasible or outcome.plan is None:
            return infeasible(system, outcome.reason or "no feasible plan", outcome.plan, cfg)
        plan = outcome.plan
    if cfg.prefetch is not None and entry.schedule == "ring" and plan.weights == "mmap":
        plan = plan.replace(prefetch=cfg.prefetch)  # the result shows the plan as simulated
    if entry.schedule in ("ring", "tp"):
        vs = violations(plan, model, cluster)
        if vs:
            return infeasible(system, "; ".join(str(v) for v in vs), plan, cfg)
    if entry.schedule == "tp":
        n = len(plan.active)
        if n & (n - 1) or n > model.n_kv_heads:
            return infeasible(system, f"tensor parallelism over {n} devices: distributed-llama needs a power of "
                              f"two <= n_kv_heads ({model.n_kv_heads})", plan, cfg)
    ctx = SimContext(system, model, cluster, plan, cfg)
    if cfg.runtime:  # primasim's runtime executes the plan, whatever system made it
        from ._runtime import run_runtime

        return run_runtime(ctx)
    return entry.runner(ctx, entry)
