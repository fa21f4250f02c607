"""primasim.core.speculation: the acceptance models, their closed forms, the estimator, the draft's memory."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from primasim.core.cluster import load_cluster
from primasim.core.errors import SpecError
from primasim.core.model_sources import load_model
from primasim.core.speculation import (
    AcceptanceLog,
    DraftSpec,
    FixedRate,
    PerPosition,
    Replay,
    accepted_pmf,
    alpha_from_passes,
    break_even_alpha,
    check_compatible,
    draft_bytes,
    draft_placement,
    expected_tokens,
    parse_acceptance,
    speedup,
    summarize,
    with_draft,
)

alphas = st.floats(min_value=0.0, max_value=0.999)
ks = st.integers(min_value=0, max_value=16)


@given(alphas, ks)
def test_expected_tokens_is_the_mean_of_the_accepted_length_pmf(alpha: float, k: int) -> None:
    p = accepted_pmf(alpha, k)
    assert p.sum() == pytest.approx(1.0)
    assert (p >= 0).all()
    assert expected_tokens(alpha, k) == pytest.approx(1.0 + float(np.arange(k + 1) @ p))
    assert FixedRate(alpha).expected(k) == pytest.approx(expected_tokens(alpha, k) - 1.0)


@given(alphas, st.integers(min_value=1, max_value=12))
def test_more_drafts_or_more_acceptance_never_yield_fewer_tokens(alpha: float, k: int) -> None:
    assert expected_tokens(alpha, k) >= expected_tokens(alpha, k - 1) - 1e-12
    assert expected_tokens(min(1.0, alpha + 0.01), k) >= expected_tokens(alpha, k) - 1e-12
    assert 1.0 <= expected_tokens(alpha, k) <= k + 1


def test_leviathan_optimum_table_of_the_reference() -> None:
    # speculation-and-serving.md 1.2: alpha 0.8, c 0.05, rho 1 -> K* = 8, S = 3.09
    s = {k: speedup(0.8, k, 0.05) for k in range(1, 30)}
    kstar = max(s, key=s.get)  # type: ignore[arg-type]
    assert kstar == 8 and s[kstar] == pytest.approx(3.09, abs=0.01)
    # with verification growing 5 % per token, K* halves: alpha 0.8, c 0.01 -> K* = 7, S = 2.93
    s = {k: speedup(0.8, k, 0.01, 1 + 0.05 * k) for k in range(1, 30)}
    kstar = max(s, key=s.get)  # type: ignore[arg-type]
    assert kstar == 7 and s[kstar] == pytest.approx(2.93, abs=0.01)
    assert break_even_alpha(4, 0.05, 1.0) < 0.25 < break_even_alpha(4, 0.05, 2.0)


@pytest.mark.parametrize("alpha,k", [(0.3, 4), (0.7, 4), (0.9, 8)])
def test_fixed_rate_draws_have_the_closed_form_distribution(alpha: float, k: int) -> None:
    rng = np.random.default_rng(0)
    n = 20000
    draws = np.array([FixedRate(alpha).draw(rng, k) for _ in range(n)])
    counts = np.bincount(draws, minlength=k + 1)
    exp = accepted_pmf(alpha, k) * n
    chi2 = float((((counts - exp) ** 2) / exp)[exp > 5].sum())
    # chi-square with <= k degrees of freedom: 99.9 % quantile for k = 8 is 26.1
    assert chi2 < 26.1


@given(st.floats(min_value=0.05, max_value=0.95), st.integers(min_value=1, max_value=8))
@settings(max_examples=25, deadline=None)
def test_the_estimator_recovers_the_rate(alpha: float, k: int) -> None:
    rng = np.random.default_rng(1)
    passes = [(k, FixedRate(alpha).draw(rng, k)) for _ in range(4000)]
    est = alpha_from_passes(passes)
    trials = sum(a for _, a in passes) + sum(1 for d, a in passes if a < d)
    assert abs(est - alpha) < 5 * math.sqrt(alpha * (1 - alpha) / trials) + 1e-3
    # llama.cpp's accepted / drafted is not the rate (it is below it whenever a pass can stop early)
    share = summarize(passes)["accepted_share"]
    assert share <= est + 1e-9


def test_per_position_rates() -> None:
    pp = PerPosition((0.9, 0.5))
    assert pp.expected(3) == pytest.approx(0.9 + 0.45 + 0.225)
    assert PerPosition((0.6,)).expected(5) == pytest.approx(FixedRate(0.6).expected(5))
    rng = np.random.default_rng(2)
    mean = np.mean([pp.draw(rng, 3) for _ in range(20000)])
    assert mean == pytest.approx(pp.expected(3), abs=0.03)


def test_log_roundtrip_replay_and_parse(tmp_path) -> None:
    log = AcceptanceLog([(4, 2), (4, 4), (4, 0), (4, 1)], {"target": "t", "draft": "d"})
    f = tmp_path / "acc.json"
    log.save(f)
    back = AcceptanceLog.load(f)
    assert back.passes == log.passes and back.meta == log.meta
    assert log.alpha == pytest.approx(7 / (7 + 3))
    rep = parse_acceptance(str(f))
    assert isinstance(rep, Replay) and rep.exact_for(4) and not rep.exact_for(3)
    rng = np.random.default_rng(0)
    assert [rep.draw(rng, 4) for _ in range(6)] == [2, 4, 0, 1, 2, 4]
    assert rep.expected(4) == pytest.approx(7 / 4)
    assert isinstance(parse_acceptance("0.8"), FixedRate)
    assert parse_acceptance("0.9,0.8").alphas == (0.9, 0.8)  # type: ignore[union-attr]
    for junk in ("banana", "1.5", "0.9,-1"):
        with pytest.raises(SpecError):
            parse_acceptance(junk)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"passes": [[2, 3]]}))
    with pytest.raises(SpecError, match="accepted <= drafted"):
        AcceptanceLog.load(bad)
    bad.write_text("{not json")
    with pytest.raises(SpecError, match="not an acceptance log"):
        AcceptanceLog.load(bad)


def test_summary_histogram() -> None:
    s = summarize([(3, 0), (3, 3), (3, 1), (3, 3)])
    assert s["accepted_hist"] == [1, 1, 0, 2]
    assert s["tokens_per_pass"] == pytest.approx((7 + 4) / 4)
    assert summarize([]) == {"passes": 0}


def test_the_draft_takes_its_memory_from_its_device() -> None:
    cl = load_cluster("prima-d1-d4")
    draft = load_model("llama3.2-1b", "q4k")
    need = draft_bytes(draft, 1024)
    assert need > draft.total_bytes
    # auto placement: the head's GPU when the draft fits its free VRAM (prima.cpp offloads the draft)
    dev, where = draft_placement(DraftSpec(draft), cl, cl.head, 1024)
    assert (dev, where) == (cl.head, "gpu")
    on_gpu = with_draft(cl, DraftSpec(draft, device=dev, where="gpu"), cl.head, 1024)
    assert cl.device(dev).gpu.vram_avail - on_gpu.device(dev).gpu.vram_avail == pytest.approx(need)
    assert on_gpu.device(dev).ram_avail == cl.device(dev).ram_avail
    on_cpu = with_draft(cl, DraftSpec(draft, device="D2", where="cpu"), cl.head, 1024)
    d2 = cl.device("D2")
    # the profiler reports a fraction of what the OS has: the OS loses `need`, the report that share of it
    assert d2.os_avail - on_cpu.device("D2").os_avail == pytest.approx(need)
    with pytest.raises(SpecError, match="does not fit"):
        with_draft(cl, DraftSpec(load_model("llama3-8b", "f16"), device="D4", where="cpu"), cl.head, 1024)
    with pytest.raises(SpecError, match="no GPU"):
        draft_placement(DraftSpec(draft, device="D4", where="gpu"), cl, cl.head, 1024)
    with pytest.raises(SpecError, match="not in cluster"):
        draft_placement(DraftSpec(draft, device="D9"), cl, cl.head, 1024)


def test_vocabularies_must_match() -> None:
    check_compatible(load_model("llama3-70b"), load_model("llama3.2-1b"))
    with pytest.raises(SpecError, match="vocabulary"):
        check_compatible(load_model("llama3-70b"), load_model("qwen2.5-0.5b"))
    with pytest.raises(SpecError, match=">= 0"):
        DraftSpec(load_model("llama3.2-1b"), tokens=-1)
