"""The transformer: Llama 3 and Qwen2 blocks in JAX, computed straight from memory-mapped weights.

gpt-fast style: plain functions over a `ModelSpec` and a pytree of weights. f32 activations.
- Weight matrices are never arrays of their own: `Params.files` holds each checkpoint file as one
  zero-copy uint8 jax.Array over its read-only mapping, and every matrix is a `QWeight` (offsets
  and ggml types, a runtime array) computed by the compiled kernels (runtime/kernels) in whatever
  format the file stores: F32, F16, BF16, Q8_0, Q4_0/Q4_1, Q5_0/Q5_1, Q4_K, Q5_K, Q6_K. q/k/v and
  gate/up are one kernel call each (activations quantised once). The weights stay page cache.
- `run_layers` runs one window of blocks as one jitted call; jax caches the compiled function by
  the window's shapes (and the attention span bucket), so every window of the same size, batch
  and span reuses it, whatever the tensor types of its layers.
- The KV cache is either contiguous (`init_kv`, one (n_layers, B, H_kv, S + 1, D) array pair for
  all layers) or the paged pool of runtime/_kvcache.py; both are "stores" with `caches(layers)`,
  `tables` and `replace(layers, caches)`, and their arrays are donated to the jitted step (updated
  in place). The single-device step gets its weights packed too (`_Packed`): few operands per call.
  Attention reads only the first `span` positions (power-of-two buckets, `attention_span`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from primasim.core.errors import CheckpointError, WorkerError
from primasim.core.model import ModelSpec
from primasim.core.runtime_facts import attention_span

from . import kernels as K
from ._kvcache import init_kv
from .checkpoint import Checkpoint
from .kernels import TYPE_NAMES, QWeight
from .quantize import BLOCK
from .rope import rope_inv_freq

# One block's weights: "attn_norm.weight", "ffn_norm.weight" (and Qwen2's "attn_{q,k,v}.bias") as
# small f32 arrays; the matrices as QWeights: "attn_qkv" (q, k, v), "attn_output", "ffn_gate_up"
# (gate, up), "ffn_down".
Layer = dict[str, Any]
LayerKV = tuple[jax.Array, jax.Array]  # (k, v)
Files = tuple[jax.Array, ...]


@partial(jax.tree_util.register_dataclass, data_fields=["files", "inv_freq", "layers", "embed", "norm", "output"],
         meta_fields=["spec", "qk_interleaved"])
@dataclass(frozen=True)
class Params:
    """Weights of some blocks (+ embedding and/or head): the mapped files and where in them."""

    spec: ModelSpec
    qk_interleaved: bool  # GGUF Llama: Q/K rows in llama.cpp's order, undone on the activations
    files: Files  # each checkpoint file as one zero-copy uint8 array (QWeight file index -> file)
    inv_freq: jax.Array  # RoPE inverse frequencies (D/2,), rope scaling applied
    layers: dict[int, Layer]
    embed: QWeight | None = None  # token_embd (V, E)
    norm: jax.Array | None = None  # output_norm (E,)
    output: QWeight | None = None  # output (V, E); the embedding itself when tied

    @functools.cached_property
    def packed(self) -> dict[tuple[int, ...], _Packed]:  # layers -> their operands packed (`_pack`)
        return {}


GROUPS = {"attn_qkv": ("attn_q", "attn_k", "attn_v"), "attn_output": ("attn_output",),
          "ffn_gate_up": ("ffn_gate", "ffn_up"), "ffn_down": ("ffn_down",)}  # matrices computed together


def load_params(ckpt: Checkpoint, layers: Sequence[int], *, embed: bool, head: bool) -> Params:
    """Weights of `layers` (+ the embedding / head). Reads no weight page: the files are mapped,
    the matrices are descriptors into them (the kernels read them when the model runs); only 1-D
    tensors (norms, biases) become small f32 arrays (views when f32 and 64-byte aligned)."""
    spec = ckpt.spec
    bad = [i for i in layers if not 0 <= i < spec.n_layers]
    if bad:
        raise CheckpointError(f"layers {bad} do not exist", where=str(ckpt.path),
                              fix=f"the model has blocks 0..{spec.n_layers - 1}")
    index = {f: i for i, f in enumerate(ckpt.files)}

    def matrix(names: Sequence[str]) -> QWeight:
        infos = [ckpt.infos[n] for n in names]
        return K.qweight([(t.offset, index[t.file], t.dtype, t.shape[0], t.shape[1]) for t in infos])

    def small(name: str) -> jax.Array:
        return jax.device_put(ckpt.tensor(name))

    def layer(i: int) -> Layer:
        w: Layer = {n.split(".", 2)[2]: small(n) for n in ckpt.layer_names(i) if len(ckpt.infos[n].shape) == 1}
        for key, parts in GROUPS.items():
            w[key] = matrix([f"blk.{i}.{p}.weight" for p in parts])
        return w

    files = tuple(K.file_array(ckpt.mapped(f)) for f in ckpt.files)
    ws = {i: layer(i) for i in layers}
    if "rope_freqs.weight" in ckpt:  # GGUF Llama 3: the converter's frequency factors
        base = 1.0 / spec.rope_theta ** (np.arange(0, spec.head_dim, 2, dtype=np.float32) / np.float32(spec.head_dim))
        inv = base / ckpt.tensor("rope_freqs.weight")
    else:
        inv = rope_inv_freq(spec)
    emb = matrix(["token_embd.weight"]) if embed or (head and spec.tie_embeddings) else None
    out = (emb if spec.tie_embeddings else matrix(["output.weight"])) if head else None
    return Params(spec, ckpt.qk_interleaved, files, jnp.asarray(inv, jnp.float32), ws,
                  emb if embed else None, small("output_norm.weight") if head else None, out)


def _qweights(params: Params) -> list[QWeight]:
    out = [w for layer in params.layers.values() for w in layer.values() if isinstance(w, QWeight)]
    return out + [w for w in (params.embed, params.output) if w is not None]


def pin_params(params: Params) -> Params:
    """The same weights copied into anonymous memory (exo-style pinned weights: nothing is re-read
    from the file under memory pressure): the byte ranges the matrices use, packed into one new
    buffer (64-byte aligned tensors), with the descriptors rewritten. A tied embedding stays shared."""
    tables = {id(w): np.asarray(w.desc).copy() for w in _qweights(params)}
    spans: dict[tuple[int, int], int] = {}  # (file, offset) -> bytes
    for d in tables.values():
        for off_lo, off_hi, t, fi, rows, cols in d.astype(np.int64):
            qtype = K.TYPE_NAMES[int(t)]
            spans[(int(fi), int(off_lo) | int(off_hi) << 32)] = int(rows) * K.row_bytes(qtype, int(cols))
    where, size = {}, 0
    for key, n in sorted(spans.items()):
        where[key] = size
        size += -(-n // 64) * 64
    buf = np.empty(size + 64, np.uint8)
    buf = buf[-buf.ctypes.data % 64:][:max(size, 1)]
    hosts = [np.asarray(f) for f in params.files]  # views of the mappings (no copy)
    for (fi, off), n in spans.items():
        buf[where[(fi, off)]:where[(fi, off)] + n] = hosts[fi][off:off + n]
    new: dict[int, QWeight] = {}

    def pin(w: QWeight) -> QWeight:
        if id(w) not in new:
            d = tables[id(w)]
            for r in d:
                o = where[(int(r[3]), int(r[0]) | int(r[1]) << 32)]
                r[0], r[1], r[3] = o & 0xFFFFFFFF, o >> 32, 0
            new[id(w)] = QWeight(jnp.asarray(d), w.rows, w.cols)
        return new[id(w)]

    def copy(a: Any) -> Any:
        return pin(a) if isinstance(a, QWeight) else jnp.array(a, copy=True)

    layers = {i: {k: copy(v) for k, v in layer.items()} for i, layer in params.layers.items()}
    emb = pin(params.embed) if params.embed is not None else None
    out = pin(params.output) if params.output is not None else None
    norm = jnp.array(params.norm, copy=True) if params.norm is not None else None
    return Params(params.spec, params.qk_interleaved, (jax.device_put(buf),), params.inv_freq, layers, emb, norm, out)


# ---------------------------------------------------------------------------- the block
def _mm(files: Files, x: jax.Array, w: QWeight) -> tuple[jax.Array, ...]:
    """x (..., in) times each matrix of w (out_i, in): the kernels, straight from the mapped files."""
    return K.matmul(files, x, w)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (transformers' layout): x (B, T, H, D); cos/sin (B, T, 1, D/2)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _kv_write(kc: jax.Array, vc: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array,
              tables: jax.Array | None, span: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Store the new k/v (B, T, H_kv, D) at positions pos..pos+T-1 (in place: the caches are
    donated); return the caches and the keys/values (B, H_kv, span, D) of positions 0..span-1."""
    B, T = k.shape[:2]
    p = pos[:, None] + jnp.arange(T)  # (B, T)
    if tables is None:  # contiguous (B, H_kv, S + 1, D): span <= S, so the read below is a real
        # slice; reading the whole updated buffer makes XLA copy the cache several times (measured)
        row = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
        kc, vc = kc.at[row, :, p].set(k), vc.at[row, :, p].set(v)
        return kc, vc, kc[:, :, :span], vc[:, :, :span]
    bs = kc.shape[2]  # paged: pool (n_blocks, H_kv, block, D); tables (B, max_blocks)
    blk, off = jnp.take_along_axis(tables, p // bs, axis=1), p % bs
    kc, vc = kc.at[blk, :, off].set(k), vc.at[blk, :, off].set(v)
    gather = lambda c: c[tables[:, :span // bs]].transpose(0, 2, 1, 3, 4).reshape(B, c.shape[1], span, c.shape[3])  # noqa: E731
    return kc, vc, gather(kc), gather(vc)


def attention(q: jax.Array, keys: jax.Array, values: jax.Array, pos: jax.Array) -> jax.Array:
    """Causal grouped-query attention: q (B, T, H, D) at positions pos+t over keys/values
    (B, H_kv, S, D) of positions 0..S-1. Heads first: XLA:CPU runs these batched matmuls several
    times faster than with positions first (experiments/results/runtime_decode_bench.md)."""
    B, T, H, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    g = H // Hkv
    q = q.reshape(B, T, Hkv, g, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, T * g, D)
    scores = jnp.einsum("bkmd,bksd->bkms", q, keys).reshape(B, Hkv, T, g, S) / math.sqrt(D)
    visible = jnp.arange(S) <= (pos[:, None] + jnp.arange(T))[:, :, None]  # (B, T, S)
    scores = jnp.where(visible[:, None, :, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).reshape(B, Hkv, T * g, S)
    out = jnp.einsum("bkms,bksd->bkmd", probs, values).reshape(B, Hkv, T, g, D)
    return out.transpose(0, 2, 1, 3, 4).reshape(B, T, H * D)


def _norm(w: Layer, name: str) -> dict[str, Any]:
    """A norm weight as `K.matmul` keywords: an array (E,), or (table, row) in a packed step."""
    v = w[name]
    return {"norm": v[0], "norm_row": v[1]} if isinstance(v, tuple) else {"norm": v}


def block(spec: ModelSpec, interleaved: bool, files: Files, w: Layer, kv: LayerKV, x: jax.Array,
          pos: jax.Array, inv_freq: jax.Array, tables: jax.Array | None, span: int, layer: int = 0,
          kv_rows: jax.Array | None = None) -> tuple[jax.Array, LayerKV]:
    """One transformer block: x + attn(norm(x)), then + SwiGLU(norm(x)). `kv`: this layer's caches,
    or (contiguous) a stack of layers' (n, B, H_kv, S + 1, D) of which this is row kv_rows[layer]."""
    q, k, v = K.matmul(files, x, w["attn_qkv"], **_norm(w, "attn_norm.weight"), eps=spec.norm_eps)
    if spec.qkv_bias:
        q, k, v = q + w["attn_q.bias"], k + w["attn_k.bias"], v + w["attn_v.bias"]
    if tables is None:  # contiguous cache: RoPE, the KV write and attention in one kernel call
        att, kc, vc = K.attend(q, k, v, pos, inv_freq, *kv, span=span, interleaved=interleaved, layer=layer,
                               kv_rows=kv_rows)
    else:
        att, kc, vc = _attention_xla(spec, interleaved, kv, q, k, v, pos, inv_freq, tables, span)
    # the norms, SwiGLU and residual adds run inside the kernel calls (no XLA op each)
    x = K.matmul(files, att, w["attn_output"], residual=x)[0]
    gate, up = K.matmul(files, x, w["ffn_gate_up"], **_norm(w, "ffn_norm.weight"), eps=spec.norm_eps)
    x = K.matmul(files, gate, w["ffn_down"], up=up, residual=x)[0]
    return x, (kc, vc)


def _attention_xla(spec: ModelSpec, interleaved: bool, kv: LayerKV, q: jax.Array, k: jax.Array, v: jax.Array,
                   pos: jax.Array, inv_freq: jax.Array, tables: jax.Array | None,
                   span: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`K.attend` in JAX ops (the paged KV pool): q (B, T, H*D), k/v (B, T, H_kv*D) before RoPE ->
    the attention output (B, T, H*D) and the updated caches."""
    B, T = q.shape[:2]
    q = q.reshape(B, T, spec.n_heads, spec.head_dim)
    k = k.reshape(B, T, spec.n_kv_heads, spec.head_dim)
    v = v.reshape(B, T, spec.n_kv_heads, spec.head_dim)
    if interleaved:  # llama.cpp's row order (pairs) -> rotate-half order
        q, k = (a.reshape(*a.shape[:-1], -1, 2).swapaxes(-1, -2).reshape(a.shape) for a in (q, k))
    angles = (pos[:, None] + jnp.arange(T))[:, :, None, None].astype(jnp.float32) * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    kc, vc, keys, values = _kv_write(*kv, k, v, pos, tables, span)
    return attention(q, keys, values, pos), kc, vc


def _blocks(files: Files, ws: tuple[Layer, ...], kvs: Any, x: jax.Array, pos: jax.Array,
            inv_freq: jax.Array, tables: jax.Array | None, spec: ModelSpec, interleaved: bool,
            span: int, kv_rows: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """The blocks `ws` in order. `kvs`: the contiguous store's stacked (k, v), the window's layers
    at rows kv_rows of them (`KVCache.caches`), or per layer (k, v) of the paged pool (`tables`)."""
    if tables is None:
        for i, w in enumerate(ws):
            x, kvs = block(spec, interleaved, files, w, kvs, x, pos, inv_freq, None, span, i, kv_rows)
        return x, kvs
    out = []
    for w, kv in zip(ws, kvs):
        x, kv = block(spec, interleaved, files, w, kv, x, pos, inv_freq, tables, span)
        out.append(kv)
    return x, tuple(out)


_window = jax.jit(_blocks, static_argnames=("spec", "interleaved", "span"), donate_argnums=(2,))


# (first descriptor row, rows, cols) of one QWeight in a packed table; per layer (group name, that)
_Where = tuple[int, tuple[int, ...], int]
_Layout = tuple[tuple[tuple[tuple[str, _Where], ...], ...], _Where]


@dataclass(frozen=True)
class _Packed:
    """The operands of `forward` for some layers in a few arrays: every matrix's descriptors in one
    table, the norm weights in another (attn, ffn per layer, then the output norm), the other 1-D
    tensors (Qwen2's biases) per layer. A jitted call costs the host time per operand (pytree
    flattening, buffer checks: ~0.2 ms for the 96 of a 16-block step when run between tokens,
    docs/runtime.md); `layout` (static) says where each layer's matrices are."""

    table: jax.Array
    norms: jax.Array
    extras: tuple[dict[str, jax.Array], ...]
    layout: _Layout


def _pack(params: Params, layers: tuple[int, ...]) -> _Packed:
    """`_Packed` for `layers` (+ the head), memoised on the Params (built once per weights object)."""
    got = params.packed.get(layers)
    if got is not None:
        return got
    assert params.output is not None and params.norm is not None
    descs, norms, extras, lay = [], [], [], []
    row = 0

    def where(w: QWeight) -> _Where:
        nonlocal row
        descs.append(np.asarray(w.desc)[w.first:w.first + len(w.rows)])
        row += len(w.rows)
        return (row - len(w.rows), w.rows, w.cols)

    for i in layers:
        w = params.layers[i]
        lay.append(tuple((k, where(w[k])) for k in GROUPS))
        norms += [np.asarray(w["attn_norm.weight"]), np.asarray(w["ffn_norm.weight"])]
        extras.append({k: v for k, v in w.items() if k not in GROUPS and not k.endswith("_norm.weight")})
    out = where(params.output)
    norms.append(np.asarray(params.norm))
    got = _Packed(jnp.asarray(np.concatenate(descs)), jnp.asarray(np.stack(norms).astype(np.float32)),
                  tuple(extras), (tuple(lay), out))
    params.packed[layers] = got
    return got


@partial(jax.jit, static_argnames=("spec", "interleaved", "span", "layout"), donate_argnums=(4,))
def _forward(files: Files, table: jax.Array, norms: jax.Array, extras: tuple[dict[str, jax.Array], ...],
             kvs: LayerKV, kv_rows: jax.Array, ids: jax.Array, pos: jax.Array, inv_freq: jax.Array, emb: QWeight, *,
             spec: ModelSpec, interleaved: bool, span: int, layout: _Layout) -> tuple[jax.Array, jax.Array, LayerKV]:
    """Embedding, every block and the head in one call (single-device decode): the last
    position's logits (B, V) and their argmax (B,). Saves the dispatches and syncs between calls
    (a few % per token); greedy decoding copies only the token ids to the host. The weights come
    packed (`_Packed`): every kernel call gets the same descriptor and norm tables."""
    ws = []
    for i, (groups, extra) in enumerate(zip(layout[0], extras)):
        w: Layer = {k: QWeight(table, rows, cols, first) for k, (first, rows, cols) in groups}
        w["attn_norm.weight"], w["ffn_norm.weight"] = (norms, 2 * i), (norms, 2 * i + 1)
        ws.append({**w, **extra})
    x, kvs = _blocks(files, tuple(ws), kvs, K.embed(files, emb, ids), pos, inv_freq, None, spec, interleaved, span,
                     kv_rows)
    first, rows, cols = layout[1]
    lg = K.matmul(files, x[:, -1], QWeight(table, rows, cols, first), norm=norms, norm_row=2 * len(ws),
                  eps=spec.norm_eps)[0]
    return lg, jnp.argmax(lg, axis=-1).astype(jnp.int32), kvs


# ---------------------------------------------------------------------------- KV stores
class KVStore(Protocol):
    """What `run_layers` needs from a KV cache: the caches of a window's layers (`caches`: the
    contiguous store's stacked arrays and the window's first row, or the paged pool's per-layer
    arrays and None), block tables (paged) or None (contiguous), the capacity per sequence, the
    granularity of positions (block size; 1 when contiguous), and a way to put the updated arrays back."""

    tables: jax.Array | None
    max_seq: int
    block_size: int

    def caches(self, layers: Sequence[int]) -> tuple[Any, np.ndarray | None]: ...

    def replace(self, layers: Sequence[int], caches: Any) -> KVStore: ...


# ---------------------------------------------------------------------------- the API
def _check_layers(params: Params, layers: Sequence[int], where: str) -> None:
    if missing := [i for i in layers if i not in params.layers]:
        raise WorkerError(f"no weights for layers {missing}", where=where, fix="load_params with every layer of the window")


def run_layers(params: Params, kv: KVStore, x: jax.Array | np.ndarray, pos: int | Sequence[int] | np.ndarray,
               layers: Sequence[int], *, compile_only: bool = False) -> tuple[jax.Array, KVStore]:
    """Run one window of blocks on hidden states x (B, T, E) whose first token is at position `pos`
    (an int, or one per sequence). Returns the new hidden states and the updated KV store.
    `compile_only`: compile this call's shapes without running it (no weight page is read; the KV
    store may be `init_kv(..., abstract=True)`); returns x and kv unchanged."""
    layers = tuple(layers)
    x = jnp.asarray(x, jnp.float32)
    B, T = x.shape[0], x.shape[1]
    p = np.broadcast_to(np.asarray(pos, dtype=np.int32), (B,))
    if int(p.min()) < 0 or int(p.max()) + T > kv.max_seq:
        raise WorkerError(f"positions {int(p.min())}..{int(p.max()) + T - 1} exceed the KV cache ({kv.max_seq})",
                          where="run_layers", fix="allocate the cache with a larger max_seq")
    _check_layers(params, layers, "run_layers")
    caches, kv_rows = kv.caches(layers)
    args = (params.files, tuple(params.layers[i] for i in layers), caches, x, np.ascontiguousarray(p),
            params.inv_freq, kv.tables)
    kw = {"spec": params.spec, "interleaved": params.qk_interleaved,
          "span": attention_span(int(p.max()) + T, kv.max_seq, kv.block_size), "kv_rows": kv_rows}
    if compile_only:
        _window.lower(*args, **kw).compile()  # jit's cache keeps it: the first real call does not compile
        return x, kv
    x, caches = _window(*args, **kw)
    return x, kv.replace(layers, caches)


def forward(params: Params, kv: KVStore, ids: Any, pos: int, layers: Sequence[int] | None = None, *,
            compile_only: bool = False) -> tuple[jax.Array | None, jax.Array | None, KVStore]:
    """Embedding, the blocks `layers` (default: every block of `params`, in order) and the head in
    one jitted call, for token ids (B, T) at position `pos`: the last position's logits (B, V),
    their argmax (B,) and the updated KV store (contiguous). One dispatch per token instead of
    three (embed, blocks, head), and only the argmax crosses to the host when decoding greedily.
    `compile_only` as in `run_layers` (returns None, None, kv)."""
    if params.embed is None or params.output is None or params.norm is None:
        raise WorkerError("forward needs the embedding and the output layer", where="forward",
                          fix="load_params(..., embed=True, head=True)")
    layers = tuple(sorted(params.layers)) if layers is None else tuple(layers)
    ids = np.asarray(ids, dtype=np.int32)
    if ids.size and (ids.min() < 0 or ids.max() >= params.spec.vocab):
        raise WorkerError(f"token id out of range 0..{params.spec.vocab - 1}", where="forward",
                          fix="use ids from the model's tokenizer")
    B, T = ids.shape
    if pos < 0 or pos + T > kv.max_seq:
        raise WorkerError(f"positions {pos}..{pos + T - 1} exceed the KV cache ({kv.max_seq})", where="forward",
                          fix="allocate the cache with a larger max_seq")
    # host arrays go to the jitted call as they are (jnp.full / jnp.asarray would each dispatch an
    # XLA op of their own: ~0.5 ms of the host's CPU per decode token, measured)
    _check_layers(params, layers, "forward")
    pk = _pack(params, layers)
    caches, kv_rows = kv.caches(layers)
    if kv_rows is None:
        raise WorkerError("forward needs a contiguous KV cache", where="forward", fix="use init_kv, or run_layers")
    args = (params.files, pk.table, pk.norms, pk.extras, caches, kv_rows, ids, np.full((B,), pos, np.int32),
            params.inv_freq, params.embed)
    kw = {"spec": params.spec, "interleaved": params.qk_interleaved, "span": attention_span(pos + T, kv.max_seq),
          "layout": pk.layout}
    if compile_only:
        _forward.lower(*args, **kw).compile()
        return None, None, kv
    lg, tok, caches = _forward(*args, **kw)
    return lg, tok, kv.replace(layers, caches)


@jax.jit
def _embed(files: Files, table: QWeight, ids: jax.Array) -> jax.Array:
    return K.embed(files, table, ids)


def embed(params: Params, ids: Any, *, compile_only: bool = False) -> jax.Array:
    """Token ids (B, T) -> hidden states (B, T, E) (`compile_only`: compile, return zeros)."""
    if params.embed is None:
        raise WorkerError("these params have no embedding", where="embed", fix="load_params(..., embed=True)")
    ids = np.asarray(ids, dtype=np.int32)
    if ids.size and (ids.min() < 0 or ids.max() >= params.spec.vocab):
        raise WorkerError(f"token id out of range 0..{params.spec.vocab - 1}", where="embed",
                          fix="use ids from the model's tokenizer")
    if compile_only:
        _embed.lower(params.files, params.embed, ids).compile()
        return jnp.zeros((*ids.shape, params.spec.hidden), jnp.float32)
    return _embed(params.files, params.embed, ids)


@partial(jax.jit, static_argnames=("eps",))
def _head(files: Files, norm: jax.Array, out: QWeight, x: jax.Array, *, eps: float) -> tuple[jax.Array, jax.Array]:
    lg = K.matmul(files, x, out, norm=norm, eps=eps)[0]
    return lg, jnp.argmax(lg, axis=-1).astype(jnp.int32)


def head(params: Params, x: jax.Array | np.ndarray, *,
         compile_only: bool = False) -> tuple[jax.Array | None, jax.Array | None]:
    """Hidden states (B, T, E) -> logits (B, T, V) and their argmax (B, T) (output norm +
    projection; `compile_only`: compile, return None, None)."""
    if params.output is None or params.norm is None:
        raise WorkerError("these params have no output layer", where="logits", fix="load_params(..., head=True)")
    args = (params.files, params.norm, params.output, jnp.asarray(x))
    if compile_only:
        _head.lower(*args, eps=params.spec.norm_eps).compile()
        return None, None
    return _head(*args, eps=params.spec.norm_eps)  # type: ignore[no-any-return]


@partial(jax.jit, static_argnames=("eps",))
def _head_rows(files: Files, norm: jax.Array, out: QWeight, x: jax.Array, *, eps: float) -> jax.Array:
    return K.matmul(files, x, out, norm=norm, eps=eps)[0]


def head_rows(params: Params, x: jax.Array | np.ndarray, start: int, end: int, *,
              compile_only: bool = False) -> jax.Array | None:
    """Logits (B, T, end - start) of vocabulary rows [start, end) of the output layer: the head
    computes the output in row blocks when its streamed part does not fit in memory at once
    (runtime_facts.plan_residency; each block's rows are read before its call, evicted after)."""
    if params.output is None or params.norm is None:
        raise WorkerError("these params have no output layer", where="logits", fix="load_params(..., head=True)")
    w = params.output
    d = np.asarray(w.desc).copy()
    row_bytes = output_row_bytes(params)
    off = (int(d[0, 0]) | (int(d[0, 1]) << 32)) + start * row_bytes
    d[0, 0], d[0, 1], d[0, 4] = off & 0xFFFFFFFF, off >> 32, end - start
    sub = QWeight(jnp.asarray(d), (end - start,), w.cols)
    args = (params.files, params.norm, sub, jnp.asarray(x))
    if compile_only:
        _head_rows.lower(*args, eps=params.spec.norm_eps).compile()
        return None
    return _head_rows(*args, eps=params.spec.norm_eps)  # type: ignore[no-any-return]


def output_row_bytes(params: Params) -> int:
    """Bytes of one vocabulary row of the output matrix in its file (whole quantisation blocks)."""
    assert params.output is not None
    nel, nbytes = BLOCK[TYPE_NAMES[int(np.asarray(params.output.desc)[0, 2])]]
    return params.output.cols // nel * nbytes


def logits(params: Params, x: jax.Array) -> jax.Array:
    """Hidden states (B, T, E) -> logits (B, T, V) (output norm + projection)."""
    lg, _ = head(params, x)
    assert lg is not None
    return lg


# ---------------------------------------------------------------------------- sampling, generation
def processed_probs(logits: np.ndarray, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The distribution `sample` draws from (temperature, then top-k, then top-p) as float64
    probabilities; temperature 0 is a point mass on the argmax (speculative sampling needs it whole)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if temperature <= 0:
        p = np.zeros_like(z)
        p[int(np.argmax(z))] = 1.0
        return p
    z = z / temperature
    if 0 < top_k < z.size:
        z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        p[order[cum - p[order] >= top_p]] = 0.0  # keep the smallest prefix reaching top_p
        p /= p.sum()
    return p


def sample(logits: np.ndarray, rng: np.random.Generator | None = None, *, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0) -> int:
    """Next token from a logit vector: greedy at temperature 0, else drawn from `processed_probs` with
    `rng` (seeded by the caller, so a run is reproducible)."""
    if temperature <= 0:
        return int(np.argmax(np.asarray(logits).reshape(-1)))
    if rng is None:
        raise ValueError("sampling at temperature > 0 needs a seeded numpy Generator")
    p = processed_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return int(rng.choice(p.size, p=p))


@dataclass
class Generation:
    """What `generate` produced: new token ids, per-step logits (if asked) and timings (s)."""

    tokens: list[int]
    logits: list[np.ndarray] = field(default_factory=list)
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)


def generate(params: Params, prompt: Sequence[int], max_new_tokens: int, *, windows: Sequence[Sequence[int]] | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, max_seq: int | None = None,
             stop: Sequence[int] = (), keep_logits: bool = False,
             on_token: Callable[[int], None] | None = None) -> Generation:
    """Single-process generation: prefill the prompt, then decode token by token.

    `windows` is the order in which layer windows run for every token (default: all layers as one
    window), e.g. the segments of a Plan over k laps; it must cover every layer once, in order.
    """
    spec = params.spec
    windows = [tuple(w) for w in (windows or [tuple(range(spec.n_layers))])]
    if [i for w in windows for i in w] != list(range(spec.n_layers)):
        raise WorkerError("windows must cover layers 0..L-1 once, in order", where="generate",
                          fix="pass the plan's segments in ring/lap order")
    if not prompt:
        raise WorkerError("empty prompt", where="generate", fix="give at least one token (e.g. BOS)")
    if min(prompt) < 0 or max(prompt) >= spec.vocab:
        raise WorkerError(f"token id out of range 0..{spec.vocab - 1}", where="generate",
                          fix="use ids from the model's tokenizer")
    max_seq = max_seq or len(prompt) + max_new_tokens
    kv: KVStore = init_kv(spec, range(spec.n_layers), max_seq)
    rng = np.random.default_rng(seed)
    gen = Generation([])

    whole = len(windows) == 1 and params.embed is not None and params.output is not None

    def step(ids: Sequence[int], pos: int) -> np.ndarray:
        nonlocal kv
        if whole:  # one jitted call per token
            lg, _, kv = forward(params, kv, [list(ids)], pos, windows[0])
            assert lg is not None
            return np.asarray(lg)[0]  # (indexing the device array would dispatch an op)
        x = embed(params, [list(ids)])
        for w in windows:
            x, kv = run_layers(params, kv, x, pos, w)
        return np.asarray(logits(params, x[:, -1:])[0, -1])

    t0 = time.perf_counter()
    out = step(prompt, 0)
    gen.prefill_s = time.perf_counter() - t0
    pos = len(prompt)
    for i in range(max_new_tokens):
        if keep_logits:
            gen.logits.append(out)
        tok = sample(out, rng, temperature=temperature, top_k=top_k, top_p=top_p)
        gen.tokens.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in stop or i == max_new_tokens - 1:
            break
        t = time.perf_counter()
        out = step([tok], pos)
        gen.step_s.append(time.perf_counter() - t)
        pos += 1
    return gen
