"""Speculative decoding in the simulator (primasim/sim/_speculative.py)."""

from __future__ import annotations

import pytest

from primasim.core.cluster import load_cluster
from primasim.core.model_sources import load_model
from primasim.core.runtime_facts import runtime_model
from primasim.core.speculation import (
    AcceptanceLog,
    DraftSpec,
    FixedRate,
    Replay,
    draft_bytes,
    prefix_draft,
)
from primasim.sim import SimConfig, make_plan, simulate


@pytest.fixture(scope="module")
def case() -> tuple:
    return load_model("llama3-70b", "q4k"), load_model("llama3.2-1b", "q4k"), load_cluster("prima-d1-d4")


def _sim(case: tuple, k: int, alpha: float, tokens: int = 24, **kw) -> object:
    m, d, cl = case
    plan = kw.pop("plan", None)
    return simulate("prima", m, cl, plan=plan, config=SimConfig(tokens=tokens, jitter=False,
                                                                 draft=DraftSpec(d, k, acceptance=FixedRate(alpha), **kw)))


def test_no_drafted_tokens_is_plain_decoding(case: tuple) -> None:
    m, d, cl = case
    plain = simulate("prima", m, cl, config=SimConfig(tokens=24, jitter=False))
    k0 = _sim(case, 0, 0.7)
    assert k0.tpot_ms == pytest.approx(plain.tpot_ms, rel=1e-9)
    assert "speculation" not in k0.extra


def test_tokens_per_pass_follow_acceptance(case: tuple) -> None:
    full = _sim(case, 4, 1.0)
    sp = full.extra["speculation"]
    assert sp["accepted_hist"][-1] == sp["passes"]  # every draft accepted
    none = _sim(case, 4, 0.0)
    assert none.extra["speculation"]["tokens_per_pass"] == 1.0
    # the target's weights are read once per pass: all-accepted passes cost far less per token
    assert full.tpot_ms < 0.5 * none.tpot_ms
    # a pass verifying K + 1 positions costs more than a plain one (compute scales with K + 1)
    plain = simulate("prima", case[0], case[2], plan=full.plan, config=SimConfig(tokens=24, jitter=False))
    assert none.tpot_ms > plain.tpot_ms
    # every token of the run is emitted, in bursts at the end of the passes
    assert full.metrics.n_tokens == 24


def test_more_acceptance_predicts_faster(case: tuple) -> None:
    lo, hi = _sim(case, 3, 0.4, tokens=96), _sim(case, 3, 0.9, tokens=96)
    assert hi.extra["speculation"]["tokens_per_pass"] > lo.extra["speculation"]["tokens_per_pass"]
    assert hi.tpot_ms < lo.tpot_ms


def test_replay_reproduces_a_measured_log(case: tuple) -> None:
    log = AcceptanceLog([(3, 3), (3, 0), (3, 2), (3, 1), (3, 3)])
    m, d, cl = case
    res = simulate("prima", m, cl, config=SimConfig(tokens=20, jitter=False, draft=DraftSpec(d, 3, acceptance=Replay(log))))
    got = res.trace.meta["speculation"]["pass_log"]
    want = [list(p) for p in log.passes]
    assert got == (want * 3)[: len(got)]


def test_the_draft_memory_leaves_the_head(case: tuple) -> None:
    m, d, cl = case
    plan = make_plan("prima", m, cl).plan
    spec = DraftSpec(d, 2, device="D3", where="cpu", acceptance=FixedRate(0.7))
    r = simulate("prima", m, cl, plan=plan, config=SimConfig(tokens=8, draft=spec))
    p = simulate("prima", m, cl, plan=plan, config=SimConfig(tokens=8))
    cap = r.trace.device_stats["D3"]["cache_capacity_bytes"]
    cap0 = p.trace.device_stats["D3"]["cache_capacity_bytes"]
    assert cap0 - cap == pytest.approx(draft_bytes(d, plan.n_ctx), rel=1e-6)
    # and it shows in the head's memory pressure
    assert r.metrics.memory_pressure["D3"] > p.metrics.memory_pressure["D3"]


def test_a_draft_on_another_device_exchanges_tokens_with_the_head(case: tuple) -> None:
    m, d, cl = case
    plan = make_plan("prima", m, cl).plan
    here = _sim(case, 2, 0.7, plan=plan, device="D3", where="cpu")
    away = _sim(case, 2, 0.7, plan=plan, device="D1", where="cpu")
    spans = [s for s in away.trace.spans if s.resource == "cpu" and s.name.startswith("draft")]
    assert spans and all(s.device == "D1" for s in spans)
    names = {s.name for s in away.trace.spans if s.resource == "net"}
    assert away.trace.meta["net_messages"] > here.trace.meta["net_messages"], names


def test_paper_engines_without_speculation_refuse(case: tuple) -> None:
    m, d, cl = case
    r = simulate("exo", load_model("llama3-8b"), cl, config=SimConfig(tokens=8, draft=DraftSpec(d, 2)))
    assert not r.feasible and "speculative" in r.reason


def test_runtime_model_speculates_on_the_head() -> None:
    m = runtime_model(load_model("llama-mini-300m"))
    cl = load_cluster("home-emu")
    plan = make_plan("prima", m, cl).plan
    d = prefix_draft(m, 2)
    plain = simulate("prima", m, cl, plan=plan, config=SimConfig(runtime=True, warmup=False, tokens=16))
    k0 = simulate("prima", m, cl, plan=plan, config=SimConfig(runtime=True, warmup=False, tokens=16,
                                                               draft=DraftSpec(d, 0)))
    assert k0.tpot_ms == pytest.approx(plain.tpot_ms, rel=1e-9)
    spec = simulate("prima", m, cl, plan=plan, config=SimConfig(runtime=True, warmup=False, tokens=16,
                                                                 draft=DraftSpec(d, 3, acceptance=FixedRate(1.0))))
    assert spec.feasible, spec.reason
    assert spec.extra["speculation"]["tokens_per_pass"] == 4.0
    assert spec.extra["speculation"]["draft"]["where"] == "cpu"
    away = simulate("prima", m, cl, plan=plan, config=SimConfig(runtime=True, warmup=False, tokens=16,
                                                                 draft=DraftSpec(d, 3, device=plan.devices[1].name)))
    assert not away.feasible and "head" in away.reason


def test_runtime_draft_takes_the_workers_reserve_from_the_head() -> None:
    """The runtime's head pins the draft (weights + f32 KV cache, `runtime_facts.draft_reserve`):
    the simulated worker's residency budget is the plain one less exactly that, once."""
    from primasim.core.runtime_facts import draft_reserve

    m = runtime_model(load_model("llama-mini-300m"))
    cl = load_cluster("home-emu")
    head = cl.head
    cl = cl.replace_device(cl.device(head).replace(ram_avail=cl.device(head).ram_avail + 600 * 2**20))
    plan = make_plan("prima", m, cl).plan
    d = prefix_draft(m, 2)
    cfg = dict(runtime=True, warmup=False, tokens=8)
    plain = simulate("prima", m, cl, plan=plan, config=SimConfig(**cfg))
    spec = simulate("prima", m, cl, plan=plan, config=SimConfig(**cfg, draft=DraftSpec(d, 2)))
    assert spec.feasible, spec.reason
    lost = plain.extra["residency"][head]["budget"] - spec.extra["residency"][head]["budget"]
    assert lost == pytest.approx(draft_reserve(d, plan.n_ctx), abs=1.0)
    assert spec.extra["speculation"]["draft"]["bytes"] == pytest.approx(draft_reserve(d, plan.n_ctx))
