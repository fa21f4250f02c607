"""Request streams (primasim.core.workload) and per-request serving metrics (primasim.core.serving)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from primasim.core.errors import SpecError
from primasim.core.serving import SLO, RequestRecord, stats, summarize
from primasim.core.workload import constant, gamma, load_trace, onoff, parse_workload, poisson


def _gaps(w) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.diff([r.arrival for r in w])


def test_poisson_rate_and_exponential_gaps() -> None:
    w = poisson(4.0, 20000, seed=3)
    g = _gaps(w)
    assert g.mean() == pytest.approx(0.25, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.05)  # CV of an exponential
    assert w.requests[0].arrival == 0.0
    assert all(r.prompt_tokens == 16 and r.output_tokens == 32 for r in w)


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_has_its_coefficient_of_variation(cv: float) -> None:
    g = _gaps(gamma(2.0, cv, 40000, seed=1))
    assert g.mean() == pytest.approx(0.5, rel=0.05)
    assert g.std() / g.mean() == pytest.approx(cv, rel=0.08)


def test_onoff_is_silent_off_and_bursty() -> None:
    w = onoff(10.0, 2.0, 8.0, 3000, seed=2)
    # bursts are separated by the off periods: gaps of >= 8 s, about one per on period
    g = _gaps(w)
    assert (g > 7.9).sum() >= len(w) / (10 * 2.0) * 0.5
    assert w.rate == pytest.approx(10.0 * 2 / 10, rel=0.15)
    assert (g / g.mean()).std() > 1.5  # far burstier than Poisson
    assert w.requests[0].arrival == 0.0


def test_constant_and_ranges_are_seeded() -> None:
    w = constant(2.0, 10, prompt=(8, 12), output=(1, 3), seed=5)
    assert np.allclose(_gaps(w), 0.5)
    assert all(8 <= r.prompt_tokens <= 12 and 1 <= r.output_tokens <= 3 for r in w)
    assert w == constant(2.0, 10, prompt=(8, 12), output=(1, 3), seed=5)
    assert w != constant(2.0, 10, prompt=(8, 12), output=(1, 3), seed=6)


def test_parse_forms() -> None:
    assert len(parse_workload("poisson:2")) == 100
    w = parse_workload("poisson:2,7", prompt=5, output=9)
    assert len(w) == 7 and w.requests[3].prompt_tokens == 5 and w.requests[3].output_tokens == 9
    assert w.meta["rate"] == 2
    assert len(parse_workload("gamma:1,2,5")) == 5
    assert len(parse_workload("onoff:1,2,3,6")) == 6
    assert len(parse_workload("constant:1,4")) == 4


@pytest.mark.parametrize("bad", ["poisson:", "poisson:-1", "poisson:0,5", "poisson:1,2,3", "poisson:1,2.5",
                                 "gamma:1", "gamma:1,0", "onoff:1,0,1", "weibull:1", "poisson:nan", "poisson:1,0",
                                 "/no/such/file.csv", "constant:inf"])
def test_parse_rejects_junk_with_one_clear_error(bad: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_workload(bad)
    assert "--workload" in e.value.message or "file" in e.value.message


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_parse_never_fails_otherwise(text: str) -> None:
    try:
        w = parse_workload(text, default_n=3)
    except SpecError:
        return
    assert len(w) >= 1


def test_trace_files_in_three_formats(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ours = tmp_path / "a.csv"
    ours.write_text("arrival_s,prompt_tokens,output_tokens\n1.5,10,4\n0.5,20,8\n")
    w = load_trace(ours)
    assert [(r.arrival, r.prompt_tokens, r.output_tokens) for r in w] == [(0.0, 20, 8), (1.0, 10, 4)]
    vidur = tmp_path / "v.csv"
    vidur.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,100,10\n2,50,5\n")
    assert load_trace(vidur).requests[1].prompt_tokens == 50
    jl = tmp_path / "s.jsonl"
    jl.write_text("\n".join(json.dumps({"input_toks": 7, "output_toks": 3, "arrival_time_ns": t})
                            for t in (0, 2_000_000_000)) + "\n")
    assert load_trace(jl).requests[1].arrival == pytest.approx(2.0)
    # round trip through our own format
    p = tmp_path / "rt.csv"
    poisson(1.0, 5, seed=1).save(p)
    assert [r.output_tokens for r in load_trace(p)] == [32] * 5


@pytest.mark.parametrize("content", ["arrival_s,prompt_tokens\n0,1\n", "arrival_s,prompt_tokens,output_tokens\n0,x,1\n",
                                     "arrival_s,prompt_tokens,output_tokens\n-1,1,1\n", "{\"a\": 1}\n", "[1,2]\n",
                                     "arrival_s,prompt_tokens,output_tokens\n", "{bad json\n"])
def test_bad_trace_files(tmp_path, content: str) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / ("t.jsonl" if content.startswith(("{", "[")) else "t.csv")
    p.write_text(content)
    with pytest.raises(SpecError) as e:
        load_trace(p)
    assert str(p) in e.value.message


def test_slo_parse() -> None:
    assert SLO.parse("ttft:2000,tpot:200") == SLO(2000, 200, None)
    assert SLO.parse("e2el:5") == SLO(None, None, 5)
    for bad in ("ttft", "ttft:x", "foo:1", "tpot:-1"):
        with pytest.raises(SpecError):
            SLO.parse(bad)


def test_request_metrics_and_summary() -> None:
    a = RequestRecord(0, 1.0, 10, 3, token_times=[1.5, 1.7, 1.9], admitted=1.2)
    assert a.ttft == pytest.approx(0.5) and a.tpot == pytest.approx(0.2) and a.e2e == pytest.approx(0.9)
    assert a.queue == pytest.approx(0.2)
    b = RequestRecord(1, 2.0, 10, 3, token_times=[4.0, 4.1, 4.2], admitted=3.5)
    c = RequestRecord(2, 2.5, 10, 3, status="error", error="x")
    s = summarize([a, b, c], SLO(ttft_ms=1000))
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["ttft_ms"]["p50"] == pytest.approx(1250.0)
    assert s["duration_s"] == pytest.approx(3.2)
    assert s["goodput_req_s"] == pytest.approx(1 / 3.2)  # only a meets TTFT <= 1 s
    assert s["slo_attainment"] == pytest.approx(1 / 3)
    assert s["itl_ms"]["n"] == 4
    one = RequestRecord(3, 0.0, 1, 1, token_times=[0.3])
    assert math.isnan(one.tpot) and one.meets(SLO(tpot_ms=1))  # a one-token request has no TPOT to miss
    assert stats([])["p90"] is None
