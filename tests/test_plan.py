"""Plan: layer bookkeeping (closed and general form), JSON round trip, and the validator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from primasim import load_model
from primasim.core.cluster import load_cluster
from primasim.core.errors import PlanError
from primasim.core.plan import DevicePlan, Plan, validate, violations
from primasim.plan.cost import totals_of

C4 = load_cluster("prima-d1-d4")
M8 = load_model("llama3-8b", "q4k")
M70 = load_model("llama3-70b", "q4k")


def _plan(model, wins, k=None, **kw) -> Plan:  # type: ignore[no-untyped-def]
    devs = tuple(DevicePlan(nm, w, n) for nm, w, n in wins)
    W = sum(d.layers for d in devs)
    return Plan(system="test", model=model.name, n_layers=model.n_layers, k=k or -(-model.n_layers // W),
                devices=devs, quant=model.quant, **kw)


def test_closed_form_segments_follow_the_paper_figure() -> None:
    # paper Fig. 1: 6 devices, 36 layers, window 2 -> 18 segments, 3 laps, device 1 holds segments 1, 7, 13
    plan = Plan("t", "", 36, 3, tuple(DevicePlan(f"d{i}", 2) for i in range(6)))
    segs = plan.segments()
    assert len(segs) == 18
    assert [s.start for s in segs if s.device == "d0"] == [0, 12, 24]
    assert plan.closed_form and plan.n_windows() == {f"d{i}": 3 for i in range(6)}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=8), st.integers(1, 120))
def test_general_form_totals_match_the_paper_formula(wins: list[tuple[int, int]], L: int) -> None:
    w = [a for a, _ in wins]
    n = [min(a, b) for a, b in wins]
    if sum(w) == 0:
        return
    plan = Plan("t", "", L, -(-L // sum(w)), tuple(DevicePlan(f"d{i}", w[i], n[i]) for i in range(len(w))))
    lt, lg, win = totals_of(w, n, L)  # Appendix A.3 closed formulas
    tot, nw = plan.totals(), plan.n_windows()
    for i in range(len(w)):
        assert tot[f"d{i}"] == (lt[i], lg[i])
        assert nw[f"d{i}"] == win[i]
    assert sum(lt) == L


def test_json_round_trip(tmp_path: Path) -> None:
    plan = _plan(M70, [("D1", 3, 2), ("D2", 22, 15), ("D3", 51, 21), ("D4", 4, 0)], prefetch=True,
                 options={"S": 2}, n_ctx=2048)
    back = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert back == plan
    f = tmp_path / "p.json"
    plan.save(f)
    assert Plan.from_json(f) == plan
    wrapped = {"system": "prima", "feasible": True, "plan": plan.to_json()}  # a whole `plan --json` object
    assert Plan.from_json(wrapped).devices == plan.devices


def test_bad_plan_files(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="file not found"):
        Plan.from_json(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json(bad)
    with pytest.raises(PlanError, match="k and devices"):
        Plan.from_json({"devices": [{"name": "D1"}]})


def test_valid_plan_has_no_violations() -> None:
    plan = _plan(M8, [("D3", 32, 32), ("D1", 0, 0), ("D2", 0, 0), ("D4", 0, 0)])
    assert violations(plan, M8, C4) == []
    validate(plan, M8, C4)


def test_violations_explain_each_device() -> None:
    plan = _plan(M8, [("D1", 10, 12), ("D2", 10, 0), ("D3", 12, 0)])
    vs = violations(plan, M8, C4)
    assert any(v.device == "D1" and "n_m <= w_m" in v.problem for v in vs)
    plan = _plan(M8, [("D1", 10, 0), ("D9", 22, 0)])
    assert any(v.device == "D9" and "not in the cluster" in v.problem for v in violations(plan, M8, C4))
    plan = _plan(M8, [("D1", 10, 0), ("D3", 12, 0)], k=3)  # W = 22 covers 32 layers in 2 laps, not 3
    assert any("ceil(L/W)" in v.problem for v in violations(plan, M8, C4))
    plan = _plan(M70, [("D2", 40, 40), ("D3", 40, 0)])  # 40 layers of 70B = 20 GiB on an 8 GiB GPU
    vs = violations(plan, M70, C4)
    assert any(v.device == "D2" and "VRAM" in v.problem for v in vs)
    plan = _plan(M70, [("D3", 40, 0), ("D2", 40, 0)], weights="pinned")
    vs = violations(plan, M70, C4)
    assert {v.device for v in vs} == {"D2", "D3"} and all("OOM" in v.problem for v in vs)
    with pytest.raises(PlanError) as e:
        validate(plan, M70, C4)
    assert "D2" in e.value.message and "D3" in e.value.message
    plan = _plan(M8, [("D4", 32, 0)], n_ctx=200_000)  # KV cache of 200k tokens cannot fit a phone
    assert any(v.device == "D4" and "KV cache" in v.problem for v in violations(plan, M8, C4))


def test_plan_for_another_model_is_rejected() -> None:
    plan = _plan(M8, [("D3", 32, 32)])
    vs = violations(plan, M70, C4)
    assert vs and "re-plan" in vs[0].fix
