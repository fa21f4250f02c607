"""Halda as one optimisation model (primasim.plan.halda_model): relaxation + rounding vs the MILP
(the global optimum of the cost model) vs the dynamic programme, and honest fixed k."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from primasim import load_model
from primasim.core.cluster import ClusterSpec, load_cluster
from primasim.core.device import DeviceSpec
from primasim.core.errors import PlanError
from primasim.core.plan import violations
from primasim.core.synth import random_cluster
from primasim.core.units import GB, GiB
from primasim.plan.cost import CostModel, predict_tpot, totals_of
from primasim.plan.halda import _dp_blocks, _global_block, halda
from primasim.plan.halda_model import _CACHE, ModelData, solve_exact
from primasim.plan.halda_relax import solve_relax

C4 = load_cluster("prima-d1-d4")
TABLE4 = ["llama3-8b", "llama3-14b", "llama1-30b", "llama3-45b", "llama3-60b", "llama1-65b", "llama3-70b"]
MODELS = TABLE4 + ["qwen2.5-7b", "qwen2.5-32b", "qwen2.5-72b", "tinyllama-1.1b", "llama2-7b", "codellama-13b"]
TOL = 0.005  # the target: relax + round within 0.5 % of the MILP


def _data(model, cluster, k=1, general=False, variant="paper", comm=True, select=True):  # type: ignore[no-untyped-def]
    from primasim.plan.halda_common import _ring

    ring = _ring(cluster)
    cm = CostModel(model, [cluster.device(n) for n in ring], cluster.network, 0, n_ctx=1024, variant=variant,
                   comm=comm)
    return cm, ModelData(cm, k, general, 1.01, select)


def _dp(cm: CostModel, k: int, general: bool, select: bool = True) -> float:
    sols = [s for s in (_global_block(cm, b, 1.01, select) for b in _dp_blocks(cm.L, cm.M, k, general)) if s]
    return min((s.objective for s in sols), default=np.inf)


@pytest.mark.parametrize("name", TABLE4)
def test_the_paper_testbed_relax_exact_and_dp_agree(name: str) -> None:
    m = load_model(name, "q4k")
    r = halda(m, C4, global_opt=True, variant="paper", comm=True)
    e = halda(m, C4, global_opt=True, variant="paper", comm=True, solver="exact")
    d = halda(m, C4, global_opt=True, variant="paper", comm=True, solver="dp")
    assert r.objective == pytest.approx(e.objective, rel=1e-9) == pytest.approx(d.objective, rel=1e-9)
    assert violations(r.plan, m, C4) == []
    assert r.objective == pytest.approx(predict_tpot(r.plan, m, C4, variant="paper", comm=True), rel=1e-9)
    assert r.lower_bound is not None and r.lower_bound <= r.model_objective * (1 + 1e-9)  # type: ignore[operator]
    assert e.lower_bound == pytest.approx(e.model_objective, rel=1e-6)
    assert "M2" not in r.sets  # no device locked into Metal's whole-slice reload (prima.cpp's loop is)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_dev=st.integers(2, 12), name=st.sampled_from(MODELS),
       variant=st.sampled_from(["code", "paper"]))
def test_relax_and_round_never_falls_behind_the_milp(seed: int, n_dev: int, name: str, variant: str) -> None:
    """The relaxation + rounding is within 0.5 % of the MILP (the global optimum), feasible whenever
    the MILP is; the MILP equals the independent dynamic programme."""
    c = random_cluster(np.random.default_rng(seed), n_dev)
    m = load_model(name)
    cm, d = _data(m, c, variant=variant, comm=variant == "paper")
    e = solve_exact(d)
    r = solve_relax(d)
    dp = _dp(cm, 1, False)
    if e is None:
        assert not np.isfinite(dp)
        return
    assert r is not None, "relaxation + rounding found nothing where the MILP found a plan"
    assert e.objective == pytest.approx(dp, rel=1e-7)
    assert r.objective <= e.objective * (1 + TOL)
    assert r.bound <= e.objective * (1 + 1e-6)  # the LP bound is a bound
    lt, _, _ = totals_of(r.w, r.n, cm.L)
    assert int(lt.sum()) == cm.L and r.w[0] >= 1


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_dev=st.integers(2, 6), k=st.integers(2, 12),
       general=st.booleans(), name=st.sampled_from(["llama3-70b", "llama3-45b", "qwen2.5-32b", "llama1-30b"]))
def test_fixed_k_relax_exact_and_dp(seed: int, n_dev: int, k: int, general: bool, name: str) -> None:
    m = load_model(name, "q4k")
    if not general and m.n_layers % k:
        general = True
    c = random_cluster(np.random.default_rng(seed), n_dev)
    cm, d = _data(m, c, k=k, general=general)
    e, r, dp = solve_exact(d), solve_relax(d), _dp(cm, k, general)
    if e is None:
        assert not np.isfinite(dp)
        return
    assert e.objective == pytest.approx(dp, rel=1e-7)
    assert r is not None and r.objective <= e.objective * (1 + TOL)
    lt, _, win = totals_of(r.w, r.n, cm.L)
    assert int(lt.sum()) == cm.L and max(win) == k


@pytest.mark.parametrize("seed", range(4))
def test_global_optimum_by_brute_force(seed: int) -> None:
    """Tiny instances: every (k, w, n) enumerated (devices other than the head may hold nothing);
    the model at k = 1 reaches the optimum over every k (k = 1 dominates when k is free)."""
    rng = np.random.default_rng(seed)
    c = random_cluster(rng, 2 + seed % 2)
    m = dataclasses.replace(load_model("llama-tiny", "f32"), n_layers=6)
    cm = CostModel.for_cluster(m, c, n_ctx=64, variant="paper", comm=True)
    best = np.inf
    M, L = cm.M, cm.L
    for k in (1, 2, 3):
        W = L // k
        for w in itertools.product(range(1, W + 1), *([range(0, W + 1)] * (M - 1))):
            if sum(w) != W:
                continue
            for n in itertools.product(*(range(x + 1) for x in w)):
                lt, lg, win = totals_of(w, n, L)
                cost = sum(cm.cost_grid(i, lt[i], lg[i], win[i], priority=1.01) for i in range(M) if w[i])
                best = min(best, float(cost) + cm.head_time())
    d = ModelData(cm, 1, False, 1.01, True)
    e, r = solve_exact(d), solve_relax(d)
    if np.isfinite(best):
        assert e is not None and r is not None
        assert e.objective == pytest.approx(best, rel=1e-9)
        assert r.objective == pytest.approx(best, rel=1e-9)
    else:
        assert e is None


def _homogeneous(n: int, ram_gib: float) -> ClusterSpec:
    base = C4.device("D2")
    devs = tuple(dataclasses.replace(base, name=f"H{i}", gpu=None, ram_avail=ram_gib * GiB, ram_total=16 * GiB,
                                     disk_seq=2 * GB, disk_rnd=2 * GB, swap_total=0.0, swap_avail=0.0, can_swap=0.0)
                 for i in range(n))
    return ClusterSpec(name="homog", devices=devs, network=C4.network, head="H0")


def test_a_fixed_k_is_honoured_or_refused() -> None:
    """Issue 16 (4): on a homogeneous memory-short cluster `--k 4` used to come back as k = 1."""
    c = _homogeneous(4, 6.0)
    m = load_model("llama3-70b", "q4k")
    for solver in ("relax", "exact"):
        r = halda(m, c, global_opt=True, variant="paper", comm=True, k=4, solver=solver)
        assert r.plan.k == 4 and r.k == 4 and r.plan.closed_form
        assert violations(r.plan, m, c) == []
    free = halda(m, c, global_opt=True, variant="paper", comm=True)
    assert free.plan.k == 1 and free.objective <= r.objective * (1 + 1e-9)  # k = 1 dominates in the model
    g = halda(m, c, global_opt=True, variant="paper", comm=True, k=3, general=True)
    assert g.plan.k == 3 and not g.plan.closed_form
    # 80 laps of one window: one device would hold every layer's KV cache, which no device can
    short = _homogeneous(4, 0.4)
    assert halda(m, short, global_opt=True, variant="paper", comm=True).plan.k == 1
    with pytest.raises(PlanError, match="k = 80"):
        halda(m, short, global_opt=True, variant="paper", comm=True, k=80)


def test_problems_are_compiled_once_per_shape() -> None:
    m = load_model("llama3-70b", "q4k")
    halda(m, C4, global_opt=True, variant="paper", comm=True)
    halda(m, C4, global_opt=True, variant="paper", comm=True, solver="exact")
    before = {k: id(v) for k, v in _CACHE.items()}
    halda(load_model("llama3-60b", "q4k"), C4, global_opt=True, variant="paper", comm=True)
    halda(load_model("llama3-60b", "q4k"), C4, global_opt=True, variant="paper", comm=True, solver="exact")
    assert {k: id(v) for k, v in _CACHE.items() if k in before} == before
    assert all(p.prob.is_dpp() for p in _CACHE.values())


def test_devices_that_cannot_hold_a_layer_stay_out_without_selection() -> None:
    m = load_model("llama3-70b", "q4k")
    tiny = dataclasses.replace(C4.device("D4"), name="D5", ram_avail=0.05 * GiB, swap_avail=0.0, can_swap=0.0)
    c = dataclasses.replace(C4, devices=C4.devices + (tiny,))
    r = halda(m, c, global_opt=True, variant="paper", comm=True, select_devices=False)
    got = {d.name: d.layers for d in r.plan.devices}
    assert got["D5"] == 0 and all(v >= 1 for nm, v in got.items() if nm != "D5")
    assert isinstance(tiny, DeviceSpec)


def test_arguments_are_honoured_or_refused() -> None:
    """Issue 16 (4) through make_plan: the paper's homogeneous CPU cluster (memory-short at 70B)
    keeps a fixed k in every planner, and options a planner does not use are refused."""
    from primasim import SpecError
    from primasim.plan.planners import make_plan

    c = load_cluster("prima-fig2-cpu4")
    m = load_model("llama3-70b", "q4k")
    for planner in ("global", "loop"):
        out = make_plan("prima", m, c, planner=planner, k=4)
        assert out.feasible and out.plan is not None and out.plan.k == 4, planner
    with pytest.raises(SpecError, match="divide"):
        make_plan("prima", m, c, k=3)
    assert make_plan("prima", m, c, k=3, general=True).plan.k == 3  # type: ignore[union-attr]
    with pytest.raises(SpecError, match="revision"):
        make_plan("prima", m, c, revision="v1")
    with pytest.raises(SpecError, match="planner=sim does not use variant"):
        make_plan("prima", m, c, planner="sim", variant="code")
    with pytest.raises(SpecError, match="dp only"):
        make_plan("prima", m, c, planner="loop", solver="dp")
