"""The JAX model against an independent implementation (Hugging Face transformers on torch), on
random checkpoints written by primasim.runtime.checkpoint and loaded by transformers from the same files."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from primasim import load_model
from primasim.core.errors import WorkerError
from primasim.core.plan import DevicePlan, Plan
from primasim.runtime import (
    PagedKVPool,
    embed,
    generate,
    init_kv,
    load_params,
    load_tokenizer,
    logits,
    open_checkpoint,
    run_layers,
    sample,
    write_random_checkpoint,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

N_DECODE = 32
TOL = 1e-4
PROMPT = "The quick brown fox jumps over the lazy dog; primasim runs models on home clusters."


@pytest.fixture(scope="module", params=["llama-tiny", "qwen2-tiny"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = load_model(request.param)
    return write_random_checkpoint(spec, tmp_path_factory.mktemp(request.param) / "st", seed=7)


@pytest.fixture(scope="module")
def llama_dir(llama_tiny: Path) -> Path:
    """One model for the tests whose subject is not the architecture (KV stores, spans, errors)."""
    return llama_tiny


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> dict[str, np.ndarray]:
    """transformers' prefill logits, greedy continuation and per-step logits (its own KV cache)."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.eval()
    ids = load_tokenizer(model_dir).encode(PROMPT)
    inp = torch.tensor([ids])
    with torch.no_grad():
        prefill = hf(inp).logits[0].numpy()
        out = hf.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=N_DECODE, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    steps = np.stack([s[0].numpy() for s in out.logits])
    return {"ids": np.array(ids), "prefill": prefill, "tokens": out.sequences[0, len(ids):].numpy(), "steps": steps}


def test_rope_frequencies_match_transformers(model_dir: Path) -> None:
    """transformers sees the same RoPE frequencies (llama3 scaling for llama-tiny), so the logit
    comparisons below cannot pass by both sides ignoring the scaling."""
    from primasim.runtime import rope_inv_freq

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    spec = open_checkpoint(model_dir).spec
    ours = rope_inv_freq(spec)
    np.testing.assert_allclose(hf.model.rotary_emb.inv_freq.numpy(), ours, rtol=1e-6)
    plain = 1.0 / spec.rope_theta ** (np.arange(0, spec.head_dim, 2) / spec.head_dim)
    assert (np.abs(ours - plain).max() > 1e-3) == (spec.rope_scaling is not None)


