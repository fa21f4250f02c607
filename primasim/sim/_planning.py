"""Planning with the simulator at hand: `simulate()` without a plan asks the system's planner, and
the prima systems' option planner=sim searches with the simulator in the loop.

The planners (primasim.plan) sit below the simulator and never import it; the simulator's
planner reaches them as a registered hook (`planners.PLANNER_HOOKS["sim"]`, filled on import here).
"""

from __future__ import annotations

from typing import Any

from primasim.core.cluster import ClusterSpec
from primasim.core.model import ModelSpec
from primasim.core.plan import Plan
from primasim.plan import planners
from primasim.plan.common import Ctx, opt_bool

from ._api import simulate_plan
from ._config import SimConfig
from ._context import SimResult, infeasible
from ._planner import sim_plan
from ._speculative import simulate_speculative
from ._systems import get_system


def plan_for(system: str, model: ModelSpec, cluster: ClusterSpec, cfg: SimConfig, **options: Any) -> planners.PlanOutcome:
    """The system's planner's outcome for a simulation run with `cfg` (its prompt length)."""
    return planners.make_plan(system, model, cluster, n_ctx=int(options.pop("n_ctx", 1024)),
                              prompt_tokens=cfg.prompt_tokens, **options)


def simulate(system: str, model: ModelSpec, cluster: ClusterSpec, *, plan: Plan | None = None,
             config: SimConfig | None = None, **plan_options: Any) -> SimResult:
    """Simulate `system` serving `model` on `cluster`; plans with the system's planner if no plan.

    Returns a SimResult (trace, metrics, plan); an infeasible case (OOM, no valid plan) comes back
    with `feasible = False` and the reason, never as an exception.
    """
    cfg = config or SimConfig()
    get_system(system)  # an unknown system fails here, with the list
    if cfg.draft is not None and cfg.draft.tokens > 0:  # speculative decoding plans with the draft loaded
        return simulate_speculative(system, model, cluster, plan, cfg, **plan_options)
    if plan is None:
        outcome = plan_for(system, model, cluster, cfg, **plan_options)
        if not outcome.feasible or outcome.plan is None:
            return infeasible(system, outcome.reason or "no feasible plan", outcome.plan, cfg)
        plan = outcome.plan
    return simulate_plan(system, model, cluster, plan, cfg)


def sim_planner_plan(system: str, prefetch: bool, model: ModelSpec, cluster: ClusterSpec, ctx: Ctx,
                     kw: dict[str, Any]) -> tuple[Plan, dict[str, Any]]:
    """Option planner=sim of the prima systems (a `primasim.plan.common.SimPlanner`): the
    simulator-in-the-loop planner (`sim_plan`), a local search from Halda's plan, each move judged by
    simulating it. The option checks (unused options, k divides L) are the planner's, before this."""
    halda_kw = {k: v for k, v in kw.items() if k in ("solver", "master_priority", "select_devices")}
    rt = opt_bool(ctx.opt("sim_runtime"), "sim_runtime") if ctx.opt("sim_runtime") is not None else False
    cfg = SimConfig(tokens=8, prompt_tokens=ctx.prompt_tokens, runtime=rt, warmup=not rt)
    res = sim_plan(model, cluster, config=cfg, n_ctx=ctx.n_ctx, k=kw.get("k"), system=system, prefetch_moves=rt,
                   **halda_kw)
    plan = res.plan.replace(system=system, prefetch=res.plan.prefetch if rt else prefetch, notes=res.plan.notes + (
        f"planner: sim ({len(res.history)} moves from Halda's plan; simulated {res.start_tpot_ms:.1f} -> "
        f"{res.tpot_ms:.1f} ms)",))
    return plan, {"sim_planner": res.summary()}


planners.PLANNER_HOOKS["sim"] = sim_planner_plan
