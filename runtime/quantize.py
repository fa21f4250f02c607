"""GGUF block quantisers in NumPy: weights (Q4_K, Q5_K, Q6_K + what `gguf` already quantises) and
activations (Q8_K, Q8_0, Q8_1, as llama.cpp's CPU backend quantises them before a dot product).

The `gguf` package dequantises every type but quantises only the legacy ones (Q4_0, Q5_0, Q8_0, ...)
and BF16, so random test models in Q4_K_M need these writers. They follow llama.cpp's reference
quantisers (ggml `src/ggml-quants.c`: `quantize_row_q4_K_ref` with `make_qkx2_quants`,
`quantize_row_q5_K_ref`, `quantize_row_q6_K_ref` with `make_qx_quants`), which is what
`llama_model_quantize` runs without an importance matrix, vectorised over blocks in float32.
Summation order differs from the C loops, so a few blocks may round differently; the round trip
error is what llama.cpp's gets (tests/test_quantize.py checks it per block).

Layouts: a (rows, cols) f32 matrix becomes (rows, cols / block * block_bytes) uint8, each row a run
of blocks, as a GGUF tensor stores it (`ne = [cols, rows]`).
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # elements per K-quant super-block
GROUP_MAX_EPS = np.float32(1e-15)
_CHUNK = 1 << 11  # super-blocks per vectorised pass (temporaries of ~2 MB stay in cache)

# type: (elements per block, bytes per block); the same numbers as gguf.GGML_QUANT_SIZES
BLOCK = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20),
         "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q5_K": (256, 176),
         "Q6_K": (256, 210), "Q8_K": (256, 292)}


def row_bytes(qtype: str, cols: int) -> int:
    n, b = BLOCK[qtype]
    if cols % n:
        raise ValueError(f"{qtype} rows must be a multiple of {n} elements, got {cols}")
    return cols // n * b


def _rint(x: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int: round half to even (the 1.5 * 2**23 trick), as int32."""
    return np.rint(x).astype(np.int32)


def _f16(x: np.ndarray) -> np.ndarray:
    """Round f32 to f16 and back (the scales a block stores)."""
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def _colsum(a: np.ndarray) -> np.ndarray:
    """Sum over the first axis in float32, left to right as a C loop does (numpy's sum is pairwise).
    The quantisers keep groups as columns ((n, G) arrays), so each step of the sum is contiguous."""
    s = a[0].astype(np.float32, copy=True)
    for row in a[1:]:
        s += row
    return s