def _greedy(windows: list[tuple[str, list[int]]], params: dict[str, object], kvs: dict[str, object],
            ids: np.ndarray, head: str) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Prefill + N_DECODE greedy steps, running `windows` (device, layers) in order per token."""

    def forward(tokens: list[int], pos: int) -> np.ndarray:
        x = embed(params[head], [tokens])
        for dev, layers in windows:
            x, kvs[dev] = run_layers(params[dev], kvs[dev], x, pos, layers)
        return np.asarray(logits(params[head], x))[0]

    prefill = forward(list(ids), 0)
    steps, toks = [prefill[-1]], []
    for i in range(N_DECODE):
        toks.append(sample(steps[-1]))
        if i < N_DECODE - 1:
            steps.append(forward([toks[-1]], len(ids) + i)[-1])
    return prefill, toks, np.stack(steps)


def _check(reference: dict[str, np.ndarray], prefill: np.ndarray, toks: list[int], steps: np.ndarray) -> None:
    assert np.abs(prefill - reference["prefill"]).max() < TOL
    assert toks == list(reference["tokens"])
    assert np.abs(steps - reference["steps"]).max() < TOL
    assert np.abs(reference["steps"]).max() > 0.5  # the logits are not all ~0 (init scale is sane)


def test_one_device_matches_transformers(model_dir: Path, reference: dict[str, np.ndarray]) -> None:
    ckpt = open_checkpoint(model_dir)
    L = ckpt.spec.n_layers
    params = {"d0": load_params(ckpt, range(L), embed=True, head=True)}
    kvs = {"d0": init_kv(ckpt.spec, range(L), max_seq=len(reference["ids"]) + N_DECODE)}
    _check(reference, *_greedy([("d0", list(range(L)))], params, kvs, reference["ids"], "d0"))


@pytest.mark.parametrize("windows", [None, [[0, 1], [2, 3, 4], [5]]], ids=["fused-step", "windows"])
def test_generate_matches_transformers(model_dir: Path, reference: dict[str, np.ndarray],
                                       windows: list[list[int]] | None) -> None:
    """generate(): one jitted call per token (embedding + blocks + head), or window by window."""
    params = load_params(open_checkpoint(model_dir), range(6), embed=True, head=True)
    gen = generate(params, list(reference["ids"]), N_DECODE, windows=windows, keep_logits=True)
    assert gen.tokens == list(reference["tokens"])
    assert np.abs(np.stack(gen.logits) - reference["steps"]).max() < TOL


@pytest.mark.parametrize("windows", [(1, 1, 1), (2, 1, 1)], ids=["closed-form", "partial-last-lap"])
def test_ring_split_k2_matches_transformers(model_dir: Path, reference: dict[str, np.ndarray],
                                            windows: tuple[int, ...]) -> None:
    """3 'devices', k = 2 laps, each with its own params and KV cache, windows in the plan's order."""
    ckpt = open_checkpoint(model_dir)
    L = ckpt.spec.n_layers
    plan = Plan(system="prima", model=ckpt.spec.name, n_layers=L, k=2,
                devices=tuple(DevicePlan(f"d{i}", w) for i, w in enumerate(windows)))
    segs = [(s.device, list(range(s.start, s.end))) for s in plan.segments()]
    assert {s.lap for s in plan.segments()} == {0, 1}
    mine = {d.name: [i for dev, ls in segs if dev == d.name for i in ls] for d in plan.devices}
    params = {d: load_params(ckpt, ls, embed=d == plan.head, head=d == plan.head) for d, ls in mine.items()}
    kvs = {d: init_kv(ckpt.spec, ls, max_seq=len(reference["ids"]) + N_DECODE) for d, ls in mine.items()}
    _check(reference, *_greedy(segs, params, kvs, reference["ids"], plan.head))


def test_gguf_f32_matches_transformers(model_dir: Path, reference: dict[str, np.ndarray], tmp_path: Path) -> None:
    """The same seed written as GGUF F32 (llama.cpp layout: permuted Q/K, rope_freqs) gives the same logits."""
    spec = open_checkpoint(model_dir).spec
    ckpt = open_checkpoint(write_random_checkpoint(spec.with_quant("f32"), tmp_path / "m.gguf", fmt="gguf", seed=7))
    # every matrix file-backed (1-D tensors at llama.cpp's 32-byte alignment may be copied, a few KB)
    assert ckpt.format == "gguf" and all("every weight matrix stays file-backed" in n for n in ckpt.notes)
    L = spec.n_layers
    params = {"d0": load_params(ckpt, range(L), embed=True, head=True)}
    kvs = {"d0": init_kv(spec, range(L), max_seq=len(reference["ids"]) + N_DECODE)}
    _check(reference, *_greedy([("d0", list(range(L)))], params, kvs, reference["ids"], "d0"))


# Quantised GGUF: weights differ from the f32 model by the format's rounding, so logits differ.
# Measured on these models (logits of std ~1; experiments/results/runtime_decode_*.md has the
# 300M model too): F16 max abs 4-6e-3, Q8_0 max abs 0.11-0.16 and rms 0.02-0.03. Bounds have ~3x
# headroom; tokens may diverge after a near-tie, so only the prefill logits are compared.
@pytest.mark.parametrize("quant,max_tol,rms_tol", [("f16", 2e-2, 5e-3), ("q8_0", 0.5, 0.1)])
def test_gguf_quantised_within_tolerance(model_dir: Path, reference: dict[str, np.ndarray], tmp_path: Path,
                                         quant: str, max_tol: float, rms_tol: float) -> None:
    spec = open_checkpoint(model_dir).spec
    ckpt = open_checkpoint(write_random_checkpoint(spec.with_quant(quant), tmp_path / "m.gguf", fmt="gguf", seed=7))
    # the kernels compute F16 / Q8_0 in place: no matrix converted or copied
    assert all("every weight matrix stays file-backed" in n for n in ckpt.notes)
    L = spec.n_layers
    params = load_params(ckpt, range(L), embed=True, head=True)
    kv = init_kv(spec, range(L), max_seq=len(reference["ids"]))
    x, _ = run_layers(params, kv, embed(params, [reference["ids"]]), 0, range(L))
    err = np.abs(np.asarray(logits(params, x))[0] - reference["prefill"])
    assert 0 < err.max() < max_tol
    assert np.sqrt(np.mean(err**2)) < rms_tol


