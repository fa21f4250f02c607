"""Speculative decoding in the runtime (primasim/runtime/speculative.py): the acceptance rule keeps
the target's distribution, greedy speculation is plain greedy decoding, the draft's bookkeeping."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from primasim.core.model_sources import load_model
from primasim.core.speculation import prefix_draft
from primasim.runtime import model as md
from primasim.runtime.checkpoint import open_checkpoint, write_random_checkpoint
from primasim.runtime.speculative import (
    Draft,
    processed_probs,
    speculative_generate,
    verify,
    write_prefix_draft,
)

# chi-square 99.9 % quantiles by degrees of freedom (scipy.stats.chi2.ppf(0.999, df))
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59,
            11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70, 20: 45.31, 30: 59.70, 40: 73.40, 63: 103.4}


def _chi2_ok(counts: dict, probs: dict, n: int) -> tuple[float, float]:
    """Pearson's chi-square of observed counts against probabilities (cells with expectation < 5
    pooled), and the 99.9 % critical value for its degrees of freedom."""
    stat, pooled_o, pooled_e, cells = 0.0, 0.0, 0.0, 0
    for key, p in probs.items():
        e, o = p * n, counts.get(key, 0)
        if e < 5:
            pooled_o, pooled_e = pooled_o + o, pooled_e + e
            continue
        stat += (o - e) ** 2 / e
        cells += 1
    if pooled_e > 0:
        stat += (pooled_o - pooled_e) ** 2 / max(pooled_e, 1e-9)
        cells += 1
    assert sum(counts.get(k, 0) for k in counts if k not in probs) == 0, "a token outside the target's support"
    df = max(1, cells - 1)
    crit = CHI2_999.get(df) or df + 3.09 * math.sqrt(2 * df) + 1.0  # Wilson-Hilferty-like bound above 99.9 %
    return stat, crit


# ---------------------------------------------------------------------------- the rule, in isolation
def _dist(rng: np.random.Generator, v: int, zeros: int) -> np.ndarray:
    p = rng.random(v) ** 3
    p[rng.choice(v, zeros, replace=False)] = 0.0
    return p / p.sum()


def test_sampled_sequences_have_the_target_distribution() -> None:
    """A context-dependent 'model' (p and q depend on the previous token): speculative generation
    of 3 tokens with K = 2 (passes end in rejections, residuals and bonus tokens) gives the joint
    distribution of plain sampling from p."""
    v, k, n = 4, 2, 40000
    rng = np.random.default_rng(3)
    P = {t: _dist(rng, v, 1) for t in range(-1, v)}  # p(. | previous token); -1 = the prompt
    Q = {t: _dist(rng, v, 0) for t in range(-1, v)}  # the draft: full support, different shape
    exact = {}
    for seq in itertools.product(range(v), repeat=3):
        exact[seq] = P[-1][seq[0]] * P[seq[0]][seq[1]] * P[seq[1]][seq[2]]
    counts: dict = {}
    for _ in range(n):
        out: list[int] = []
        while len(out) < 3:
            prev = out[-1] if out else -1
            drafts, qs = [], []
            for _ in range(k):  # the draft proposes from q given its own previous draft
                q = Q[drafts[-1] if drafts else prev]
                drafts.append(int(rng.choice(v, p=q)))
                qs.append(q)
            ctx = [prev, *drafts]
            acc, nxt = verify(drafts, qs, [P[c] for c in ctx], rng)
            out += [*drafts[:acc], nxt]
        key = tuple(out[:3])
        counts[key] = counts.get(key, 0) + 1
    stat, crit = _chi2_ok(counts, exact, n)
    assert stat < crit, (stat, crit)


@given(st.integers(min_value=0, max_value=2**31), st.integers(min_value=1, max_value=5))
@settings(max_examples=20, deadline=None)
def test_accepted_drafts_follow_min_p_q(seed: int, k: int) -> None:
    """The chance that all K drafts pass equals prod sum_x min(p_i(x), q_i(x)) when the drafts'
    distributions do not depend on each other (alpha_i = 1 - TV(p_i, q_i))."""
    rng = np.random.default_rng(seed)
    v = 5
    p = [_dist(rng, v, 1) for _ in range(k + 1)]
    q = [_dist(rng, v, 0) for _ in range(k)]
    beta = [float(np.minimum(p[i], q[i]).sum()) for i in range(k)]
    n = 4000
    full = 0
    for _ in range(n):
        drafts = [int(rng.choice(v, p=q[i])) for i in range(k)]
        acc, _ = verify(drafts, q, p, rng)
        full += acc == k
    want = float(np.prod(beta))
    assert abs(full / n - want) < 5 * math.sqrt(want * (1 - want) / n) + 2e-3


def test_greedy_rule_and_point_masses() -> None:
    p_top = [3, 1, 4, 1]
    assert verify([3, 1, 4], None, p_top, None) == (3, 1)
    assert verify([3, 2, 4], None, p_top, None) == (1, 1)
    assert verify([], None, [7], None) == (0, 7)
    # temperature 0 distributions are point masses: the sampling rule then is the greedy rule
    rng = np.random.default_rng(0)
    onehot = [processed_probs(np.eye(6)[t] * 5.0) for t in p_top]
    assert verify([3, 2, 4], onehot[:3], onehot, rng) == (1, 1)
    with pytest.raises(ValueError):
        verify([1, 2], None, [1, 2], None)


def test_processed_probs_is_what_sample_draws_from() -> None:
    rng = np.random.default_rng(5)
    logits = rng.standard_normal(12) * 2
    p = processed_probs(logits, temperature=0.8, top_k=6, top_p=0.9)
    assert (p > 0).sum() <= 6 and p.sum() == pytest.approx(1.0)
    n = 30000
    draws = np.bincount([md.sample(logits, rng, temperature=0.8, top_k=6, top_p=0.9) for _ in range(n)], minlength=12)
    stat, crit = _chi2_ok({i: int(c) for i, c in enumerate(draws) if c}, {i: float(x) for i, x in enumerate(p) if x > 0}, n)
    assert stat < crit


# ---------------------------------------------------------------------------- with the real model
@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[md.Params, Path, Path]:
    spec = load_model("llama-tiny")
    d = tmp_path_factory.mktemp("spec")
    target = write_random_checkpoint(spec, d / "target", seed=7)
    draft = write_prefix_draft(spec, 3, d / "draft", seed=7)
    ck = open_checkpoint(target)
    return md.load_params(ck, range(spec.n_layers), embed=True, head=True), target, draft


def test_a_prefix_draft_shares_the_target_tensors(pair: tuple) -> None:
    _, target, draft = pair
    t, dr = open_checkpoint(target), open_checkpoint(draft)
    assert dr.spec.n_layers == 3 and dr.spec.vocab == t.spec.vocab
    for name in ("token_embd.weight", "blk.2.ffn_down.weight", "output_norm.weight"):
        assert np.array_equal(dr.tensor(name), t.tensor(name))
    assert prefix_draft(t.spec, 3).n_layers == 3


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_speculation_is_plain_greedy_decoding(pair: tuple, k: int) -> None:
    params, _, draft_path = pair
    prompt = [5, 77, 300, 12, 9]
    plain = md.generate(params, prompt, 40, windows=[range(0, 2), range(2, 6)]).tokens
    draft = Draft(draft_path, 64)
    got = speculative_generate(params, draft, prompt, 40, k, windows=[range(0, 2), range(2, 6)], max_seq=64)
    assert got.tokens == plain
    s = got.summary()
    assert s["passes"] == len(got.passes) and s["tokens_per_pass"] > 1.0  # the prefix draft helps
    assert all(d == k and 0 <= a <= k for d, a in got.passes)
    # and a draft that is the target itself accepts everything
    same = Draft(open_checkpoint(pair[1]), 64)
    full = speculative_generate(params, same, prompt, 25, k, max_seq=64)
    assert full.tokens == plain[:25]
    assert all(a == k for _, a in full.passes[:-1])


def test_sampled_speculation_keeps_the_target_distribution(pair: tuple) -> None:
    """Two sampled tokens after the prompt, many seeds: the joint distribution of (t1, t2) is the
    target's, computed exactly from its logits (top_k = 3 keeps 9 cells)."""
    params, _, draft_path = pair
    prompt = [5, 77, 300]
    opts = {"temperature": 1.5, "top_k": 3, "top_p": 1.0}
    kv = md.init_kv(params.spec, range(params.spec.n_layers), 16)
    lg = np.asarray(md.logits(params, md.run_layers(params, kv, md.embed(params, [prompt]), 0, range(6))[0]))[0, -1]
    p1 = processed_probs(lg, **opts)
    exact = {}
    for t1 in np.flatnonzero(p1):
        g = md.generate(params, [*prompt, int(t1)], 1, keep_logits=True)
        p2 = processed_probs(g.logits[0], **opts)
        for t2 in np.flatnonzero(p2):
            exact[(int(t1), int(t2))] = float(p1[t1] * p2[t2])
    draft = Draft(draft_path, 16)
    n = 1500
    counts: dict = {}
    for seed in range(n):
        got = speculative_generate(params, draft, prompt, 2, 2, seed=seed, max_seq=16, **opts)
        key = tuple(got.tokens)
        counts[key] = counts.get(key, 0) + 1
    stat, crit = _chi2_ok(counts, exact, n)
    assert stat < crit, (stat, crit, counts, exact)


def test_the_draft_catches_up_by_prefix(pair: tuple) -> None:
    _, _, draft_path = pair
    d = Draft(draft_path, 32)
    d.load()
    d.prefill([1, 2, 3])
    assert d.fed == [1, 2]
    x, q = d.propose([1, 2, 3], 3, None)
    assert len(x) == 3 and q is None and d.fed == [1, 2, 3, x[0], x[1]]
    # one draft accepted, then another token: the draft keeps 1, 2, 3, x0 and feeds the new token
    d.propose([1, 2, 3, x[0], 99], 2, None)
    assert d.fed[:5] == [1, 2, 3, x[0], 99]
    # the draft's proposals equal its own greedy decoding
    ck = open_checkpoint(draft_path)
    p = md.load_params(ck, range(ck.spec.n_layers), embed=True, head=True)
    assert x == md.generate(p, [1, 2, 3], 3).tokens
