"""A NumPy model of what the compiled kernels compute: llama.cpp's CPU arithmetic, in float64.

For every weight type the kernel quantises the activations as llama.cpp does (F16 -> x rounded to
f16, BF16 -> bf16, the 32-element block types -> Q8_0 / Q8_1 with an f16 `d`, the K-quants -> Q8_K),
takes exact integer dot products per block (or sub-block), and scales them in float. This module
does the same with exact integers and float64 scaling, so a kernel must equal it up to the order
of its f32 additions; tests/test_kernels.py checks that, and `unpack` against gguf's dequantiser.
"""

from __future__ import annotations

import numpy as np

from ..quantize import BLOCK, q8_0, q8_1, q8_k, unpack_scales_k4

TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12,
            "Q5_K": 13, "Q6_K": 14, "BF16": 30}
TYPE_NAMES = {v: k for k, v in TYPE_IDS.items()}


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian f16 bytes (..., 2) -> float64."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float64)


def _bf16_round(x: np.ndarray) -> np.ndarray:
    """f32 -> nearest-even bf16 (as f32 values), as vcvtneps2bf16 and ggml's GGML_FP32_TO_BF16."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return (u.astype(np.uint32) << 16).view(np.float32)


def unpack(raw: np.ndarray, qtype: str) -> dict[str, np.ndarray]:
    """Blocks of one type (..., n_blocks * block_bytes) -> their integer levels and float64 scales.

    Keys: "q" (..., nb, block) integer levels as stored (offsets not removed), and per type
    "d", "dmin" / "m" (per block), "sc", "mn" (per sub-block). `dequant` turns them into values."""
    nel, nbytes = BLOCK[qtype]
    raw = np.ascontiguousarray(raw, np.uint8)
    b = raw.reshape(*raw.shape[:-1], -1, nbytes)
    if qtype in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        d = _f16(b[..., 0:2])
        o = 4 if qtype in ("Q4_1", "Q5_1") else 2
        m = _f16(b[..., 2:4]) if o == 4 else None
        if qtype == "Q8_0":
            return {"q": b[..., 2:34].view(np.int8).astype(np.int64), "d": d}
        qh = None
        if qtype in ("Q5_0", "Q5_1"):
            qh = b[..., o:o + 4].copy().view(np.uint32)[..., 0].astype(np.int64)
            o += 4
        qs = b[..., o:o + 16].astype(np.int64)
        q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)
        if qh is not None:
            q |= ((qh[..., None] >> np.arange(32)) & 1) << 4
        out = {"q": q, "d": d}
        if m is not None:
            out["m"] = m
        return out
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        lead = b.shape[:-1]
        sc, mn = unpack_scales_k4(b[..., 4:16].reshape(-1, 12))
        sc, mn = sc.reshape(*lead, 8), mn.reshape(*lead, 8)
        o = 16
        hi = None
        if qtype == "Q5_K":
            qh = b[..., 16:48].astype(np.int64)  # bit k of qh[l] -> element 32k + l
            hi = ((qh[..., None, :] >> np.arange(8)[:, None]) & 1).reshape(*lead, 256)
            o = 48
        qs = b[..., o:o + 128].astype(np.int64).reshape(*lead, 4, 32)
        q = np.stack([qs & 0xF, qs >> 4], axis=-2).reshape(*lead, 256)
        if hi is not None:
            q |= hi << 4
        return {"q": q, "d": d, "dmin": dmin, "sc": sc.astype(np.int64), "mn": mn.astype(np.int64)}
    if qtype == "Q6_K":
        lead = b.shape[:-1]
        ql = b[..., 0:128].astype(np.int64).reshape(*lead, 2, 2, 32)  # half, ql[l] / ql[l+32], l
        qh = b[..., 128:192].astype(np.int64).reshape(*lead, 2, 32)
        lo = np.stack([ql[..., 0, :] & 0xF, ql[..., 1, :] & 0xF, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], axis=-2)
        hi = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-2)
        q = (lo | (hi << 4)).reshape(*lead, 256)
        sc = b[..., 192:208].view(np.int8).astype(np.int64)
        return {"q": q, "d": _f16(b[..., 208:210]), "sc": sc}
    raise ValueError(f"no block unpacker for {qtype}")


def dequant(raw: np.ndarray, qtype: str, cols: int) -> np.ndarray:
    """float64 values of stored rows (..., row_bytes) -> (..., cols), from `unpack`."""
    raw = np.ascontiguousarray(raw, np.uint8)
    lead = raw.shape[:-1]
    if qtype == "F32":
        return raw.view(np.float32).astype(np.float64).reshape(*lead, cols)
    if qtype == "F16":
        return raw.view(np.float16).astype(np.float64).reshape(*lead, cols)
    if qtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64).reshape(*lead, cols)
    u = unpack(raw, qtype)
    q, d = u["q"].astype(np.float64), u["d"][..., None]
    if qtype == "Q8_0":
        v = d * q
    elif qtype in ("Q4_0", "Q5_0"):
        v = d * (q - (8 if qtype == "Q4_0" else 16))
    elif qtype in ("Q4_1", "Q5_1"):
        v = d * q + u["m"][..., None]
    elif qtype in ("Q4_K", "Q5_K"):
        g = q.reshape(*q.shape[:-1], 8, 32)
        v = (u["d"][..., None, None] * u["sc"][..., None] * g - u["dmin"][..., None, None] * u["mn"][..., None])
    else:  # Q6_K
        g = (q - 32).reshape(*q.shape[:-1], 16, 16)
        v = u["d"][..., None, None] * u["sc"][..., None] * g
    return v.reshape(*lead, cols)


def matmul(raw: np.ndarray, qtype: str, x: np.ndarray) -> np.ndarray:
    """y (B, rows) = W x as the kernels compute it: raw (rows, row_bytes) stored weights, x (B, cols)
    f32. Activations quantised as llama.cpp quantises them, integer dots, float64 scaling."""
    x = np.asarray(x, np.float32)
    cols = x.shape[-1]
    if qtype == "F32":
        return x.astype(np.float64) @ dequant(raw, qtype, cols).T
    if qtype == "F16":
        return x.astype(np.float16).astype(np.float64) @ dequant(raw, qtype, cols).T
    if qtype == "BF16":
        return _bf16_round(x).astype(np.float64) @ dequant(raw, qtype, cols).T
    u = unpack(raw, qtype)  # q (rows, nb, n)
    q = u["q"]
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        dx, qx, bsums = q8_k(x)  # (B, nb), (B, nb, 256), (B, nb, 16)
        dx = dx.astype(np.float64)
        if qtype == "Q6_K":
            g = (q - 32).reshape(*q.shape[:-1], 16, 16)  # rows, nb, 16 groups, 16
            xg = qx.astype(np.int64).reshape(*qx.shape[:-1], 16, 16)
            dots = np.einsum("rbgl,tbgl->trbg", g, xg)  # exact int64
            s = (dots * u["sc"][None]).sum(axis=-1)  # (t, r, nb)
            return np.einsum("trb,rb,tb->tr", s.astype(np.float64), u["d"], dx)
        g = q.reshape(*q.shape[:-1], 8, 32)
        xg = qx.astype(np.int64).reshape(*qx.shape[:-1], 8, 32)
        dots = np.einsum("rbjl,tbjl->trbj", g, xg)
        main = (dots * u["sc"][None]).sum(axis=-1).astype(np.float64)  # (t, r, nb)
        b32 = bsums.reshape(*bsums.shape[:-1], 8, 2).sum(axis=-1).astype(np.int64)  # (t, nb, 8)
        mins = np.einsum("rbj,tbj->trb", u["mn"], b32).astype(np.float64)
        return np.einsum("trb,tb->tr", main * u["d"][None] - mins * u["dmin"][None], dx)
    # 32-element blocks: Q8_0 activations (Q8_1 for the types with a min)
    if qtype in ("Q4_1", "Q5_1"):
        dx, qx, sx = q8_1(x)
    else:
        dx, qx = q8_0(x)
    off = {"Q8_0": 0, "Q4_0": 8, "Q5_0": 16, "Q4_1": 0, "Q5_1": 0}[qtype]
    dots = np.einsum("rbl,tbl->trb", q - off, qx.astype(np.int64)).astype(np.float64)
    y = np.einsum("trb,rb,tb->tr", dots, u["d"], dx.astype(np.float64))
    if qtype in ("Q4_1", "Q5_1"):
        y += np.einsum("rb,tb->tr", u["m"], sx.astype(np.float64))
    return y


def error_bound(raw: np.ndarray, qtype: str, x: np.ndarray) -> np.ndarray:
    """Per (token, row) bound on |matmul - dequant(W) @ x| from rounding the activations: half a
    quantisation step of each activation block times the block's sum of |w| (plus f32 accumulation)."""
    x = np.asarray(x, np.float32)
    cols = x.shape[-1]
    W = np.abs(dequant(raw, qtype, cols))  # (rows, cols)
    if qtype == "F32":
        step = np.zeros_like(x, dtype=np.float64)
    elif qtype == "F16":
        step = np.abs(x.astype(np.float64) - x.astype(np.float16).astype(np.float64))
    elif qtype == "BF16":
        step = np.abs(x.astype(np.float64) - _bf16_round(x).astype(np.float64))
    elif qtype in ("Q4_K", "Q5_K", "Q6_K"):
        dx, qx, _ = q8_k(x)
        step = np.abs(x.astype(np.float64) - np.repeat(dx.astype(np.float64), 256, axis=-1)
                      * qx.reshape(x.shape).astype(np.float64))
    else:
        dx, qx = q8_0(x)
        step = np.abs(x.astype(np.float64) - np.repeat(dx.astype(np.float64), 32, axis=-1)
                      * qx.reshape(x.shape).astype(np.float64))
    mag = np.abs(x.astype(np.float64)) @ W.T
    return step @ W.T + 1e-5 * mag + 1e-30
