"""Halda: Algorithm 1, its fixed-k subproblem (relaxation + rounding vs exact), options, properties."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from primasim import SpecError, load_model
from primasim.core.cluster import load_cluster
from primasim.core.errors import PlanError
from primasim.core.plan import violations
from primasim.core.synth import random_cluster
from primasim.plan.cost import CostModel, DeviceCorrection, predict_tpot, totals_of
from primasim.plan.halda import (
    _LP_CACHE,
    _blocks,
    _Data,
    _init_split,
    _solve_exact,
    _solve_relax,
    halda,
)

C4 = load_cluster("prima-d1-d4")
C4_D3 = dataclasses.replace(C4, head="D3")
TABLE4 = ["llama3-8b", "llama3-14b", "llama1-30b", "llama3-45b", "llama3-60b", "llama1-65b", "llama3-70b"]
MODELS = TABLE4 + ["qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b", "tinyllama-1.1b"]


def test_valid_k_are_the_factors_of_L() -> None:
    ks = lambda L, M=1: sorted({b.k for b in _blocks(L, M, None, False)})  # noqa: E731
    assert ks(32) == [1, 2, 4, 8, 16]  # reference §2.4
    assert ks(80) == [1, 2, 4, 5, 8, 10, 16, 20, 40]
    assert ks(60) == [1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30]
    assert ks(28) == [1, 2, 4, 7, 14]
    assert ks(80, 4) == [1, 2, 4, 5, 8, 10, 16, 20]  # W >= M since every window >= 1
    general = _blocks(80, 4, 3, True)  # k = 3 does not divide 80: only partial-lap blocks
    assert {b.k for b in general} == {3} and all(b.p >= 0 for b in general)


@pytest.mark.parametrize("name", TABLE4)
def test_relaxation_matches_exact_on_the_paper_testbed(name: str) -> None:
    m = load_model(name, "q4k")
    r, e = halda(m, C4, solver="relax"), halda(m, C4, solver="exact")
    assert r.objective == pytest.approx(e.objective, rel=1e-9)
    assert violations(r.plan, m, C4) == []
    # the reported objective is the cost model's TPOT of the returned plan
    assert r.objective == pytest.approx(predict_tpot(r.plan, m, C4, variant="code", comm=False), rel=1e-9)


def _cm(seed: int, n_dev: int, name: str, **kw) -> CostModel:  # type: ignore[no-untyped-def]
    c = random_cluster(np.random.default_rng(seed), n_dev)
    return CostModel.for_cluster(load_model(name, "q4k"), c, n_ctx=1024, **kw)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_dev=st.integers(2, 10), name=st.sampled_from(MODELS),
       general=st.booleans(), comm=st.booleans(), data=st.data())
def test_rounding_reaches_the_integer_optimum(seed: int, n_dev: int, name: str, general: bool, comm: bool,
                                              data: st.DataObject) -> None:
    """Every fixed-k block: relaxation + rounding == the exact integer program (or both infeasible)."""
    cm = _cm(seed, n_dev, name, comm=comm)
    L = cm.L
    assume(L >= n_dev)
    w, n = _init_split(cm)
    if data.draw(st.booleans()):  # a random set assignment instead of the initial one
        w = np.diff([0, *sorted(data.draw(st.lists(st.integers(1, L - 1), min_size=n_dev - 1, max_size=n_dev - 1,
                                                  unique=True))), L])
        n = np.where(cm.has_gpu, w, 0)
    lt, lg, _ = totals_of(w, n, L)
    d = _Data(cm, cm.sets(lt, lg), 1.01)
    k = data.draw(st.sampled_from([None, 3])) if general else None
    blocks = _blocks(L, n_dev, k, general)
    if general and len(blocks) > 12:
        blocks = data.draw(st.permutations(blocks))[:12]
    assume(blocks)
    for b, rel, ex in zip(blocks, _solve_relax(d, blocks), _solve_exact(d, blocks)):
        assert (rel is None) == (ex is None), b
        if rel is not None and ex is not None:
            assert rel.objective == pytest.approx(ex.objective, rel=1e-7, abs=1e-9), b
            assert rel.objective >= rel.bound - 1e-9 * max(1.0, abs(rel.bound))  # the LP is a lower bound


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_dev=st.integers(2, 16), name=st.sampled_from(MODELS),
       select=st.booleans(), revision=st.sampled_from(["head", "v1"]))
def test_the_global_optimum_bounds_prima_cpps_loop(seed: int, n_dev: int, name: str, select: bool,
                                                   revision: str) -> None:
    """prima.cpp's loop returns valid plans (or refuses); the global MILP is never worse on the
    cost model the loop optimises."""
    m = load_model(name, "q4k")
    c = random_cluster(np.random.default_rng(seed), n_dev)
    try:
        a = halda(m, c, select_devices=select, master_priority=1.0, revision=revision)  # type: ignore[arg-type]
    except PlanError as e:
        assert "head" in e.message or "no feasible allocation" in e.message
        return
    assert violations(a.plan, m, c) == []
    assert a.objective == pytest.approx(predict_tpot(a.plan, m, c, variant="code", comm=False), rel=1e-9)
    g = halda(m, c, master_priority=1.0, global_opt=True, solver="exact")
    assert g.objective <= a.objective * (1 + 1e-9) + 1e-12


def test_prima_cpp_revisions_on_the_paper_testbed() -> None:
    """The loop investigation (docs/planning.md): at 70B, HEAD's start (GPU layers = window) puts
    D2 and D3 in M4 ("must fit"), so the overflow lands on the phone D4; v1's (GPU layers = 0, the
    code of the paper's Table 4) puts them in M3 ("must overload"), so it lands on their fast SSDs.
    Both keep D1 in M2 (its slice just over the Metal budget) and never leave the first sets."""
    m = load_model("llama3-70b", "q4k")
    head = halda(m, C4, revision="head", select_devices=False)
    v1 = halda(m, C4, revision="v1", select_devices=False)
    order = [d.name for d in head.plan.devices]
    sh, s1 = dict(zip(order, head.sets)), dict(zip(order, v1.sets))
    assert (sh["D2"], sh["D3"], sh["D4"], sh["D1"]) == ("M4", "M4", "M3", "M2")
    assert (s1["D2"], s1["D3"], s1["D4"], s1["D1"]) == ("M3", "M3", "M3", "M2")
    lay = {r: {d.name: d.layers for d in x.plan.devices} for r, x in (("head", head), ("v1", v1))}
    assert lay["head"]["D4"] >= 2 * lay["v1"]["D4"]
    assert head.iterations == v1.iterations == 1  # locked: the sets never change


def test_small_models_collapse_onto_one_device() -> None:
    m = load_model("llama3-8b", "q4k")
    r = halda(m, C4_D3)  # the paper: < 14B, everything on D3 (= llama.cpp)
    assert [(d.name, d.layers, d.gpu_layers) for d in r.plan.devices if d.layers] == [("D3", 32, 32)]
    assert sorted(r.dropped) == ["D1", "D2", "D4"]
    assert r.sets[0] == "M4" and r.sets[1:] == ["-", "-", "-"]
    r1 = halda(m, C4_D3, select_devices=False)  # without device selection every device keeps >= 1 layer
    assert all(d.layers >= 1 for d in r1.plan.devices)


def test_the_set_trap_and_the_global_option() -> None:
    """Algorithm 1 cannot move a device out of an overloaded set (prima.cpp behaviour); the global
    optimisation of the same cost model can."""
    m = load_model("llama3-70b", "q4k")
    a = halda(m, C4_D3)
    g = halda(m, C4_D3, global_opt=True)
    assert a.sets[C4_D3.names.index("D1") - 2] == "M2" or "M2" in a.sets  # D1 (Metal) reloads its slice
    assert "M2" not in g.sets
    assert g.objective < 0.7 * a.objective
    assert violations(g.plan, m, C4_D3) == []


def test_general_form_with_a_k_that_does_not_divide_L() -> None:
    m = load_model("llama3-70b", "q4k")
    for solver in ("relax", "exact"):
        r = halda(m, C4_D3, k=3, general=True, solver=solver, select_devices=False)
        assert r.plan.k == 3 and not r.plan.closed_form
        assert violations(r.plan, m, C4_D3) == []
        assert sum(t for t, _ in r.plan.totals().values()) == 80
    with pytest.raises(SpecError, match="divide"):
        halda(m, C4_D3, k=3)
    assert halda(m, C4_D3, general=True).objective <= halda(m, C4_D3).objective * (1 + 1e-9)


def test_comm_makes_fewer_devices_attractive() -> None:
    m = load_model("llama1-30b", "q4k")
    plain = halda(m, C4_D3, select_devices=False, global_opt=True)
    comm = halda(m, C4_D3, select_devices=False, global_opt=True, comm=True)
    assert comm.objective > plain.objective  # hops cost time now
    assert comm.objective == pytest.approx(predict_tpot(comm.plan, m, C4_D3, variant="code", comm=True), rel=1e-9)


def test_corrections_change_the_plan() -> None:
    m = load_model("llama3-8b", "q4k")
    base = halda(m, C4_D3)
    assert base.plan.devices[0].gpu_layers == 32
    slow = halda(m, C4_D3, corrections={"D3": DeviceCorrection(gpu_layer_s=0.5, cpu_layer_s=0.6)})
    assert slow.plan.devices[0].layers < 32  # D3 is now the slowest place for a layer
    assert slow.objective > base.objective


def test_problems_are_built_once() -> None:
    m = load_model("llama3-70b", "q4k")
    halda(m, C4)
    before = {k: id(v) for k, v in _LP_CACHE.items()}
    halda(m, C4)
    halda(load_model("llama3-60b", "q4k"), C4)
    after = {k: id(v) for k, v in _LP_CACHE.items()}
    assert all(after[k] == v for k, v in before.items())
    assert all(p.prob.is_dpp() for p in _LP_CACHE.values())


def test_result_fields_and_bad_input() -> None:
    m = load_model("llama3-70b", "q4k")
    r = halda(m, C4)
    assert len(r.sets) == len(C4.devices) and r.iterations >= 1 and r.solve_time > 0
    assert {p.k for p in r.candidates} <= {1, 2, 4, 5, 8, 10, 16, 20}
    for p in r.candidates:
        assert violations(p, m, C4) == []
    with pytest.raises(SpecError, match="solver"):
        halda(m, C4, solver="magic")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="k must"):
        halda(m, C4, k=0)
    with pytest.raises(SpecError, match="master_priority"):
        halda(m, C4, master_priority=0.0)
