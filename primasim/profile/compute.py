"""Compute (`cpu_gflops`, `kv_copy_ms`): the runtime's own kernel, JAX `lax.dot_general` with W
stored (out, in) and contracted on its last axis, over the matrices of one block of a ModelSpec
(Q, K, V, O, gate, up, down, chained as a block runs them). `cpu_gflops.f32` is the compute-bound
rate of that block at a prefill batch of `prefill_tokens` rows (GEMM): the s^cpu of the cost model,
whose memory term (bytes / ram_bw) is added separately. The batch-1 rates (GEMV, weights hot in
cache and cold from DRAM) and prima.cpp's n x n matmul are recorded as second figures. Only f32 is
written: the runtime dequantises f16/q8_0/q4k weights to f32 before its matmuls (XLA:CPU's native
f16 is ~20x slower), so `rate(cpu_flops, "q4k")` falls back to the f32 rate. KV copy: a jitted,
donated `dynamic_update_slice` of one token's K and V into a preallocated cache, differenced over
N layers so JAX's dispatch cost drops out.

JAX is imported inside the measuring functions: a profile without compute (`--only disk`) and the
echo peer run without loading it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from primasim.core.procfs import llc_bytes
from primasim.core.units import GB, GFLOPS, MiB

from .measurement import Measurement, measurement


@dataclass(frozen=True)
class LayerShapes:
    """The weight matrices (out, in) of one block, in the order a block multiplies them."""

    q: tuple[int, int]
    k: tuple[int, int]
    v: tuple[int, int]
    o: tuple[int, int]
    gate: tuple[int, int]
    up: tuple[int, int]
    down: tuple[int, int]
    rows_capped: int = 0  # > 0: rows of every matrix were capped at this to fit the memory budget

    @classmethod
    def of(cls, model: Any) -> LayerShapes:
        e, f, qd, kv = model.hidden, model.ffn, model.q_dim, model.n_kv_embd
        return cls((qd, e), (kv, e), (kv, e), (e, qd), (f, e), (f, e), (e, f))

    def all(self) -> list[tuple[int, int]]:
        return [self.q, self.k, self.v, self.o, self.gate, self.up, self.down]

    @property
    def params(self) -> int:
        return sum(o * i for o, i in self.all())

    def capped(self, max_params: int) -> LayerShapes:
        """Fewer output rows per matrix (same contraction sizes) so the block fits a budget."""
        if self.params <= max_params:
            return self
        def params(rows: int) -> int:
            return sum(min(o, rows) * i for o, i in self.all())

        lo, hi = 64, max(o for o, _ in self.all())  # largest row cap that fits (params grow with it)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if params(mid) <= max_params else (lo, mid - 1)
        return LayerShapes(*[(min(o, lo), i) for o, i in self.all()], rows_capped=lo)

    def describe(self) -> str:
        s = ", ".join(f"{n} {o}x{i}" for n, (o, i) in zip(("q", "k", "v", "o", "gate", "up", "down"), self.all()))
        return s + (f" (rows capped at {self.rows_capped})" if self.rows_capped else "")


def _block_fn() -> Callable[..., Any]:
    """One block's matmuls as the runtime runs them: x (T, in) . W (out, in) contracted on W's
    last axis (never `x @ W.T`, which XLA:CPU turns into a transpose copy), chained q -> o -> gate,
    up -> down, with K and V from the block input."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    dn = (((1,), (1,)), ((), ()))

    def mm(x: Any, w: Any) -> Any:
        # capped shapes (LayerShapes.capped) keep each matrix's contraction size but not its rows, so
        # the previous product is cut or zero-padded to it (a no-op at the model's own shapes)
        n, m = w.shape[1], x.shape[1]
        if m > n:
            x = x[:, :n]
        elif m < n:
            x = jnp.pad(x, ((0, 0), (0, n - m)))
        return lax.dot_general(x, w, dn, preferred_element_type=x.dtype)

    def block(x: Any, wq: Any, wk: Any, wv: Any, wo: Any, wg: Any, wu: Any, wd: Any) -> Any:
        q = mm(x, wq)
        k = mm(x, wk)
        v = mm(x, wv)
        h = mm(q, wo)
        g = mm(h, wg)
        u = mm(h, wu)
        d = mm(g * u, wd)
        return d, k, v

    return jax.jit(block)


def _block_weights(shapes: LayerShapes, dtype: Any, value: float) -> list[Any]:
    import jax.numpy as jnp

    # Small constants: the timing of f32 FMAs does not depend on the values, and x stays finite.
    return [jnp.full(s, value, dtype=dtype) for s in shapes.all()]


