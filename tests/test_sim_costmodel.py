"""Simulator vs the analytic cost model (primasim.plan.cost, paper variant with communication).

Where the cost model's assumptions hold -- every weight resident, nothing overlapping, an idle
network -- the simulated TPOT equals predict_tpot within 1 %. Where they do not, the direction of
the difference is what the README explains: prefetching hides disk time the model sums up, airtime
contention adds time the model does not see, and the page cache re-reads more (LRU thrashing) or
less (idle memory swapped out) than the model's shortfall.
"""

from __future__ import annotations

import pytest

from primasim import load_cluster, load_model
from primasim.core.cluster import ClusterSpec, NetworkSpec
from primasim.core.plan import DevicePlan, Plan
from primasim.plan.cost import predict_tpot
from primasim.plan.planners import make_plan
from primasim.sim import SimConfig, simulate
from primasim.sim._testbeds import prefetch_pair

EXACT = SimConfig(tokens=6, jitter=False, prefetch=False, sample_cost_per_vocab=0.0, kv_read="ctx", wifi_frames=False,
                  roofline=False)


def _plan(model, devs, k, **kw) -> Plan:  # type: ignore[no-untyped-def]
    return Plan("prima", model.name, model.n_layers, k, tuple(DevicePlan(*d) for d in devs), quant=model.quant,
                **kw)


@pytest.mark.parametrize("name,devs,k", [
    ("one device, all on the GPU", [("D3", 32, 32)], 1),
    ("one device, GPU + CPU", [("D3", 32, 20)], 1),
    ("piped ring, k = 2", [("D1", 2, 2), ("D2", 6, 6), ("D3", 6, 6), ("D4", 2, 0)], 2),
    ("piped ring, k = 4", [("D1", 1, 1), ("D2", 3, 3), ("D3", 3, 2), ("D4", 1, 0)], 4),
    ("head on a CPU window, k = 1", [("D1", 4, 4), ("D2", 12, 12), ("D3", 14, 14), ("D4", 2, 0)], 1),
])
def test_resident_no_overlap_matches_cost_model(d1d4: ClusterSpec, name: str, devs: list, k: int) -> None:
    m = load_model("llama3-8b", "q4k")
    plan = _plan(m, devs, k)
    res = simulate("prima", m, d1d4, plan=plan, config=EXACT)
    assert res.feasible, res.reason
    assert sum(res.extra["disk_read_bytes_per_token"].values()) < 1e6  # one embedding row, no reloads
    pred = predict_tpot(plan, m, d1d4, variant="paper", comm=True) * 1e3
    assert res.tpot_ms == pytest.approx(pred, rel=0.01), name


def test_wifi_airtime_contention_adds_time(d1d4: ClusterSpec) -> None:
    """dllama's all-to-all sends N(N-1) slices per all-reduce: on one Wi-Fi medium they queue for
    airtime, on a switched network they do not. Same latencies and bandwidths otherwise."""
    m = load_model("llama3-8b", "q4k")
    out = make_plan("dllama", m, d1d4)
    assert out.feasible
    wifi = simulate("dllama", m, d1d4, plan=out.plan, config=EXACT)
    net = d1d4.network
    sw = ClusterSpec(d1d4.name, d1d4.devices, NetworkSpec("switched", net.bandwidth, net.latency, 0.0,
                                                          contention="pair"), d1d4.head)
    switched = simulate("dllama", m, sw, plan=out.plan, config=EXACT)
    assert wifi.tpot_ms > 1.05 * switched.tpot_ms
    assert wifi.trace.meta["airtime_busy_s"] > 0


def test_switched_nics_limit_an_all_to_all() -> None:
    """On a switch every device sends through one NIC: dllama on 8 nodes at 100 Mbps sends 7 slices
    per node per all-reduce one after the other, as the cost model counts ((N - 1) slices per sync);
    independent per-pair links (the emulation's) would carry them at once, 2-3x faster."""
    from primasim.core.units import MBPS, MS, GiB
    from primasim.plan.cost import schedule_estimate

    base = load_cluster("prima-fig2-cpu4").device("C1")
    devs = tuple(base.replace(name=f"N{i}", ram_avail=7.5 * GiB) for i in range(8))
    m = load_model("llama3-8b", "q4k")
    res = {}
    for cont in ("nic", "pair"):
        cl = ClusterSpec("sw8", devs, NetworkSpec("switched", 100 * MBPS, 1 * MS, 0.0, contention=cont), "N0")
        plan = make_plan("dllama", m, cl).plan
        res[cont] = simulate("dllama", m, cl, plan=plan, config=EXACT).tpot_ms
    est = schedule_estimate(plan, m, cl)["tpot"] * 1e3
    assert res["nic"] == pytest.approx(est, rel=0.25)
    assert res["pair"] < 0.6 * res["nic"]


def test_prefetch_overlap_beats_the_summed_disk_time() -> None:
    """The cost model adds every device's disk time to the token (the paper's worst case); the
    simulated piped ring prefetches a window while the other device computes, so it ends up below
    that sum, and below itself without prefetching."""
    m = load_model("llama3-8b", "q4k")
    cl = prefetch_pair(m)
    plan = _plan(m, [("A", 13, 0), ("B", 3, 0)], 2)
    cfg = EXACT.replace(prefetch=True)
    with_pf = simulate("prima", m, cl, plan=plan, config=cfg)
    without = simulate("prima", m, cl, plan=plan, config=EXACT)
    pred = predict_tpot(plan, m, cl, variant="paper", comm=True) * 1e3
    assert with_pf.tpot_ms < pred
    assert with_pf.tpot_ms < 0.9 * without.tpot_ms


def test_page_cache_dynamics_against_the_shortfall_model(d1d4: ClusterSpec) -> None:
    """The cost model re-reads exactly the shortfall on Linux. The simulated page cache re-reads
    *everything* once a cyclic scan overflows it by more than the idle memory the kernel can swap
    out (llama.cpp at 70B: LRU thrashing, slower than predicted), and nothing when a small
    overflow is absorbed by swapping idle pages out (llama.cpp at 45B: faster than predicted)."""
    cfg = EXACT.replace(tokens=3)
    for name, slower in (("llama3-70b", True), ("llama3-45b", False)):
        m = load_model(name, "q4k")
        plan = make_plan("llama.cpp", m, d1d4).plan
        assert plan is not None
        pred = predict_tpot(plan, m, d1d4, variant="paper", comm=True) * 1e3
        sim = simulate("llama.cpp", m, d1d4, plan=plan, config=cfg)
        if slower:
            assert sim.tpot_ms > 1.2 * pred
            assert sim.extra["disk_read_bytes_per_token"]["D3"] > 0.9 * (plan.totals()["D3"][0] - plan.totals()["D3"][1]) \
                * m.layer_bytes
        else:
            assert sim.tpot_ms < 0.8 * pred
