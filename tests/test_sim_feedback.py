"""The simulator feeding Halda: coefficients read off a simulated trace."""

from __future__ import annotations

import pytest

from primasim import load_model
from primasim.core.cluster import ClusterSpec
from primasim.core.plan import DevicePlan, Plan
from primasim.plan.cost import CostModel
from primasim.plan.halda import halda
from primasim.sim import SimConfig, sim_corrections, simulate

CFG = SimConfig(tokens=6, jitter=False)


def test_corrections_of_a_resident_plan_are_the_analytic_coefficients(d1d4: ClusterSpec) -> None:
    m = load_model("llama3-8b", "q4k")
    plan = Plan("prima", m.name, 32, 2, (DevicePlan("D1", 2, 2), DevicePlan("D2", 6, 6), DevicePlan("D3", 6, 3),
                                          DevicePlan("D4", 2, 0)), quant="q4k")
    # the cost model's accounting (n_ctx KV reads, compute + memory summed, bytes / bandwidth on the air)
    exact = CFG.replace(prefetch=False, kv_read="ctx", roofline=False, wifi_frames=False)
    res = simulate("prima", m, d1d4, plan=plan, config=exact)
    corr = sim_corrections(res, m, d1d4)
    cm = CostModel.for_cluster(m, d1d4, n_ctx=plan.n_ctx, variant="paper", comm=True)
    i = {n: j for j, n in enumerate(cm.names)}
    assert corr["D4"].cpu_layer_s == pytest.approx(cm.alpha[i["D4"]], rel=1e-6)
    assert corr["D3"].cpu_layer_s == pytest.approx(cm.alpha[i["D3"]], rel=1e-6)
    assert corr["D2"].gpu_layer_s == pytest.approx(cm.alpha[i["D2"]] + cm.beta[i["D2"]], rel=1e-6)
    assert corr["D1"].hop_s == pytest.approx(cm.t_comm[i["D1"]], rel=1e-6)
    assert all(c.disk_bps is None for c in corr.values())  # nothing reloads, nothing to correct


def test_thrashing_shows_up_as_a_slower_effective_disk(d1d4: ClusterSpec) -> None:
    """D4 (Android) overloaded far beyond what it can swap out: the simulator re-reads its whole
    slice every token, the cost model only the shortfall -> a lower effective disk rate."""
    m = load_model("llama3-70b", "q4k")
    plan = Plan("prima", m.name, 80, 1, (DevicePlan("D1", 5, 5), DevicePlan("D2", 23, 15), DevicePlan("D3", 40, 21),
                                          DevicePlan("D4", 12, 0)), quant="q4k", prefetch=False)
    res = simulate("prima", m, d1d4, plan=plan, config=CFG.replace(tokens=3))
    corr = sim_corrections(res, m, d1d4)
    assert corr["D4"].disk_bps is not None
    assert corr["D4"].disk_bps < 0.6 * d1d4.device("D4").disk_speed


def test_halda_fed_with_simulated_coefficients_predicts_the_simulation(d1d4: ClusterSpec) -> None:
    """Closing the loop: with the coefficients read off a simulated (resident, no-jitter) plan,
    the cost model's prediction for that plan is the simulated TPOT."""
    from primasim.plan.cost import predict_tpot

    m = load_model("llama3-45b", "q4k")
    h = halda(m, d1d4, n_ctx=1024, variant="paper", comm=True, global_opt=True)
    res = simulate("prima", m, d1d4, plan=h.plan, config=CFG.replace(prefetch=False, sample_cost_per_vocab=0.0))
    corr = sim_corrections(res, m, d1d4)
    pred = predict_tpot(h.plan, m, d1d4, variant="paper", comm=True, corrections=corr) * 1e3
    assert pred == pytest.approx(res.tpot_ms, rel=0.02)