def test_paged_batched_decode_matches_contiguous(llama_dir: Path) -> None:
    """Three sequences of different lengths decoded together through the paged pool give the
    logits each gets alone with a contiguous cache; freed blocks are reused. Prompts go in by
    chunks of 4 tokens (chunked prefill), which also keeps the number of compiled shapes small;
    two blocks only, to keep compilation short: the pool is the same for every layer."""
    ckpt = open_checkpoint(llama_dir)
    spec, L, C = ckpt.spec, 2, 4
    params = load_params(ckpt, range(L), embed=True, head=True)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, spec.vocab, n)) for n in (4, 20, 12)]

    def last_logits(x: jax.Array) -> np.ndarray:
        return np.asarray(logits(params, x[:, -1:]))[:, 0]

    def alone(prompt: list[int], n_new: int) -> list[np.ndarray]:
        kv = init_kv(spec, range(L), max_seq=64)
        for i in range(0, len(prompt), C):
            x, kv = run_layers(params, kv, embed(params, [prompt[i:i + C]]), i, range(L))
        out, pos = [last_logits(x)[0]], len(prompt)
        for _ in range(n_new):
            x, kv = run_layers(params, kv, embed(params, [[sample(out[-1])]]), pos, range(L))
            out.append(last_logits(x)[0])
            pos += 1
        return out

    pool = PagedKVPool(spec, range(L), n_blocks=24, block_size=4, max_seq=32)
    got: dict[int, list[np.ndarray]] = {}
    for s, p in enumerate(prompts):  # prefill one by one, chunk by chunk
        pool.add(s)
        for i in range(0, len(p), C):
            pos = pool.prepare([s], C)
            x, pool = run_layers(params, pool, embed(params, [p[i:i + C]]), pos, range(L))
            pool.advance([s], C)
        got[s] = [last_logits(x)[0]]
    for _ in range(6):  # batched decode, with a padding row
        seqs = [0, 1, None, 2]
        pos = pool.prepare(seqs, 1)
        ids = [[sample(got[s][-1])] if s is not None else [0] for s in seqs]
        x, pool = run_layers(params, pool, embed(params, ids), pos, range(L))
        pool.advance(seqs, 1)
        lg = last_logits(x)
        for b, s in enumerate(seqs):
            if s is not None:
                got[s].append(lg[b])
    for s, p in enumerate(prompts):
        assert np.abs(np.stack(got[s]) - np.stack(alone(p, 6))).max() < 1e-4
    free_before = pool.free_blocks
    pool.free(1)
    assert pool.free_blocks == free_before + -(-(20 + 6) // 4)
    pool.add(9)
    pool.prepare([9], 20)
    assert pool.free_blocks == free_before + -(-(20 + 6) // 4) - 5


def test_paged_pool_exhaustion_is_clear(llama_dir: Path) -> None:
    from primasim.runtime import KVPoolExhausted

    spec = open_checkpoint(llama_dir).spec
    pool = PagedKVPool(spec, [0], n_blocks=3, block_size=4)
    pool.add("a")
    assert pool.can_fit(8) and not pool.can_fit(9)
    with pytest.raises(KVPoolExhausted, match="free blocks"):
        pool.prepare(["a"], 9)
    assert pool.free_blocks == 2  # nothing was taken by the failed call


def test_run_layers_rejects_overflow_and_missing_layers(llama_dir: Path) -> None:
    ckpt = open_checkpoint(llama_dir)
    params = load_params(ckpt, [0, 1], embed=True, head=False)
    kv = init_kv(ckpt.spec, [0, 1], max_seq=4)
    x = embed(params, [[1, 2, 3]])
    with pytest.raises(WorkerError, match="exceed the KV cache"):
        run_layers(params, kv, x, 2, [0, 1])
    with pytest.raises(WorkerError, match="no weights for layers"):
        run_layers(params, kv, x, 0, [2])


def test_sampler_is_seeded_and_respects_top_k_top_p() -> None:
    z = np.array([2.0, 1.9, 0.5, -1.0, -5.0])
    assert sample(z) == 0
    draws = lambda **kw: [sample(z, np.random.default_rng(s), temperature=1.0, **kw) for s in range(200)]  # noqa: E731
    assert draws() == draws()  # same seeds, same draws
    assert set(draws(top_k=2)) == {0, 1}
    p = np.exp(z) / np.exp(z).sum()
    assert p[0] < 0.5 < p[0] + p[1]  # top_p=0.5 keeps exactly the first two
    assert set(draws(top_p=0.5)) == {0, 1}
    assert len(set(draws())) >= 3


def test_window_compilation_is_shared_between_windows_of_equal_shape(llama_dir: Path) -> None:
    """A window of the same size and batch reuses the compiled function whatever its layer ids."""
    from primasim.runtime.model import _window

    ckpt = open_checkpoint(llama_dir)
    params = load_params(ckpt, range(4), embed=True, head=False)
    kv = init_kv(ckpt.spec, range(4), max_seq=8)
    x = embed(params, [[5]])
    _, kv = run_layers(params, kv, x, 0, [0, 1])
    before = _window._cache_size()
    _, kv = run_layers(params, kv, x, 0, [2, 3])
    assert _window._cache_size() == before
    jax.block_until_ready(kv.layers[3])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "grow", "free"]), st.integers(0, 5), st.integers(1, 9)),
                max_size=40))
