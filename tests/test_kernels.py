"""The compiled GGUF kernels against their NumPy model and against gguf's dequantiser.

Every kernel set this CPU runs (AVX-512, AVX2, scalar) and every weight type, through jax.jit as
the model calls them (XLA's threads run with FTZ/DAZ on): random block contents with small,
subnormal or zero f16 scales, weights at addresses 32 mod 64, odd row counts, B = 1..12 tokens
(one kernel call handles 8), zero activation blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from primasim.runtime import kernels as K
from primasim.runtime.kernels import reference as R
from primasim.runtime.quantize import BLOCK

pytestmark = pytest.mark.skipif(not K.available(), reason="compiled kernels not built (pip install -e .)")

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q5_0": (0,), "Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2),
              "Q5_K": (0, 2), "Q6_K": (208,)}


def random_rows(rng: np.random.Generator, qtype: str, rows: int, cols: int, scales: str) -> np.ndarray:
    """Stored bytes (rows, row_bytes) of random blocks: random level bits, f16 scale fields set to
    small finite values ("normal"), f16 subnormals ("subnormal"), zero, or a mix."""
    if qtype in ("F32", "F16", "BF16"):
        x = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(rng.uniform(0.01, 3))
        if qtype == "F32":
            return x.view(np.uint8).reshape(rows, -1)
        if qtype == "F16":
            return x.astype(np.float16).view(np.uint8).reshape(rows, -1)
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(rows, -1)
    n, nbytes = BLOCK[qtype]
    b = rng.integers(0, 256, (rows, cols // n, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        shape = b.shape[:2]
        normal = (rng.standard_normal(shape) * 0.01).astype(np.float16).view(np.uint16)
        sub = (rng.integers(1, 0x400, shape) | (rng.integers(0, 2, shape) << 15)).astype(np.uint16)
        pick = {"normal": normal, "subnormal": sub, "zero": np.zeros(shape, np.uint16),
                "mixed": np.where(rng.random(shape) < 0.5, normal, np.where(rng.random(shape) < 0.5, sub, 0))}[scales]
        b[..., off:off + 2] = pick.astype(np.uint16).view(np.uint8).reshape(*shape, 2)
    return b.reshape(rows, -1)


def activations(rng: np.random.Generator, B: int, cols: int, zero_blocks: bool) -> np.ndarray:
    x = rng.standard_normal((B, cols)).astype(np.float32) * rng.uniform(0.1, 10, (B, 1)).astype(np.float32)
    if zero_blocks:
        blocks = x.reshape(B, -1, 32)
        blocks[rng.random(blocks.shape[:2]) < 0.3] = 0.0
    return x


def place(raw: np.ndarray, at: int) -> jax.Array:
    """A 'file' holding the tensor at byte `at` (the file array itself starts 64-byte aligned)."""
    buf = np.zeros(at + raw.size + 64, np.uint8)
    buf[at:at + raw.size] = raw.reshape(-1)
    return jax.device_put(buf)


@jax.jit
def _mm(files: list[jax.Array], x: jax.Array, w: K.QWeight) -> tuple[jax.Array, ...]:
    return K.matmul(files, x, w)


def run(raw: np.ndarray, qtype: str, x: np.ndarray, at: int = 32) -> np.ndarray:
    rows, cols = raw.shape[0], x.shape[1]
    f = place(raw, at)
    assert (f.unsafe_buffer_pointer() + at) % 64 == at % 64
    w = K.qweight([(at, 0, qtype, rows, cols)])
    return np.asarray(_mm([f], jnp.asarray(x), w)[0])


def magnitude(raw: np.ndarray, qtype: str, x: np.ndarray) -> np.ndarray:
    return np.abs(x.astype(np.float64)) @ np.abs(R.dequant(raw, qtype, x.shape[1])).T


def test_isas_listed() -> None:
    assert K.isa() in K.isas() and K.isas()[-1] == "scalar"


@pytest.mark.parametrize("qtype", TYPES)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 40), nblk=st.integers(1, 4), B=st.integers(1, 12),
       scales=st.sampled_from(["normal", "subnormal", "zero", "mixed"]), zero_blocks=st.booleans(),
       at=st.sampled_from([0, 32, 96]))
def test_kernel_equals_integer_reference(qtype: str, seed: int, rows: int, nblk: int, B: int, scales: str,
                                         zero_blocks: bool, at: int) -> None:
    """Kernel == llama.cpp's integer arithmetic (NumPy, float64 scaling) up to f32 summation order."""
    rng = np.random.default_rng(seed)
    per = 256 if qtype.endswith("_K") else 32
    cols = per * nblk * (1 if per == 256 else rng.integers(1, 5))
    raw = random_rows(rng, qtype, rows, cols, scales)
    x = activations(rng, B, cols, zero_blocks)
    ref = R.matmul(raw, qtype, x)
    tol = 2e-6 * np.sqrt(cols) * magnitude(raw, qtype, x) + 1e-35
    for isa in K.isas():
        with K.use_isa(isa):
            y = run(raw, qtype, x, at)
        bad = np.abs(y - ref) > tol
        assert not bad.any(), f"{isa} {qtype}: max err {np.abs(y - ref).max():.3g}, tol {tol[bad].min():.3g}"


