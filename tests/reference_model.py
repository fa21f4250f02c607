"""A float64 NumPy forward pass of a checkpoint (Llama / Qwen2 blocks), for tests: logits of a
prompt from the dequantised weights, with the activations either kept in float64 ("float") or
quantised before every product exactly as llama.cpp and our kernels do ("llama": Q8_K / Q8_0 /
f16 / bf16 rounding, runtime.kernels.reference.matmul)."""

from __future__ import annotations

import numpy as np

from primasim.runtime import Checkpoint
from primasim.runtime.kernels import reference as R
from primasim.runtime.model import rope_inv_freq


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def forward(ckpt: Checkpoint, ids: list[int], act: str = "float") -> np.ndarray:
    """Logits (T, V) of a prompt, float64."""
    spec = ckpt.spec
    cache: dict[str, np.ndarray] = {}

    def raw(name: str) -> tuple[np.ndarray, str, int]:
        t = ckpt.infos[name]
        return ckpt.raw(name).reshape(t.shape[0], -1), t.dtype, t.shape[1]

    def W(name: str) -> np.ndarray:
        if name not in cache:
            r, qtype, cols = raw(name)
            cache[name] = R.dequant(r, qtype, cols)
        return cache[name]

    def mm(x: np.ndarray, name: str) -> np.ndarray:
        if act == "float":
            return x @ W(name).T
        r, qtype, _ = raw(name)
        return R.matmul(r, qtype, x.astype(np.float32))

    vec = lambda n: ckpt.tensor(n).astype(np.float64)  # noqa: E731
    T, D, H, Hkv = len(ids), spec.head_dim, spec.n_heads, spec.n_kv_heads
    x = W("token_embd.weight")[np.asarray(ids)]
    if "rope_freqs.weight" in ckpt:
        inv = (1.0 / spec.rope_theta ** (np.arange(0, D, 2, dtype=np.float32) / np.float32(D))) / ckpt.tensor("rope_freqs.weight")
    else:
        inv = rope_inv_freq(spec)
    ang = np.arange(T)[:, None] * inv.astype(np.float64)[None]  # (T, D/2)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rope(a: np.ndarray) -> np.ndarray:  # (T, heads, D), rotate-half
        a1, a2 = a[..., :D // 2], a[..., D // 2:]
        return np.concatenate([a1 * cos - a2 * sin, a2 * cos + a1 * sin], axis=-1)

    for i in range(spec.n_layers):
        p = f"blk.{i}."
        h = _rms(x, vec(p + "attn_norm.weight"), spec.norm_eps)
        q, k, v = (mm(h, p + f"attn_{n}.weight") for n in "qkv")
        if spec.qkv_bias:
            q, k, v = q + vec(p + "attn_q.bias"), k + vec(p + "attn_k.bias"), v + vec(p + "attn_v.bias")
        q, k, v = q.reshape(T, H, D), k.reshape(T, Hkv, D), v.reshape(T, Hkv, D)
        if ckpt.qk_interleaved:  # llama.cpp's row order (pairs) -> rotate-half order
            q, k = (a.reshape(T, -1, D // 2, 2).swapaxes(-1, -2).reshape(a.shape) for a in (q, k))
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
        s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", pr, v).reshape(T, H * D)
        x = x + mm(o, p + "attn_output.weight")
        h = _rms(x, vec(p + "ffn_norm.weight"), spec.norm_eps)
        g, u = mm(h, p + "ffn_gate.weight"), mm(h, p + "ffn_up.weight")
        x = x + mm(g / (1 + np.exp(-g)) * u, p + "ffn_down.weight")
    out = "token_embd.weight" if spec.tie_embeddings else "output.weight"
    return mm(_rms(x, vec("output_norm.weight"), spec.norm_eps), out)