# ---------------------------------------------------------------------------- K-quant helpers
def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants over groups in columns x (n, G) with weights w: (L uint8 (n, G), scale (G,),
    -min (G,)). Scale and min of `q * scale + min` minimise the weighted squared error over a few
    candidate inverse scales (weighted least squares per candidate, min clamped to <= 0). As in the
    C loop, a better candidate's min shifts the grid of the candidates after it."""
    f32 = np.float32
    mn = np.minimum(x.min(axis=0), f32(0))
    hi = x.max(axis=0)
    sum_w, sum_x = _colsum(w), _colsum(w * x)
    flat = hi == mn
    iscale = f32(nmax) / np.where(flat, f32(1), hi - mn)
    scale = f32(1) / iscale
    L = np.clip(np.rint(iscale * (x - mn)), 0, nmax)
    best = _colsum(w * (scale * L + mn - x) ** 2)
    for step in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / np.where(flat, f32(1), hi - mn)
        la = np.clip(np.rint(iscale * (x - mn)), 0, nmax)
        wl = w * la
        sum_l, sum_l2, sum_xl = _colsum(wl), _colsum(wl * la), _colsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), this_scale)
        this_min = np.where(pos, f32(0), this_min)
        cur = _colsum(w * (this_scale * la + this_min - x) ** 2)
        better = ok & (cur < best) & ~flat
        if better.any():
            L = np.where(better, la, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L = np.where(flat, f32(0), L)
    scale = np.where(flat, f32(0), scale)
    return L.astype(np.uint8), scale.astype(np.float32), (-mn).astype(np.float32)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins (B, 8) -> the 12-byte `scales` field of Q4_K/Q5_K (get_scale_min_k4)."""
    s = np.zeros((ls.shape[0], 12), np.uint8)
    s[:, 0:4] = ls[:, 0:4]
    s[:, 4:8] = lm[:, 0:4]
    s[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    s[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    s[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return s


def unpack_scales_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12-byte `scales` field (B, 12) -> six-bit scales and mins (B, 8), as int32."""
    s = s.astype(np.int32)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def _q45k_levels(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared part of Q4_K / Q5_K: x (B, 256) -> (levels (B, 256) in 0..nmax, d f16 bits, dmin f16 bits, scales (B, 12))."""
    f32 = np.float32
    B = x.shape[0]
    g = np.ascontiguousarray(x.reshape(B * 8, 32).T)  # (32, groups): one group per column
    av = np.sqrt(_colsum(g * g) / f32(32))
    L, scales, mins = _make_qkx2(g, av + np.abs(g), nmax, rmin, 0.1, nstep)
    L = L.T
    scales, mins = scales.reshape(B, 8), mins.reshape(B, 8)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    inv_s = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
    inv_m = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0))
    ls = np.minimum(63, _rint(inv_s[:, None] * scales).astype(np.uint8))
    lm = np.minimum(63, _rint(inv_m[:, None] * mins).astype(np.uint8))
    d16, dmin16 = (max_scale / f32(63)).astype(np.float16), (max_min / f32(63)).astype(np.float16)
    sc, m = ls.astype(np.float32), lm.astype(np.float32)
    d = d16.astype(np.float32)[:, None] * sc  # (B, 8)
    dm = dmin16.astype(np.float32)[:, None] * m
    L = L.reshape(B, 8, 32).astype(np.int32)
    with np.errstate(divide="ignore", invalid="ignore"):
        redo = np.clip(_rint((x.reshape(B, 8, 32) + dm[..., None]) / d[..., None]), 0, nmax)
    L = np.where((d != 0)[..., None], redo, L).reshape(B, 256)
    return L.astype(np.uint8), d16.view(np.uint8).reshape(B, 2), dmin16.view(np.uint8).reshape(B, 2), \
        _pack_scales_k4(ls, lm)


def _q4_k(x: np.ndarray) -> np.ndarray:
    L, d, dmin, scales = _q45k_levels(x, 15, -1.0, 20)
    q = L.reshape(-1, 4, 2, 32)  # chunk c: elements 64c..64c+31 low nibble, 64c+32.. high
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d, dmin, scales, qs], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    L, d, dmin, scales = _q45k_levels(x, 31, -0.5, 15)
    q = L.reshape(-1, 4, 2, 32)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    hb = (L.reshape(-1, 8, 32) >> 4).astype(np.uint8)  # bit k of qh[l] = 5th bit of element 32k + l
    qh = np.zeros((L.shape[0], 32), np.uint8)
    for k in range(8):
        qh |= hb[:, k] << k
    return np.concatenate([d, dmin, scales, qh, qs], axis=1)


def _make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(rmse_type=1, no importance) over groups x (G, n): (levels 0..2*nmax-1 (G, n), scale)."""
    f32 = np.float32
    G = x.shape[0]
    ax = np.abs(x)
    amax = ax.max(axis=1)
    mx = x[np.arange(G), ax.argmax(axis=1)]  # the first element of largest magnitude, with its sign
    zero = amax < GROUP_MAX_EPS
    mxs = np.where(zero, f32(1), mx)
    x = np.ascontiguousarray(x.T)  # (n, G): groups in columns
    w = x * x
    wx = w * x

    def levels(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lf = np.clip(np.rint(iscale * x), -nmax, nmax - 1)
        return lf, _colsum(wx * lf), _colsum(w * lf * lf)

    L, sumlx, suml2 = levels(f32(-nmax) / mxs)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, f32(1)), f32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, sumlx, suml2 = levels(-(f32(nmax) + f32(0.1) * f32(step)) / mxs)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better, lv, L)
        scale = np.where(better, sumlx / np.where(suml2 > 0, suml2, f32(1)), scale)
        best = np.where(better, scale * sumlx, best)
    L = np.where(zero, f32(-nmax), L)  # stored as level + nmax: all zero
    return (L.T + nmax).astype(np.int32), np.where(zero, f32(0), scale).astype(np.float32)


def _q6_k(x: np.ndarray) -> np.ndarray:
    f32 = np.float32
    B = x.shape[0]
    L, scales = _make_qx(x.reshape(B * 16, 16), 32)
    L, scales = L.reshape(B, 16, 16), scales.reshape(B, 16)
    a = np.abs(scales)
    i = a.argmax(axis=1)
    max_scale = scales[np.arange(B), i]
    empty = a.max(axis=1) < GROUP_MAX_EPS
    iscale = f32(-128) / np.where(empty, f32(1), max_scale)
    d16 = np.where(empty, f32(0), f32(1) / iscale).astype(np.float16)
    sc = np.minimum(127, _rint(iscale[:, None] * scales)).astype(np.int8)
    d = d16.astype(np.float32)[:, None] * sc.astype(np.float32)  # (B, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        redo = np.clip(_rint(x.reshape(B, 16, 16) / d[..., None]), -32, 31) + 32
    L = np.where((d != 0)[..., None], redo, L).reshape(B, 2, 4, 32).astype(np.uint8)  # half, quarter, l
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(B, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).reshape(B, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8).reshape(B, 2)], axis=1)
    out[empty] = 0
    return out


