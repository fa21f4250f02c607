"""One registry of systems (primasim.core.systems): the planner, the simulator and the runtime each
cover exactly the registry's names and agree with it on each system's schedule."""

from __future__ import annotations

import pytest

from primasim.core.cluster import load_cluster
from primasim.core.model_sources import load_model
from primasim.core.systems import RUNTIME_SCHEDULES, SYSTEMS
from primasim.plan.planners import PLANNERS
from primasim.sim import make_plan
from primasim.sim._systems import get_system, system_names


def test_planners_and_simulator_cover_exactly_the_registry() -> None:
    assert set(PLANNERS) == set(SYSTEMS)
    assert set(system_names()) == set(SYSTEMS)
    for name in SYSTEMS:
        entry = get_system(name)
        assert entry.name == name and entry.help == SYSTEMS[name].help


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_a_plan_has_the_schedule_the_registry_states(name: str) -> None:
    """What the runtime executes is decided from the plan's schedule: it must be the registry's."""
    out = make_plan(name, load_model("llama-3-8b"), load_cluster("prima-d1-d4"))
    if not out.feasible:
        pytest.skip(f"{name} cannot run this case: {out.reason}")
    assert out.plan.schedule == SYSTEMS[name].schedule
    assert SYSTEMS[name].runs_on_runtime == (out.plan.schedule in RUNTIME_SCHEDULES)
