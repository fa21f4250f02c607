"""runtime/quantize.py: the K-quant writers (round trips), the activation quantisers, and both
against llama.cpp's own (byte for byte, when llama-cpp-python is installed)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from primasim.runtime.kernels import llamacpp, reference as R
from primasim.runtime.quantize import (
    BLOCK,
    dequantize,
    q8_0,
    q8_1,
    q8_k,
    quantize,
    unpack_scales_k4,
)

K_QUANTS = ["Q4_K", "Q5_K", "Q6_K"]
NMAX = {"Q4_K": 15, "Q5_K": 31}
# rms error / rms value on Gaussian rows: llama.cpp's reference quantisers reach 0.071, 0.036 and 0.018
RMSE = {"Q4_K": 0.075, "Q5_K": 0.038, "Q6_K": 0.019, "Q8_0": 0.006, "Q4_0": 0.09, "Q5_0": 0.045}
slow = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rows(seed: int, n: int, cols: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    if kind == "scaled":  # rows and blocks of very different magnitudes
        x *= (10.0 ** rng.uniform(-6, 3, (n, cols // 32, 1))).repeat(32, axis=2).reshape(n, cols).astype(np.float32)
    elif kind == "sparse":
        x[rng.random(x.shape) < 0.7] = 0.0
    elif kind == "positive":
        x = np.abs(x) + np.float32(0.5)
    return x


@pytest.mark.parametrize("qtype", list(RMSE))
@slow
@given(seed=st.integers(0, 2**32 - 1), nblk=st.integers(1, 3))
def test_round_trip_error_is_llama_cpps(qtype: str, seed: int, nblk: int) -> None:
    x = rows(seed, 16, 256 * nblk, "gaussian")  # >= 16 blocks: the rms error of one block varies by ~10 %
    y = dequantize(quantize(x, qtype), qtype, x.shape[1])
    assert np.sqrt(np.mean((x - y) ** 2)) <= RMSE[qtype] * np.sqrt(np.mean(x**2))


@pytest.mark.parametrize("qtype", K_QUANTS)
@slow
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["gaussian", "scaled", "sparse", "positive"]))
def test_levels_are_nearest_for_the_stored_scales(qtype: str, seed: int, kind: str) -> None:
    """The last pass of llama.cpp's quantisers: each element's level is the nearest one (clamped)
    for the block's stored (f16, 6/8-bit) scales; every dequantised value is finite."""
    x = rows(seed, 4, 512, kind)
    raw = quantize(x, qtype)
    u = R.unpack(raw, qtype)
    assert np.isfinite(R.dequant(raw, qtype, 512)).all()
    xb = x.reshape(4, -1, 256).astype(np.float64)
    if qtype == "Q6_K":
        D = (u["d"][..., None] * u["sc"]).repeat(16, axis=-1)  # (rows, nb, 256)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = xb / D
        want = np.clip(np.rint(t), -32, 31) + 32
    else:
        D = (u["d"][..., None] * u["sc"]).repeat(32, axis=-1)
        M = (u["dmin"][..., None] * u["mn"]).repeat(32, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (xb + M) / D
        want = np.clip(np.rint(t), 0, NMAX[qtype])
    live = D != 0
    t = np.where(live, t, 0.0)
    tie = np.abs(np.abs(t - np.floor(t)) - 0.5) < 1e-4  # f32 vs f64 may round a near-tie either way
    assert np.all((u["q"] == want) | ~live | tie)


@pytest.mark.parametrize("qtype", K_QUANTS + ["Q8_0", "Q4_0", "Q5_0", "Q5_1"])
def test_zero_and_constant_blocks(qtype: str) -> None:
    x = np.zeros((2, 512), np.float32)
    x[1, 256:] = 0.75
    y = dequantize(quantize(x, qtype), qtype, 512)
    np.testing.assert_array_equal(y[0], 0.0)
    assert np.abs(y[1, 256:] - 0.75).max() < 0.01


def test_scales_pack_and_unpack() -> None:
    from primasim.runtime.quantize import _pack_scales_k4

    rng = np.random.default_rng(0)
    ls, lm = rng.integers(0, 64, (50, 8), dtype=np.uint8), rng.integers(0, 64, (50, 8), dtype=np.uint8)
    sc, mn = unpack_scales_k4(_pack_scales_k4(ls, lm))
    np.testing.assert_array_equal(sc, ls)
    np.testing.assert_array_equal(mn, lm)


def test_activation_quantisers() -> None:
    """Q8_K: d = max/-127 (negative for a positive max), q in -127..127, bsums; Q8_0/Q8_1: f16 d."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    x[1, :256] = 0
    d, q, bs = q8_k(x)
    assert d[1, 0] == 0 and not q[1, 0].any() and q.min() >= -127
    np.testing.assert_array_equal(bs, q.reshape(3, 2, 16, 16).astype(np.int32).sum(-1))
    assert np.abs(np.repeat(d, 256, -1) * q.reshape(3, -1) - x).max() <= np.abs(d).max() / 2 * 1.0001
    d0, q0 = q8_0(x)
    assert d0.dtype == np.float32 and np.array_equal(d0, d0.astype(np.float16).astype(np.float32))
    d1, q1, s1 = q8_1(x)
    np.testing.assert_array_equal(q1, q0)


# ---------------------------------------------------------------------------- against llama.cpp
needs_llama = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed (.[bench])")


@needs_llama
@pytest.mark.parametrize("qtype", K_QUANTS + ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
@slow
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["gaussian", "scaled", "sparse", "positive"]))
def test_quantiser_is_llama_cpps_byte_for_byte(qtype: str, seed: int, kind: str) -> None:
    """Our writer vs ggml_quantize_chunk (what llama_model_quantize runs without an imatrix).
    llama.cpp's build may fuse multiply-adds (FMA) where NumPy rounds twice, which can flip a
    near-tie between candidate scales: we allow 2 % of blocks to differ, not more."""
    x = rows(seed, 8, 512, kind)
    a = quantize(x, qtype).reshape(-1, BLOCK[qtype][1])
    b = llamacpp.quantize(x, qtype).reshape(-1, BLOCK[qtype][1])
    assert (a == b).all(axis=1).mean() >= 0.98


@needs_llama
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["gaussian", "scaled", "sparse"]))
def test_activation_quantisers_are_llama_cpps(seed: int, kind: str) -> None:
    x = rows(seed, 1, 512, kind)[0]
    d, q, bs = q8_k(x)
    b = llamacpp.quantize_activations(x, "Q8_K").reshape(-1, 292)
    np.testing.assert_array_equal(b[:, :4].copy().view(np.float32)[:, 0], d)
    np.testing.assert_array_equal(b[:, 4:260].view(np.int8), q)
    np.testing.assert_array_equal(b[:, 260:].copy().view(np.int16), bs)
    d0, q0 = q8_0(x)
    b = llamacpp.quantize_activations(x, "Q8_0").reshape(-1, 34)
    np.testing.assert_array_equal(b[:, :2].copy().view(np.float16)[:, 0].astype(np.float32), d0)
    np.testing.assert_array_equal(b[:, 2:].view(np.int8), q0)
    d1, q1, s1 = q8_1(x)
    b = llamacpp.quantize_activations(x, "Q8_1").reshape(-1, 36)
    np.testing.assert_array_equal(b[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float32), s1)


# ---------------------------------------------------------------------------- the GGUF writer
def _q4km_spec():
    from primasim.core.model import ModelSpec

    return ModelSpec(name="q4km", family="llama", n_layers=8, hidden=256, n_heads=4, n_kv_heads=2, head_dim=64,
                     ffn=512, vocab=256, quant="q4k")


def test_random_q4_k_m_file_has_llama_cpps_mix(tmp_path) -> None:
    """Q4_K for most matrices, Q6_K for the output and, by use_more_bits, some attn_v / ffn_down;
    each tensor holds the seeded random weights up to Q4_K / Q6_K rounding."""
    import gguf

    from primasim.runtime import write_random_checkpoint
    from primasim.runtime.checkpoint import _permute_qk, random_tensor

    spec = _q4km_spec()
    p = write_random_checkpoint(spec, tmp_path / "m.gguf", fmt="gguf", seed=1)
    r = gguf.GGUFReader(p)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    more = [i < 1 or i >= 7 or (i - 1) % 3 == 2 for i in range(8)]  # llama.cpp's use_more_bits(i, 8)
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    for i in range(8):
        for role in ("attn_v", "ffn_down"):
            assert types[f"blk.{i}.{role}.weight"] == ("Q6_K" if more[i] else "Q4_K")
        assert types[f"blk.{i}.attn_q.weight"] == "Q4_K" and types[f"blk.{i}.attn_norm.weight"] == "F32"
    assert int(r.fields["general.file_type"].contents()) == 15  # MOSTLY_Q4_K_M
    for t in r.tensors:
        if t.name in ("blk.3.attn_k.weight", "blk.0.ffn_down.weight", "output.weight"):
            want = random_tensor(spec, t.name, tuple(reversed([int(s) for s in t.shape])), 1)
            if ".attn_k." in t.name:
                want = _permute_qk(want, spec.n_kv_heads)
            got = dequantize(np.asarray(t.data), t.tensor_type.name, want.shape[1])
            assert np.sqrt(np.mean((got - want) ** 2)) <= RMSE[t.tensor_type.name] * np.sqrt(np.mean(want**2))


def test_q4_k_m_blocks_are_unequal_and_the_spec_knows_each(tmp_path) -> None:
    """The Q6_K layers of a Q4_K_M file are bigger; `ModelSpec.block_bytes` gives each block's bytes
    as the file holds them (catalogue spec and the spec read from the file alike), and the
    simulator's planned residency streams what the worker plans on the file's ranges."""
    from primasim import load_model
    from primasim.core.plan import DevicePlan, Plan
    from primasim.core.runtime_facts import anon_reserve, plan_residency
    from primasim.runtime import write_random_checkpoint
    from primasim.runtime.checkpoint import open_checkpoint
    from primasim.sim._runtime import residency

    spec = _q4km_spec()
    p = write_random_checkpoint(spec, tmp_path / "m.gguf", fmt="gguf", seed=1)
    ck = open_checkpoint(p)
    real = {i: float(sum(r[2] for r in ck.layer_ranges([i]))) for i in range(8)}
    assert max(real.values()) > 1.05 * min(real.values())
    from_file = load_model(p)
    for i in range(8):
        assert spec.block_bytes(i) == real[i]
        assert abs(from_file.block_bytes(i) - real[i]) <= 1e-9 * real[i]
    # a device with the last three blocks (two heavier), short of memory: the simulator plans what
    # the worker plans on the file's ranges (from the mean block it streamed 24.6 % of each block,
    # where the worker streams 32.5 %)
    plan = Plan(system="even", model=spec.name, n_layers=8, k=1, quant="q4k", prefetch=True,
                devices=(DevicePlan("a", 5), DevicePlan("b", 3)))
    reserve = anon_reserve(3, 64, spec.n_kv_heads, spec.head_dim)
    budget = 0.9 * sum(real[i] for i in (5, 6, 7))
    worker = plan_residency("planned", budget, {i: real[i] for i in (5, 6, 7)}, prefetch=True)
    sim = residency(plan, spec, budget + reserve, "b", max_seq=64)
    assert sim.keep_fraction == pytest.approx(worker.keep_fraction, rel=1e-12)
    assert sim.streamed == pytest.approx(worker.streamed, rel=1e-12)


@needs_llama
def test_random_q4_k_m_file_equals_llama_quantize(tmp_path) -> None:
    """Our Q4_K_M writer vs llama.cpp's llama_model_quantize of the same model written as F32:
    the same type for every tensor and the same bytes (up to a few near-tie blocks)."""
    import dataclasses

    import gguf
    import llama_cpp

    from primasim.runtime import write_random_checkpoint

    spec = _q4km_spec()
    ours = write_random_checkpoint(spec, tmp_path / "ours.gguf", fmt="gguf", seed=2)
    f32 = write_random_checkpoint(dataclasses.replace(spec, quant="f32"), tmp_path / "f32.gguf", fmt="gguf", seed=2)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp_path / "theirs.gguf").encode(), params) == 0
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(tmp_path / "theirs.gguf").tensors}
    assert set(a) == set(b)
    same = total = 0
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type, name
        if len(t.shape) > 1:
            n = BLOCK[t.tensor_type.name][1]
            x, y = np.asarray(t.data).reshape(-1, n), np.asarray(b[name].data).reshape(-1, n)
            same += int((x == y).all(axis=1).sum())
            total += x.shape[0]
    assert same >= 0.98 * total