@pytest.mark.parametrize("qtype", TYPES)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 9))
def test_kernel_close_to_dequantised_product(qtype: str, seed: int, B: int) -> None:
    """Kernel vs gguf.quants.dequantize(W) @ x in float64: off by at most the activations' rounding."""
    import gguf

    rng = np.random.default_rng(seed)
    cols, rows = 512, 33
    raw = random_rows(rng, qtype, rows, cols, "normal")
    x = activations(rng, B, cols, False)
    if qtype == "F32":
        W = raw.view(np.float32).astype(np.float64)
    elif qtype == "F16":
        W = raw.view(np.float16).astype(np.float64)
    else:
        W = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float64).reshape(rows, cols)
    exact = x.astype(np.float64) @ W.T
    y = run(raw, qtype, x)
    assert np.all(np.abs(y - exact) <= R.error_bound(raw, qtype, x))


def test_parallel_rows_and_several_tensors() -> None:
    """Enough rows for the thread pool; three tensors of different types in one call (q/k/v)."""
    rng = np.random.default_rng(7)
    cols = 1024
    parts = [("Q4_K", 1000), ("Q6_K", 257), ("Q8_0", 130)]
    raws = [random_rows(rng, t, r, cols, "normal") for t, r in parts]
    offs, at = [], 32
    for raw in raws:
        offs.append(at)
        at += raw.size + 32  # keeps every tensor at 32 mod 64
    buf = np.zeros(at + 64, np.uint8)
    for o, raw in zip(offs, raws):
        buf[o:o + raw.size] = raw.reshape(-1)
    x = activations(rng, 3, cols, True)
    w = K.qweight([(o, 0, t, r, cols) for o, (t, r) in zip(offs, parts)])
    ys = _mm([jax.device_put(buf)], jnp.asarray(x), w)
    for y, raw, (t, _) in zip(ys, raws, parts):
        ref = R.matmul(raw, t, x)
        assert np.all(np.abs(np.asarray(y) - ref) <= 1e-4 * magnitude(raw, t, x) + 1e-30)


@pytest.mark.parametrize("qtype", TYPES)
def test_one_token_rows_equal_row_by_row(qtype: str) -> None:
    """Decode (one token): a matrix computed at once (chunks of rows on the pool) equals each row
    computed alone, bit for bit, with every kernel set."""
    rng = np.random.default_rng(11)
    cols, rows = 1024, 7
    raw = random_rows(rng, qtype, rows, cols, "normal")
    x = activations(rng, 1, cols, False)
    for isa in K.isas():
        with K.use_isa(isa):
            whole = run(raw, qtype, x)
            alone = np.concatenate([run(raw[i:i + 1], qtype, x) for i in range(rows)], axis=1)
        assert np.array_equal(whole, alone), isa


@pytest.mark.parametrize("qtype", TYPES)
def test_embed_rows_equal_gguf_dequantize(qtype: str) -> None:
    import gguf

    rng = np.random.default_rng(3)
    rows, cols = 37, 512
    raw = random_rows(rng, qtype, rows, cols, "mixed")
    ids = np.array([[0, 36, 5], [5, 1, 2]], np.int32)
    f = place(raw, 32)
    w = K.qweight([(32, 0, qtype, rows, cols)])
    got = np.asarray(jax.jit(K.embed)([f], w, jnp.asarray(ids)))
    if qtype in ("F32", "F16", "BF16"):
        want = R.dequant(raw, qtype, cols).astype(np.float32)
    else:
        want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(rows, cols)
    np.testing.assert_array_equal(got, want[ids])