def test_paged_pool_allocator_invariants(ops: list[tuple[str, int, int]]) -> None:
    """Whatever the order of admissions, growth and frees: no block is shared or lost, block 0 is
    never handed out, every sequence has room for its tokens, and a refused request changes nothing."""
    from primasim.runtime import KVPoolExhausted

    pool = PagedKVPool(load_model("llama-tiny"), [], n_blocks=10, block_size=4, max_seq=24)
    for op, s, n in ops:
        if op == "add" and s not in pool.sequences():
            pool.add(s)
        elif op == "grow" and s in pool.sequences():
            state = (pool.free_blocks, {q: list(pool._tables[q]) for q in pool.sequences()})
            try:
                pool.prepare([s], n)
                pool.advance([s], n)
            except KVPoolExhausted:
                assert state == (pool.free_blocks, {q: list(pool._tables[q]) for q in pool.sequences()})
            except WorkerError:
                assert pool.length(s) + n > pool.max_seq
        elif op == "free" and s in pool.sequences():
            pool.free(s)
        owned = [b for q in pool.sequences() for b in pool._tables[q]]
        assert len(owned) == len(set(owned)) and 0 not in owned
        assert sorted(owned + pool._free) == list(range(1, 10))
        for q in pool.sequences():
            assert len(pool._tables[q]) == -(-pool.length(q) // 4)  # room for every token, no more


def test_attention_span_buckets() -> None:
    from primasim.core.runtime_facts import MIN_SPAN, attention_span

    assert attention_span(1, 4096) == MIN_SPAN
    assert attention_span(MIN_SPAN + 1, 4096) == 2 * MIN_SPAN
    assert attention_span(300, 280) == 280  # never beyond the cache
    assert attention_span(300, 600, quantum=48) == 528  # whole blocks
    assert attention_span(1000, 1000, quantum=16) == 1008  # the last block may be partial


def test_decode_across_span_buckets_matches_one_shot_prefill(llama_dir: Path) -> None:
    """Incremental decode that crosses the 256-position span bucket (contiguous and paged) gives
    the logits of one prefill over the whole sequence."""
    ckpt = open_checkpoint(llama_dir)
    spec, L = ckpt.spec, range(2)
    params = load_params(ckpt, L, embed=True, head=True)
    ids = list(np.random.default_rng(1).integers(3, spec.vocab, 262))
    x, _ = run_layers(params, init_kv(spec, L, max_seq=300), embed(params, [ids]), 0, L)
    want = np.asarray(logits(params, x))[0, 249:]
    kv = init_kv(spec, L, max_seq=300)
    pool = PagedKVPool(spec, L, n_blocks=40, block_size=16, max_seq=300)
    pool.add("s")
    x, kv = run_layers(params, kv, embed(params, [ids[:250]]), 0, L)
    pos = pool.prepare(["s"], 250)
    y, pool = run_layers(params, pool, embed(params, [ids[:250]]), pos, L)
    pool.advance(["s"], 250)
    got, got_paged = [np.asarray(logits(params, x))[0, -1]], [np.asarray(logits(params, y))[0, -1]]
    for i in range(250, 261):
        x, kv = run_layers(params, kv, embed(params, [[ids[i]]]), i, L)
        pos = pool.prepare(["s"], 1)
        y, pool = run_layers(params, pool, embed(params, [[ids[i]]]), pos, L)
        pool.advance(["s"], 1)
        got.append(np.asarray(logits(params, x))[0, -1])
        got_paged.append(np.asarray(logits(params, y))[0, -1])
    assert np.abs(np.stack(got) - want[:12]).max() < 1e-4
    assert np.abs(np.stack(got_paged) - want[:12]).max() < 1e-4


def test_pin_params_copies_out_of_the_file(model_dir: Path) -> None:
    """pin_params: same logits, no buffer inside the mapped file, a tied embedding copied once."""
    from primasim.runtime import pin_params

    ckpt = open_checkpoint(model_dir)
    params = load_params(ckpt, range(2), embed=True, head=True)
    pinned = pin_params(params)
    base = np.frombuffer(ckpt._map(ckpt.files[0]), np.uint8).ctypes.data
    size = ckpt.files[0].stat().st_size
    leaves = jax.tree_util.tree_leaves(pinned)
    assert not any(base <= a.unsafe_buffer_pointer() < base + size for a in leaves)
    assert (pinned.output is pinned.embed) == ckpt.spec.tie_embeddings
    x = embed(params, [[3, 4, 5]])
    a, _ = run_layers(params, init_kv(ckpt.spec, range(2), 8), x, 0, range(2))
    b, _ = run_layers(pinned, init_kv(ckpt.spec, range(2), 8), x, 0, range(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_batch_warmed_up_at_load_compiles_nothing_in_its_first_prefill(llama_dir: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """The worker's batch set-up (compile, pin, the pool, the warm-up on zero weights) leaves no
    compilation to the run: the first prefill's block tables once compiled a transfer of their own
    (jit(stage), 25-40 ms of CPU measured on llama-mini-300m) because the warm-up made its padding
    tables another way -- a one-off cost in every batch run's first TTFT."""
    import logging

    from primasim.runtime.batch import BatchServer
    from primasim.runtime.worker.stage import Stage

    max_seq, opts = 64, {"batch": 2, "kv_bytes": 2**20, "tile_tokens": 16}
    stage = Stage(str(llama_dir), [(0, 2)], head=True, max_seq=max_seq)
    BatchServer.warmup(stage, [8], 2, 16, max_seq=max_seq, kv_bytes=opts["kv_bytes"])
    stage.load_weights(pinned=True)
    pool = BatchServer.preallocate(stage, opts, max_seq)
    with stage.zero_weights():
        BatchServer.warmup(stage, [8], 2, 16, max_seq=max_seq, kv_bytes=opts["kv_bytes"], pool=pool)
    rec = type("R", (), {"span": lambda *a: None, "sample": lambda *a: None})()
    obj = {"prompts": [list(range(1, 9))] * 2, "max_new_tokens": 4, "options": opts, "setup_max_seq": max_seq}
    server = BatchServer(stage, obj, rec, lambda *a: None, None, None, pool=pool)
    assert server.pool is pool
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        server.pool.add(0)
        server._forward([0], np.asarray([obj["prompts"][0]], np.int32), 8)
        server._forward([0, None], np.zeros((2, 1), np.int32), 1)
    compiled = [r.getMessage()[:160] for r in caplog.records if "Compiling" in r.getMessage()]
    assert not compiled, compiled
