"""Speculative decoding on the distributed runtime: real workers over zmq, the draft on the head, the
ring verifying K + 1 positions per pass (runtime/worker/speculation.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from test_runtime_cluster import cluster, ring_plan

from primasim.core.errors import PlanError
from primasim.core.model_sources import load_model
from primasim.runtime import generate, load_params, open_checkpoint, write_random_checkpoint
from primasim.runtime.head import RunOptions, run_plan
from primasim.runtime.speculative import write_prefix_draft


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    spec = load_model("llama-tiny")
    d = tmp_path_factory.mktemp("ring-spec")
    return write_random_checkpoint(spec, d / "target", seed=7), write_prefix_draft(spec, 3, d / "draft", seed=7)


def test_greedy_on_a_ring_equals_plain_greedy(pair: tuple[Path, Path]) -> None:
    target, draft = pair
    ckpt = open_checkpoint(target)
    spec = ckpt.spec
    prompt = [5, 77, 300, 12, 9]
    n = 30
    plain = generate(load_params(ckpt, range(spec.n_layers), embed=True, head=True), prompt, n).tokens
    plan = ring_plan(spec, {"a": 2, "b": 2, "c": 2}, k=1)
    res = run_plan(plan, ckpt, cluster(["a", "b", "c"]), [prompt],
                   RunOptions(max_new_tokens=n, emulate=False, draft=str(draft), draft_tokens=3))
    assert res.token_ids[0] == plain
    sp = res.trace.meta["speculation"]
    assert sp["passes"] == len(sp["pass_log"]) >= 1 and sp["k"] == 3
    assert sp["passes"] < n - 1  # some drafts were accepted: fewer ring passes than tokens
    out = res.to_json()
    assert out["speculation"]["tokens_per_pass"] == pytest.approx(sp["tokens_per_pass"])
    # the tokens of one pass arrive together, and every token once, in order
    assert [t.index for t in sorted(res.trace.tokens, key=lambda t: t.index)] == list(range(n))
    # and with k = 2 laps, on a single device (no fused step then)
    plan2 = ring_plan(spec, {"a": 1, "b": 2}, k=2)
    res2 = run_plan(plan2, ckpt, cluster(["a", "b"]), [prompt],
                    RunOptions(max_new_tokens=n, emulate=False, draft=str(draft), draft_tokens=5))
    assert res2.token_ids[0] == plain
    one = run_plan(ring_plan(spec, {"a": 6}, k=1), ckpt, cluster(["a"]), [prompt],
                   RunOptions(max_new_tokens=n, emulate=False, draft=str(draft), draft_tokens=2))
    assert one.token_ids[0] == plain


def test_sampling_on_a_ring_is_seeded_and_runs(pair: tuple[Path, Path]) -> None:
    target, draft = pair
    ckpt = open_checkpoint(target)
    plan = ring_plan(ckpt.spec, {"a": 3, "b": 3}, k=1)
    opts = RunOptions(max_new_tokens=12, emulate=False, draft=str(draft), draft_tokens=3, temperature=0.9, seed=4)
    a = run_plan(plan, ckpt, cluster(["a", "b"]), [[1, 2, 3]], opts)
    b = run_plan(plan, ckpt, cluster(["a", "b"]), [[1, 2, 3]], opts)
    assert a.token_ids == b.token_ids and len(a.token_ids[0]) == 12


def test_bad_drafts_are_refused_before_any_worker_starts(pair: tuple[Path, Path], tmp_path: Path) -> None:
    target, _ = pair
    ckpt = open_checkpoint(target)
    plan = ring_plan(ckpt.spec, {"a": 6}, k=1)
    wide = dataclasses.replace(load_model("llama-tiny"), vocab=1024, name="llama-tiny-wide", n_layers=1)
    other = write_random_checkpoint(wide, tmp_path / "wide", seed=1)
    with pytest.raises(PlanError, match="vocabulary"):
        run_plan(plan, ckpt, cluster(["a"]), [[1, 2]], RunOptions(emulate=False, draft=str(other)))
    with pytest.raises(PlanError, match="draft-tokens"):
        run_plan(plan, ckpt, cluster(["a"]), [[1, 2]], RunOptions(emulate=False, draft=str(pair[1]), draft_tokens=0))
    with pytest.raises(Exception, match="no such"):
        run_plan(plan, ckpt, cluster(["a"]), [[1, 2]], RunOptions(emulate=False, draft=str(tmp_path / "nope")))