def test_bad_descriptors_fail_with_one_clear_line() -> None:
    raw = random_rows(np.random.default_rng(0), "Q8_0", 4, 64, "normal")
    f = place(raw, 0)
    x = jnp.ones((1, 64), jnp.float32)
    bad_type = K.QWeight(jnp.asarray(np.array([[0, 0, 15, 0, 4, 64]], np.uint32)), (4,), 64)  # Q8_K: no kernel
    with pytest.raises(Exception, match="ggml type id 15 has no kernel"):
        np.asarray(_mm([f], x, bad_type)[0])
    outside = K.qweight([(f.size, 0, "Q8_0", 4, 64)])
    with pytest.raises(Exception, match="outside the file"):
        np.asarray(_mm([f], x, outside)[0])
    with pytest.raises(Exception, match="token id 9 outside"):
        np.asarray(K.embed([f], K.qweight([(0, 0, "Q8_0", 4, 64)]), jnp.asarray([9], jnp.int32)))
    with pytest.raises(Exception, match="has no kernel"):
        K.describe([(0, 0, "Q2_K", 4, 256)])


def test_file_array_is_zero_copy(tmp_path) -> None:
    import mmap

    p = tmp_path / "blob"
    p.write_bytes(np.arange(1 << 20, dtype=np.uint32).tobytes())
    with open(p, "rb") as fh:
        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(m, np.uint8)
    arr = K.file_array(view)
    assert arr.unsafe_buffer_pointer() == view.ctypes.data
    assert np.asarray(arr[4:8]).view(np.uint32)[0] == 1


# ---------------------------------------------------------------------------- thread pools
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), qtype=st.sampled_from(TYPES), rows=st.integers(1, 700),
       B=st.integers(1, 3))
def test_own_workers_equal_xla_pool_bit_for_bit(seed: int, qtype: str, rows: int, B: int) -> None:
    """The library's persistent workers and XLA's intra-op pool compute the same rows with the same
    kernels, so a call's results are identical bit for bit (and are the reference's)."""
    rng = np.random.default_rng(seed)
    cols = 1024  # > 64 KB of weights from ~120 rows on: the call is threaded
    raw = random_rows(rng, qtype, rows, cols, "normal")
    x = activations(rng, B, cols, False)
    with K.use_pool("own"):
        own = run(raw, qtype, x)
    with K.use_pool("xla"):
        xla = run(raw, qtype, x)
    assert np.array_equal(own, xla)
    if qtype not in ("F32", "F16", "BF16"):
        assert np.all(np.abs(own - R.matmul(raw, qtype, x)) <= 1e-4 * magnitude(raw, qtype, x) + 1e-30)


def test_attend_same_with_either_pool() -> None:
    """Attention heads on the library's workers or XLA's pool: identical results."""
    rng = np.random.default_rng(5)
    B, T, H, Hkv, D, S, p = 1, 1, 16, 4, 64, 256, 200  # ~200k multiply-adds: threaded
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, h * D)).astype(np.float32)) for h in (H, Hkv, Hkv))
    kc0 = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    vc0 = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    inv_freq = jnp.asarray(1.0 / 10000 ** (np.arange(0, D, 2) / D), jnp.float32)
    pos = jnp.asarray([p], jnp.int32)
    f = jax.jit(lambda *a: K.attend(*a, span=S, interleaved=True))
    outs = []
    for pool in ("own", "xla"):
        with K.use_pool(pool):
            outs.append([np.asarray(o) for o in f(q, k, v, pos, inv_freq, jnp.asarray(kc0), jnp.asarray(vc0))])
    for a, b in zip(*outs):
        assert np.array_equal(a, b)
    assert np.isfinite(outs[0][0]).all() and np.abs(outs[0][0]).max() > 0


def test_calls_from_two_threads_at_once() -> None:
    """Two Python threads computing at once: one gets the workers, the other runs its rows alone;
    both results are right."""
    import threading

    rng = np.random.default_rng(9)
    cols, rows = 1024, 512
    raws = [random_rows(rng, "Q4_K", rows, cols, "normal") for _ in range(2)]
    x = activations(rng, 1, cols, False)
    want = [run(r, "Q4_K", x) for r in raws]
    got: list[list[bool]] = [[], []]

    def worker(i: int) -> None:
        for _ in range(30):
            got[i].append(bool(np.array_equal(run(raws[i], "Q4_K", x), want[i])))

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got == [[True] * 30, [True] * 30]


def _lib() -> object:
    import ctypes

    lib = K.library()
    lib.primasim_qk_prepare.restype = ctypes.c_int64
    lib.primasim_qk_prepare.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.primasim_qk_swiglu.restype = None
    lib.primasim_qk_swiglu.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


