"""The KV caches: the contiguous one (`KVCache`, `init_kv`: all layers stacked in one (k, v) pair)
and the paged pool for batched decode on one worker (Bud's "tiled" cache, vLLM's paged attention).

Instead of max-length caches per sequence, every layer has one pool of fixed-size blocks
(n_blocks, n_kv_heads, block_size, head_dim); a sequence owns a list of blocks (its block table)
that grows as it does, and a free list hands blocks out and takes them back. One jitted step
decodes a batch of sequences of different lengths: attention gathers each sequence's blocks by its
table and masks positions past its length (runtime/model.py, `_kv_write` and `attention`).

Use (the request manager's loop):
    pool = PagedKVPool(spec, layers, n_blocks=..., block_size=16, max_seq=...)
    pool.add(seq)                                  # admit: no blocks yet
    pos = pool.prepare([seq_a, seq_b, None], n_new=1)  # reserve room; None = padding row
    x, pool = run_layers(params, pool, x, pos, layers)  # same call as with a contiguous cache
    pool.advance([seq_a, seq_b], 1)                # the tokens are now in the cache
    pool.free(seq_a)                               # finished: blocks back to the free list
Block 0 is never handed out: padding rows and unused table entries point at it, so they write
garbage only there and read it only behind the mask.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from primasim.core.errors import WorkerError
from primasim.core.model import ModelSpec
from primasim.core.runtime_facts import BLOCK_TOKENS, kv_bytes

LayerKV = tuple[jax.Array, jax.Array]


class KVPoolExhausted(WorkerError):
    """The pool has too few free blocks for the request (admission should have waited)."""


class PagedKVPool:
    """Per-layer block pools + free list + per-sequence block tables (a `KVStore` for run_layers)."""

    def __init__(self, spec: ModelSpec, layers: Sequence[int], n_blocks: int, block_size: int = BLOCK_TOKENS,
                 max_seq: int | None = None, *, abstract: bool = False) -> None:
        """`abstract`: shapes only (jax.ShapeDtypeStruct), to compile run_layers without allocating."""
        if n_blocks < 2 or block_size < 1:
            raise WorkerError(f"n_blocks={n_blocks}, block_size={block_size}", where="PagedKVPool",
                              fix="use n_blocks >= 2 (block 0 is reserved) and block_size >= 1")
        self.spec = spec
        self.block_size = block_size
        self.n_blocks = n_blocks
        self.max_seq = max_seq or (n_blocks - 1) * block_size
        self.max_blocks = -(-self.max_seq // block_size)  # table width: fixed, so shapes are stable
        shape = (n_blocks, spec.n_kv_heads, block_size, spec.head_dim)
        make = (lambda: jax.ShapeDtypeStruct(shape, jnp.float32)) if abstract else (lambda: jnp.zeros(shape, jnp.float32))
        self.layers: dict[int, LayerKV] = {i: (make(), make()) for i in layers}
        self._free: list[int] = list(range(n_blocks - 1, 0, -1))  # pop() hands out low ids first
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}
        self.tables: jax.Array | None = None  # set by prepare(): (B, max_blocks) int32

    # ------------------------------------------------------------------ bookkeeping
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers of this pool (k and v)."""
        return kv_bytes(len(self.layers), self.block_size, self.spec.n_kv_heads, self.spec.head_dim)

    def blocks_needed(self, seq: Hashable, n_new: int) -> int:
        """Extra blocks `seq` needs to hold n_new more tokens."""
        length = self._lengths.get(seq, 0)
        have = len(self._tables.get(seq, ()))
        return max(0, -(-(length + n_new) // self.block_size) - have)

    def can_fit(self, n_tokens: int) -> bool:
        """Whether a new sequence of n_tokens would fit now (admission control)."""
        return -(-n_tokens // self.block_size) <= len(self._free) and n_tokens <= self.max_seq

    def length(self, seq: Hashable) -> int:
        return self._lengths[seq]

    def sequences(self) -> list[Hashable]:
        return list(self._tables)

    def add(self, seq: Hashable) -> None:
        if seq in self._tables:
            raise WorkerError(f"sequence {seq!r} is already in the pool", where="PagedKVPool.add",
                              fix="use a fresh sequence id")
        self._tables[seq], self._lengths[seq] = [], 0

    def free(self, seq: Hashable) -> None:
        """Return the sequence's blocks to the free list."""
        self._free.extend(reversed(self._tables.pop(seq)))
        del self._lengths[seq]

    def prepare(self, seqs: Sequence[Hashable | None], n_new: int) -> np.ndarray:
        """Reserve room for n_new tokens of each sequence (None = padding row) and set the block
        tables of the next run_layers call. Returns the start positions (B,) to pass as `pos`."""
        need = sum(self.blocks_needed(s, n_new) for s in seqs if s is not None)
        if need > len(self._free):
            raise KVPoolExhausted(f"needs {need} free blocks, has {len(self._free)}", where="PagedKVPool",
                                  fix="admit fewer sequences or make the pool larger")
        table = np.zeros((len(seqs), self.max_blocks), dtype=np.int32)
        pos = np.zeros(len(seqs), dtype=np.int32)
        for b, s in enumerate(seqs):
            if s is None:
                continue
            if self._lengths[s] + n_new > self.max_seq:
                raise WorkerError(f"sequence {s!r} would exceed max_seq={self.max_seq}", where="PagedKVPool",
                                  fix="stop the sequence or raise max_seq")
            blocks = self._tables[s]
            for _ in range(self.blocks_needed(s, n_new)):
                blocks.append(self._free.pop())
            table[b, :len(blocks)] = blocks
            pos[b] = self._lengths[s]
        self.tables = jnp.asarray(table)
        return pos

    def padding(self, batch: int) -> np.ndarray:
        """Tables for `batch` padding rows (every entry block 0, the reserved one) and their start
        positions: a call of the run's shapes that touches no sequence's blocks (warm-up)."""
        # through the same host-to-device path as `prepare`'s tables: a jnp.zeros table left that
        # transfer's first use (a small compile, 25-40 ms of CPU measured) to the run's first prefill
        self.tables = jnp.asarray(np.zeros((batch, self.max_blocks), dtype=np.int32))
        return np.zeros(batch, dtype=np.int32)

    def advance(self, seqs: Sequence[Hashable | None], n_new: int) -> None:
        """Record that n_new tokens of each sequence are now stored."""
        for s in seqs:
            if s is not None:
                self._lengths[s] += n_new

    # ------------------------------------------------------------------ KVStore
    def caches(self, layers: Sequence[int]) -> tuple[tuple[LayerKV, ...], None]:
        if self.tables is None:
            raise WorkerError("no block tables", where="PagedKVPool", fix="call prepare() before run_layers")
        return tuple(self.layers[i] for i in layers), None

    def replace(self, layers: Sequence[int], caches: Sequence[LayerKV]) -> PagedKVPool:
        self.layers.update(zip(layers, caches))
        return self


@dataclass
class KVCache:
    """Contiguous KV cache: k and v of shape (n_layers, batch, n_kv_heads, max_seq + 1, head_dim)
    f32, row r holding layer `order[r]` (the spare position is never used; see `_kv_write`). Two
    arrays for all layers: the decode step's operands stay few (`_Packed`).

    Functional: `run_layers` donates the arrays and returns a new KVCache; do not reuse the old one.
    """

    k: Any
    v: Any
    order: tuple[int, ...]
    max_seq: int
    tables: None = None
    block_size: int = 1

    def caches(self, layers: Sequence[int]) -> tuple[LayerKV, np.ndarray]:
        """The stacked (k, v) and the rows of `layers` in them (any order; `run_layers`' kv_rows)."""
        rows = {i: r for r, i in enumerate(self.order)}
        missing = [i for i in layers if i not in rows]
        if missing:
            raise WorkerError(f"no KV cache for layers {missing}", where="run_layers",
                              fix="init_kv with every layer this worker runs")
        return (self.k, self.v), np.array([rows[i] for i in layers], np.int32)

    def replace(self, layers: Sequence[int], caches: LayerKV) -> KVCache:
        return KVCache(caches[0], caches[1], self.order, self.max_seq)

    @property
    def layers(self) -> dict[int, LayerKV]:
        """Per layer (k, v) (B, H_kv, S + 1, D): new arrays sliced from the stack (for inspection)."""
        return {i: (self.k[r], self.v[r]) for r, i in enumerate(self.order)}

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)


def init_kv(spec: ModelSpec, layers: Sequence[int], max_seq: int, batch: int = 1, *,
            abstract: bool = False) -> KVCache:
    """Zeroed contiguous caches for `layers`: 2 * batch * (max_seq + 1) * n_kv_heads * head_dim * 4 bytes each.
    `abstract`: shapes only (jax.ShapeDtypeStruct), for compiling without allocating (`compile_only`)."""
    shape = (len(layers), batch, spec.n_kv_heads, max_seq + 1, spec.head_dim)
    make = (lambda: jax.ShapeDtypeStruct(shape, jnp.float32)) if abstract else (lambda: jnp.zeros(shape, jnp.float32))
    return KVCache(make(), make(), tuple(layers), max_seq)