_K_QUANTS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """f32 (..., cols) -> the stored bytes of `qtype` (..., row_bytes) as uint8 (floats: their bytes).

    Q4_K, Q5_K, Q6_K: ours (llama.cpp's reference quantisers); F16/BF16 and the legacy block types
    (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): the `gguf` package, which follows the same references.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    *lead, cols = x.shape
    nbytes = row_bytes(qtype, cols)
    if qtype == "F32":
        return x.view(np.uint8).reshape(*lead, nbytes)
    if qtype == "F16":
        return x.astype(np.float16).view(np.uint8).reshape(*lead, nbytes)
    if qtype in _K_QUANTS:
        blocks = x.reshape(-1, QK_K)
        out = np.empty((blocks.shape[0], BLOCK[qtype][1]), np.uint8)
        for s in range(0, blocks.shape[0], _CHUNK):
            out[s:s + _CHUNK] = _K_QUANTS[qtype](blocks[s:s + _CHUNK])
        return out.reshape(*lead, nbytes)
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    return np.asarray(gguf.quants.quantize(x, t), dtype=np.uint8).reshape(*lead, nbytes)


def dequantize(raw: np.ndarray, qtype: str, cols: int) -> np.ndarray:
    """Stored bytes (..., row_bytes) -> f32 (..., cols): gguf's dequantiser (the independent reference)."""
    import gguf

    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if qtype == "F32":
        return raw.view(np.float32).reshape(*raw.shape[:-1], cols).copy()
    out = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    return np.asarray(out, np.float32).reshape(*raw.shape[:-1], cols)


# ---------------------------------------------------------------------------- activations
def q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q8_K_ref: x (..., n) -> d f32 (..., n/256), q int8 (..., n/256, 256),
    bsums int32 (..., n/256, 16). d = max / -127 with max the signed element of largest magnitude
    (so d < 0 when max > 0); q = min(127, round_half_even(-127 / max * x))."""
    x = np.asarray(x, np.float32)
    b = x.reshape(*x.shape[:-1], -1, QK_K)
    ax = np.abs(b)
    mx = np.take_along_axis(b, ax.argmax(axis=-1)[..., None], axis=-1)[..., 0]
    zero = ax.max(axis=-1) == 0
    iscale = np.float32(-127) / np.where(zero, np.float32(1), mx)
    q = np.minimum(127, _rint(iscale[..., None] * b))
    q = np.where(zero[..., None], 0, q).astype(np.int8)
    d = np.where(zero, np.float32(0), np.float32(1) / iscale).astype(np.float32)
    bsums = q.reshape(*q.shape[:-1], 16, 16).astype(np.int32).sum(axis=-1)
    return d, q, bsums


def _q8_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per 32 elements: d = amax / 127 (f32, before its f16 rounding) and q = round_half_even(x * 127 / amax)."""
    x = np.asarray(x, np.float32)
    b = x.reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(b).max(axis=-1)
    d = amax / np.float32(127)
    ids = np.where(amax != 0, np.float32(127) / np.where(amax != 0, amax, np.float32(1)), np.float32(0))
    return d, _rint(b * ids[..., None]).astype(np.int8)


def q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's x86 quantize_row_q8_0: per 32 elements d = amax / 127 stored as f16 (returned as
    its f32 value) and q = round_half_even(x * 127 / amax)."""
    d, q = _q8_blocks(x)
    return _f16(d), q


def q8_1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's x86 quantize_row_q8_1: as q8_0 plus s = f16(d * sum(q)) per block (f32 values)."""
    d, q = _q8_blocks(x)
    s = d * q.astype(np.int32).sum(axis=-1).astype(np.float32)
    return _f16(d), q, _f16(s)
