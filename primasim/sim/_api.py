"""`simulate_plan()`: check a plan and run the system's schedule on the devices."""

from __future__ import annotations

from primasim.core.cluster import ClusterSpec
from primasim.core.model import ModelSpec
from primasim.core.plan import Plan, violations

from ._config import SimConfig
from ._context import SimContext, SimResult, infeasible
from ._runtime import run_runtime
from ._speculative import simulate_speculative
from ._systems import get_system


def simulate_plan(system: str, model: ModelSpec, cluster: ClusterSpec, plan: Plan,
                  config: SimConfig | None = None) -> SimResult:
    """Simulate `plan` as `system` runs it (`config.runtime`: as primasim's runtime runs it).

    An infeasible case (a plan that does not fit, a schedule the system cannot run) comes back
    with `feasible = False` and the reason, never as an exception.
    """
    cfg = config or SimConfig()
    if cfg.draft is not None and cfg.draft.tokens > 0:  # speculative decoding (K = 0: plain, no draft loaded)
        return simulate_speculative(system, model, cluster, plan, cfg)
    entry = get_system(system)
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
        return run_runtime(ctx)
    return entry.runner(ctx, entry)
