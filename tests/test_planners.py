"""Every system behind make_plan: valid plans on random clusters, and each baseline's own rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from primasim import SpecError, load_model
from primasim.core.cluster import ClusterSpec, load_cluster
from primasim.core.model_sources import catalogue
from primasim.core.plan import violations
from primasim.core.synth import random_cluster
from primasim.core.systems import SYSTEMS
from primasim.plan.baselines import mdi_split
from primasim.plan.planners import make_plan

C4 = load_cluster("prima-d1-d4")
C4_D3 = dataclasses.replace(C4, head="D3")
MODEL_NAMES = sorted(catalogue())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_dev=st.integers(2, 32), name=st.sampled_from(MODEL_NAMES),
       quant=st.sampled_from(["q4k", "q8_0", "f16"]), system=st.sampled_from(sorted(SYSTEMS)))
def test_every_plan_is_valid(seed: int, n_dev: int, name: str, quant: str, system: str) -> None:
    c = random_cluster(np.random.default_rng(seed), n_dev)
    m = load_model(name, quant)
    out = make_plan(system, m, c)
    if not out.feasible:
        assert out.plan is None and out.reason
        return
    plan = out.plan
    assert plan is not None
    assert violations(plan, m, c) == [], violations(plan, m, c)
    totals = plan.totals()
    if plan.schedule == "tp":
        assert all(t == (m.n_layers, 0) for nm, t in totals.items() if t[0])
    else:
        assert sum(t for t, _ in totals.values()) == m.n_layers  # layers are conserved
    assert set(plan.n_windows()) <= set(c.names)
    assert out.predicted_tpot is not None and out.predicted_tpot > 0
    assert out.predicted_ttft is not None and out.predicted_ttft > 0
    assert all(0 <= p < 1.5 for p in out.memory_pressure.values())
    js = out.to_json()
    for key in ("system", "feasible", "tpot_ms", "ttft_ms", "throughput_tok_s", "memory_pressure", "plan"):
        assert key in js
    assert js["plan"]["k"] == plan.k and [d["name"] for d in js["plan"]["devices"]] == [d.name for d in plan.devices]


def test_exo_splits_by_total_memory_and_pins_weights() -> None:
    m8 = load_model("llama3-8b", "q4k")
    out = make_plan("exo", m8, C4)
    plan = out.plan
    assert plan is not None and plan.weights == "pinned"
    split = {d.name: d.layers for d in plan.devices}
    # paper: 9/10/13 layers on D1/D2/D3 (D3: 11 GiB VRAM, D1 8 GiB RAM, D2 8 GiB VRAM); D4 (Android) left out
    assert split["D3"] == 13 and sorted([split["D1"], split["D2"]]) == [9, 10] and split["D4"] == 0
    assert out.memory_pressure["D1"] > 0.15  # pinned weights on the Mac: paper 20 %
    bad = make_plan("exo", load_model("llama3-70b", "q4k"), C4)
    assert not bad.feasible and bad.reason.startswith("OOM on ")  # paper: OOM
    with_phone = make_plan("exo", m8, C4, include_android=True)
    assert with_phone.plan is not None and {d.name: d.layers for d in with_phone.plan.devices}["D4"] > 0


def test_llamacpp_runs_on_the_largest_device() -> None:
    m = load_model("llama1-30b", "q4k")
    out = make_plan("llama.cpp", m, C4)
    plan = out.plan
    assert plan is not None and plan.head == "D3" and plan.devices[0].layers == 60
    gpu = plan.devices[0].gpu_layers
    assert 0 < gpu < 60  # 30B Q4K does not fit an 11 GiB GPU: the rest runs on the CPU
    over = make_plan("llama.cpp", m, C4, gpu_layers=gpu + 3)
    assert not over.feasible and "VRAM" in over.reason


def test_dllama_tensor_parallel_rules() -> None:
    m8 = load_model("llama3-8b", "q4k")
    out = make_plan("dllama", m8, C4)
    assert out.plan is not None and out.plan.schedule == "tp" and len(out.plan.active) == 4
    assert 0.2 < out.predicted_tpot < 1.0  # paper: 459 ms, >= 192 ms of all-reduce latency
    three = make_plan("dllama", m8, C4.subset(["D2", "D3", "D4"]))
    assert three.plan is not None and len(three.plan.active) == 2  # 2^n devices
    assert not make_plan("dllama", m8, C4, devices="D1,D2,D3").feasible
    assert not make_plan("dllama", load_model("llama3-70b", "q4k"), C4).feasible  # paper: OOM


def test_mdi_llm_static_table_and_rule() -> None:
    assert mdi_split(load_model("tinyllama-1.1b"), 4) == (4, 6, 6, 6)
    assert mdi_split(load_model("llama3-8b"), 3) == (8, 12, 12)
    assert mdi_split(load_model("nanollama-304m"), 2) == (5, 7)
    m70 = load_model("llama3-70b")
    for nodes in (2, 3, 4, 7):
        split = mdi_split(m70, nodes)
        assert sum(split) == 80 and len(split) == nodes
        assert split[0] < min(split[1:])  # the starter also runs the head, so it gets fewer layers
    out = make_plan("mdi-llm", load_model("tinyllama-1.1b", "f16"), C4_D3, nodes=3, S=3)
    assert out.plan is not None and out.plan.schedule == "rpp" and out.plan.options["S"] == 3
    assert out.throughput is not None and out.throughput > 1 / out.predicted_tpot  # S sequences in flight


def test_offloading_systems() -> None:
    m = load_model("llama3-45b", "q4k")
    pipo, flex = make_plan("pipo", m, C4), make_plan("flexgen", m, C4)
    assert pipo.plan is not None and flex.plan is not None
    assert pipo.plan.head == "D3" and pipo.plan.schedule == "offload"
    assert 0 < pipo.plan.devices[0].gpu_layers < 50
    assert pipo.plan.options["barrier"] is False and flex.plan.options["barrier"] is True
    assert pipo.predicted_tpot <= flex.predicted_tpot
    cpu_only = ClusterSpec("cpu", (C4.device("D4"),))
    out = make_plan("pipo", m, cpu_only)
    assert not out.feasible and "CUDA" in out.reason


def test_bud_paged_kv_admits_more_requests() -> None:
    m = load_model("llama3-8b", "q4k")
    paged = make_plan("bud", m, C4, batch=200, max_len=2048)
    pre = make_plan("bud", m, C4, batch=200, max_len=2048, kv="prealloc")
    assert paged.plan is not None and pre.plan is not None
    assert paged.plan.options["batch"] > 2 * pre.plan.options["batch"]
    assert paged.throughput > pre.throughput
    assert not make_plan("bud", load_model("llama3-70b", "q4k"), C4).feasible


def test_ablation_planners() -> None:
    m70 = load_model("llama3-70b", "q4k")
    even = make_plan("even", m70, C4, k=2).plan
    assert even is not None and even.k == 2 and [d.layers for d in even.devices] == [10, 10, 10, 10]
    odd = make_plan("even", m70, C4, k=3).plan  # 80 = 3 laps of 27 with a partial last lap
    assert odd is not None and odd.k == 3 and not odd.closed_form
    perf = make_plan("perfsched", m70, C4).plan
    mem = make_plan("memsched", m70, C4).plan
    assert perf is not None and mem is not None
    assert {d.name: d.layers for d in mem.devices} == {d.name: d.layers for d in make_plan("prima-no-halda", m70, C4).plan.devices}  # type: ignore[union-attr]
    a = make_plan("prima", m70, C4)
    b = make_plan("prima-no-prefetch", m70, C4)
    assert a.plan is not None and b.plan is not None and a.plan.prefetch and not b.plan.prefetch
    assert [d.layers for d in a.plan.devices] == [d.layers for d in b.plan.devices]


def test_bad_requests() -> None:
    m = load_model("llama3-8b", "q4k")
    with pytest.raises(SpecError, match="unknown system"):
        make_plan("vllm", m, C4)
    with pytest.raises(SpecError, match="no option"):
        make_plan("exo", m, C4, S=4)
    with pytest.raises(SpecError, match="k"):
        make_plan("even", m, C4, k=0)
    with pytest.raises(SpecError):
        make_plan("prima", m, C4, n_ctx=0)
    with pytest.raises(SpecError, match="D9"):
        make_plan("exo", m, C4, devices="D1,D9")