def _rate_samples(call: Callable[[], Any], work: float, repeats: int, min_seconds: float) -> list[float]:
    """`repeats` samples of work per second. After a warm-up (compiles), each sample times as many
    back-to-back calls as it takes to last `min_seconds`: short samples are all noise on a shared
    machine, and under a CPU quota they would see full speed or a throttled pause, not the average."""
    _block_until_ready(call())
    t0 = time.perf_counter()
    _block_until_ready(call())
    k = max(1, math.ceil(min_seconds / max(time.perf_counter() - t0, 1e-7)))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _block_until_ready([call() for _ in range(k)])  # async dispatch: the calls queue back to back
        out.append(work * k / (time.perf_counter() - t0))
    return out


def _block_until_ready(x: Any) -> None:
    import jax

    jax.block_until_ready(x)


class ColdGemv:
    """Batch-1 block GEMV with weights streamed from DRAM: cycles through copies of one block of
    `model` that together fill `ws_bytes` (choose >> LLC)."""

    def __init__(self, model: Any, ws_bytes: int,
                 _reuse: tuple[Any, LayerShapes, list[Any]] | None = None) -> None:
        import jax.numpy as jnp

        if _reuse is None:
            shapes = LayerShapes.of(model).capped(max(1, ws_bytes // 4 // 2))
            block, first = _block_fn(), _block_weights(shapes, jnp.float32, 1e-3)
        else:
            block, shapes, first = _reuse
        self.block, self.shapes = block, shapes
        self.flops1, self.wbytes = 2.0 * shapes.params, 4 * shapes.params
        self.n_copies = max(2, math.ceil(ws_bytes / self.wbytes))
        self.copies = [first] + [_block_weights(shapes, jnp.float32, 1e-3 * (1 + c / 1000))
                                 for c in range(1, self.n_copies)]
        self.x1 = jnp.full((1, shapes.q[1]), 1e-2, dtype=jnp.float32)
        self.how = (f"batch 1, cycling through {self.n_copies} copies of one block of {model.name} "
                    f"({self.n_copies * self.wbytes / MiB:.0f} MiB f32, LLC {llc_bytes() / MiB:.0f} MiB reported): "
                    "decode streaming weights from DRAM")

    def one_pass(self) -> Any:
        return [self.block(self.x1, *w) for w in self.copies]

    def rates(self, repeats: int, min_seconds: float) -> list[float]:
        """FLOP/s samples (weight bytes/s = FLOP/s x 2: f32 weights, 2 FLOPs per weight)."""
        return _rate_samples(self.one_pass, self.flops1 * self.n_copies, repeats, min_seconds)

    def close(self) -> None:
        self.copies.clear()


def measure_gemv_cold(model: Any, *, ws_bytes: int, repeats: int = 5, min_seconds: float = 0.05,
                      _reuse: tuple[Any, LayerShapes, list[Any]] | None = None) -> dict[str, Measurement]:
    """gemv_cold (FLOP/s) and gemv_cold_bw (weight bytes/s) of ColdGemv: what decode achieves,
    to compare with ram_bw."""
    g = ColdGemv(model, ws_bytes, _reuse)
    try:
        rates = g.rates(repeats, min_seconds)
    finally:
        g.close()  # free the working set before the next probe
    return {"gemv_cold": measurement("gemv_cold", rates, "GFLOPS", GFLOPS, g.how),
            "gemv_cold_bw": measurement("gemv_cold_bw", (r * g.wbytes / g.flops1 for r in rates), "GB/s", GB,
                                     "weight bytes / time of the cold GEMV: " + g.how)}


def measure_compute(model: Any, *, ws_bytes: int, repeats: int = 5, prefill_tokens: int = 128,
                    native_f16: bool = True, min_seconds: float = 0.05,
                    progress: Callable[[str], None] | None = None) -> dict[str, Measurement]:
    """JAX matmul throughput at the block shapes of `model` (see the module docstring).

    Returns gemm (-> cpu_gflops.f32), gemv_hot, gemv_cold (+ its bytes/s), nxn (prima.cpp's
    n x n with n = min(e, 4096) / 8) and, if asked, gemm_f16_native (XLA:CPU's own f16 path)."""
    import jax
    import jax.numpy as jnp

    say = progress or (lambda _s: None)
    f32 = jnp.float32
    shapes = LayerShapes.of(model).capped(max(1, ws_bytes // 4 // 2))
    flops1 = 2.0 * shapes.params
    wbytes = 4 * shapes.params
    block = _block_fn()
    e_in = shapes.q[1]
    out: dict[str, Measurement] = {}
    per = f"samples of >= {min_seconds * 1000:.0f} ms"

    # GEMM (prefill): compute bound -> the s^cpu of the cost model.
    say("compute: block GEMM (prefill)")
    w0 = _block_weights(shapes, f32, 1e-3)
    xt = jnp.full((prefill_tokens, e_in), 1e-2, dtype=f32)
    rates = _rate_samples(lambda: block(xt, *w0), flops1 * prefill_tokens, repeats, min_seconds)
    out["gemm"] = measurement("gemm", rates, "GFLOPS", GFLOPS, f"JAX lax.dot_general, one block of {model.name} "
                           f"({shapes.describe()}), {prefill_tokens} tokens, f32, {per}")

    # GEMV hot: batch 1, the same block again and again (weights in cache when they fit).
    say("compute: block GEMV (hot)")
    x1 = jnp.full((1, e_in), 1e-2, dtype=f32)
    rates = _rate_samples(lambda: block(x1, *w0), flops1, repeats, min_seconds)
    out["gemv_hot"] = measurement("gemv_hot", rates, "GFLOPS", GFLOPS,
                               f"batch 1, one block ({wbytes / MiB:.1f} MiB f32) re-used: weights hot in cache "
                               f"as far as the LLC ({llc_bytes() / MiB:.0f} MiB reported) holds them, {per}")

    # GEMV cold: cycle through copies of the block filling `ws_bytes` >> LLC, so weights come from DRAM.
    say("compute: block GEMV (cold, from DRAM)")
    out.update(measure_gemv_cold(model, ws_bytes=ws_bytes, repeats=repeats, min_seconds=min_seconds,
                                 _reuse=(block, shapes, w0)))

    # prima.cpp's figure: n x n f32 matmul, n = min(e, 4096) / 8 on CPU.
    say("compute: n x n matmul (prima.cpp)")
    n = max(32, min(model.hidden, 4096) // 8)
    a = jnp.full((n, n), 1e-2, dtype=f32)
    mmul = jax.jit(lambda p, q: p @ q)
    rates = _rate_samples(lambda: mmul(a, a), 2.0 * n**3, repeats, min_seconds)
    out["nxn"] = measurement("nxn", rates, "GFLOPS", GFLOPS, f"prima.cpp's CPU probe: {n}x{n} f32 matmul "
                          f"(n = min(e, 4096)/8), JAX dispatch included, {per}")

    if native_f16:
        say("compute: native f16 GEMM (for the record)")
        w16 = _block_weights(shapes, jnp.float16, 1e-3)
        t16 = max(1, min(8, prefill_tokens))
        x16 = jnp.full((t16, e_in), 1e-2, dtype=jnp.float16)
        rates = _rate_samples(lambda: block(x16, *w16), flops1 * t16, max(2, repeats // 2), min_seconds)
        out["gemm_f16_native"] = measurement(
            "gemm_f16_native", rates, "GFLOPS", GFLOPS,
            f"XLA:CPU native f16 block, {t16} tokens: not used (the runtime dequantises to f32)")
    return out


def measure_kv_copy(model: Any, *, n_ctx: int = 1024, layers: int = 32, repeats: int = 7,
                    min_seconds: float = 0.05, dtype: str = "float32") -> Measurement:
    """Time to write one token's K and V of one layer into a preallocated cache: one jitted,
    donated loop of N dynamic_update_slice pairs over a (layers, n_ctx, kv_heads, head_dim)
    cache (N a traced argument: one compile), N sized so a call lasts `min_seconds`, minus the
    time of a call with N = 0, so JAX's per-call dispatch cost (which the runtime pays once per
    block, not per cache write) drops out."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    dt = jnp.dtype(dtype)
    hk, d = model.n_kv_heads, model.head_dim
    n_ctx = max(1, n_ctx)

    def upd(kc: Any, vc: Any, k: Any, v: Any, p0: Any, count: Any) -> Any:
        def body(i: Any, c: Any) -> Any:
            layer, pos = i % layers, (p0 + i // layers) % n_ctx
            return (lax.dynamic_update_slice(c[0], k[None, None], (layer, pos, 0, 0)),
                    lax.dynamic_update_slice(c[1], v[None, None], (layer, pos, 0, 0)))
        return lax.fori_loop(0, count, body, (kc, vc))

    f = jax.jit(upd, donate_argnums=(0, 1))
    shape = (layers, n_ctx, hk, d)
    state = [jnp.zeros(shape, dt), jnp.zeros(shape, dt)]
    k = jnp.ones((hk, d), dt)
    v = jnp.ones((hk, d), dt)

    def call(count: int, pos: int = 0) -> float:
        t0 = time.perf_counter()
        state[0], state[1] = f(state[0], state[1], k, v, jnp.int32(pos), jnp.int32(count))
        jax.block_until_ready(state)
        return time.perf_counter() - t0

    call(1024)  # compile
    t0 = min(call(0) for _ in range(5))  # dispatch + sync, no copies
    t = min(call(1024) for _ in range(3))
    n = 1024 * max(1, math.ceil(min_seconds / max(t, 1e-7)))
    samples = [max(call(n, r) - t0, 1e-12) / n for r in range(repeats)]
    nb = 2 * hk * d * dt.itemsize
    return measurement("kv_copy", samples, "us", 1e-6,
                    f"jitted donated dynamic_update_slice of one token's K and V ({nb} B, {dtype}) into a "
                    f"{shape} cache; (t(N) - t(0)) / N, N = {n}")