P_Q8K, P_Q8K_PERM = 4, 5  # qk.h Prep


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), nblk=st.integers(1, 4), kind=st.sampled_from(
    ["normal", "ties", "zero_block", "tiny", "special", "equal_magnitudes"]), perm=st.booleans())
def test_vectorised_q8k_preparation_equals_portable_bytes(seed: int, nblk: int, kind: str, perm: bool) -> None:
    """Every set's Q8_K activations are the portable code's bytes: the scale from the first element of
    largest magnitude (+a and -a both present), round-half-even ties, zero blocks, subnormals, inf/NaN."""
    rng = np.random.default_rng(seed)
    K_ = 256 * nblk
    x = rng.standard_normal(K_).astype(np.float32) * np.float32(rng.uniform(1e-3, 1e3))
    if kind == "ties":  # values that land on .5 after scaling: 127 / 2 steps
        x = (rng.integers(-254, 255, K_) / 2.0).astype(np.float32)
        x[rng.integers(0, K_)] = 63.5
    elif kind == "zero_block":
        x.reshape(nblk, 256)[rng.integers(0, nblk)] = 0.0
    elif kind == "tiny":
        x = (x * np.float32(1e-40)).astype(np.float32)  # subnormals
    elif kind == "special":
        x[rng.integers(0, K_, 3)] = [np.inf, -np.inf, np.nan]
    elif kind == "equal_magnitudes":
        i, j = rng.choice(K_ // nblk, 2, replace=False)
        x[i], x[j] = -1e4, 1e4
    lib = _lib()
    p = P_Q8K_PERM if perm else P_Q8K
    for isa in K.isas():
        with K.use_isa(isa):
            a = np.zeros(320 * nblk, np.uint8)
            b = np.zeros(320 * nblk, np.uint8)
            assert lib.primasim_qk_prepare(p, x.ctypes.data, K_, a.ctypes.data, 0) == 320 * nblk
            lib.primasim_qk_prepare(p, x.ctypes.data, K_, b.ctypes.data, 1)
        assert np.array_equal(a, b), isa


def test_vectorised_swiglu_within_float_rounding() -> None:
    """The fused SwiGLU (vectorised exponential) vs float64 silu(g) * u: a few ulp, over the range
    where exp over- and underflows too (below g = -87 the result is ~1e-37 instead of ~1e-42: the
    exponential is clamped; libm's gives 0 there)."""
    rng = np.random.default_rng(5)
    g = np.concatenate([rng.standard_normal(4000) * 8, np.linspace(-100, 100, 997), [0.0, -0.0, 88.0, -88.0]])
    g = g.astype(np.float32)
    u = rng.standard_normal(g.size).astype(np.float32)
    exact = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64))) * u.astype(np.float64)
    lib = _lib()
    for isa in K.isas():
        out = np.zeros_like(g)
        with K.use_isa(isa):
            lib.primasim_qk_swiglu(g.ctypes.data, u.ctypes.data, out.ctypes.data, g.size)
        err = np.abs(out - exact)
        assert np.all(err <= 4 * np.finfo(np.float32).eps * np.abs(exact) + 1e-30), (isa, float(err.max()))


@pytest.mark.parametrize("D,T,p", [(64, 1, 200), (128, 3, 37), (48, 2, 5), (64, 1, 0)])
def test_attend_vectorised_rows_close_to_portable(D: int, T: int, p: int) -> None:
    """The sets' vectorised attention rows (8 positions per reduction, vectorised exp) against the
    portable loops (the scalar set): equal within float rounding of the scores and softmax."""
    rng = np.random.default_rng(D + T + p)
    B, H, Hkv, S = 1, 8, 2, 256
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, h * D)).astype(np.float32)) for h in (H, Hkv, Hkv))
    kc0 = rng.standard_normal((B, Hkv, S, D)).astype(np.float32) * 2
    vc0 = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    inv_freq = jnp.asarray(1.0 / 10000 ** (np.arange(0, D, 2) / D), jnp.float32)
    pos = jnp.asarray([p], jnp.int32)
    f = jax.jit(lambda *a: K.attend(*a, span=S, interleaved=False))
    outs = {}
    for isa in K.isas():
        with K.use_isa(isa):
            outs[isa] = [np.asarray(o) for o in f(q, k, v, pos, inv_freq, jnp.asarray(kc0), jnp.asarray(vc0))]
    ref = outs["scalar"]
    for isa, got in outs.items():
        np.testing.assert_allclose(got[0], ref[0], rtol=2e-5, atol=2e-6, err_msg=isa)
        assert np.array_equal(got[1], ref[1]) and np.array_equal(got[2], ref[2]), isa  # the cache writes
