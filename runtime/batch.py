"""Bud's request manager: many requests decoded together on one worker over a paged KV pool.

Iteration-level batching: every step decodes one token of every running request in one batched
call (the batch is padded to a power of two, so XLA compiles a handful of shapes, all at set-up);
a newly admitted request is prefilled alone, then joins the batch. The KV cache is the paged pool
of runtime/_kvcache.py: a request holds ceil(length / block_size) blocks that grow with it and go
back to the free list when it finishes, instead of a max-length reservation per request.

Admission by memory: the pool gets the memory the device has left for KV (its memory cgroup's free
room, or ``options["kv_bytes"]``); a waiting request is admitted only when the pool's free blocks,
minus the blocks the running requests will still grow into, hold its whole prompt + output. So the
pool never runs dry mid-decode and nothing is preempted; when memory is short, requests wait (FIFO).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from primasim.core import runtime_facts as facts
from primasim.core.cgroups import UNLIMITED, own_group
from primasim.core.errors import WorkerError

from . import model as md
from ._kvcache import PagedKVPool
from .wire import MsgType


@dataclass
class Req:
    seq: int
    ids: list[int]
    max_new: int
    rng: np.random.Generator
    generated: list[int]
    last: int = -1


def block_tokens(options: dict[str, Any]) -> int:
    """Tokens per KV block: the plan's Bud tile size (``tile_tokens``), 16 by default."""
    return int(options.get("tile_tokens", facts.BLOCK_TOKENS))


def kv_budget(options: dict[str, Any]) -> float | None:
    """Bytes for the KV pool: options["kv_bytes"], else half the free room of a limited memory
    cgroup (the other half stays for activations and the allocator), else None (unbounded)."""
    if options.get("kv_bytes"):
        return float(options["kv_bytes"])
    g = own_group("memory")
    if g is not None:
        limit = g.memory_max()
        if limit < UNLIMITED // 2:
            return facts.KV_POOL_SHARE * max(0, limit - g.memory_current())
    return None


class BatchServer:
    """Runs all requests of one GENERATE to completion; emits TOKEN and DONE messages."""

    def __init__(self, stage: Any, obj: dict[str, Any], rec: Any, emit: Callable[[MsgType, dict[str, Any]], None],
                 io: Any, mem: Any, pool: Any = None) -> None:
        self.stage, self.rec, self.emit, self.io, self.mem = stage, rec, emit, io, mem
        self.opts = obj
        o = dict(obj.get("options", {}))
        self.block = block_tokens(o)
        self.max_batch = int(o.get("batch", 64))
        # Bud's comparison: "prealloc" reserves max_len tokens per request, "paged" what it uses
        self.prealloc = o.get("kv") == "prealloc"
        self.max_len = int(o.get("max_len", 0) or 0)
        seed = int(obj.get("seed", 0))
        self.waiting = collections.deque(
            Req(i, list(p), int(obj["max_new_tokens"]), np.random.default_rng([seed, i]), [])
            for i, p in enumerate(obj["prompts"]))
        need = max(len(r.ids) + r.max_new for r in self.waiting)
        self.max_seq = need
        if o.get("kv_bytes") and obj.get("setup_max_seq", 0) >= need:
            self.max_seq = int(obj["setup_max_seq"])  # the table width the warm-up compiled
        per_req = -(-need // self.block)
        spec = stage.spec
        block_bytes = facts.kv_bytes(len(stage.layers), self.block, spec.n_kv_heads, spec.head_dim)
        budget = kv_budget(o)
        if budget is None:
            n_blocks = 1 + per_req * min(len(self.waiting), self.max_batch)
        else:
            n_blocks = int(budget // block_bytes)
        if n_blocks - 1 < per_req:

            raise WorkerError(f"the KV pool ({n_blocks} blocks of {self.block} tokens, {budget or 0:.0f} bytes) "
                              f"cannot hold one request of {need} tokens", where="batch",
                              fix="give the device more memory or shorten the requests")

        if (pool is not None and pool.n_blocks == n_blocks and pool.block_size == self.block
                and pool.max_seq == self.max_seq and not pool.sequences()):
            self.pool = pool  # allocated at set-up (preallocate), as a serving engine's KV pool is
        else:
            self.pool = PagedKVPool(spec, stage.layers, n_blocks=n_blocks, block_size=self.block,
                                    max_seq=self.max_seq)
        self.running: list[Req] = []
        self.stats = {"n_blocks": n_blocks, "block_bytes": block_bytes, "max_running": 0}

    # -------------------------------------------------------------------- admission
    def _full(self, r: Req) -> int:
        """Blocks request r holds at its end (prealloc: max_len tokens, whatever it uses)."""
        tokens = len(r.ids) + r.max_new
        if self.prealloc and self.max_len:
            tokens = max(tokens, self.max_len)
        return -(-tokens // self.block)

    def _reserved(self) -> int:
        """Blocks the running requests will still take before they finish."""
        return sum(max(0, self._full(r) - -(-self.pool.length(r.seq) // self.block)) for r in self.running)

    def _admit(self) -> list[Req]:
        new = []
        while self.waiting and len(self.running) + len(new) < self.max_batch:
            r = self.waiting[0]
            reserved = self._reserved() + sum(self._full(q) for q in new)
            if self.pool.free_blocks - reserved < self._full(r):
                break
            new.append(self.waiting.popleft())
        return new

    # -------------------------------------------------------------------- compute
    def _forward(self, seqs: list[int | None], ids: np.ndarray, n_new: int) -> np.ndarray:
        """Run every window for tokens `ids` (B, T) of `seqs` (None = padding); logits (B, V)."""

        pos = self.pool.prepare(seqs, n_new)
        params = self.stage.params
        x = md.embed(params, ids)
        pool = self.pool
        for s, e in self.stage.windows:
            x, pool = md.run_layers(params, pool, x, pos, range(s, e))
        self.pool.advance(seqs, n_new)
        return np.asarray(md.logits(params, x[:, -1:]))[:, -1]

    def _sample(self, r: Req, logits: np.ndarray, t: float) -> bool:
        o = self.opts
        tok = self.stage.sample(logits, r.rng, float(o.get("temperature", 0.0)), int(o.get("top_k", 0)),
                                float(o.get("top_p", 1.0)))
        r.generated.append(tok)
        r.last = tok
        self.emit(MsgType.TOKEN, {"seq": r.seq, "index": len(r.generated) - 1, "token_id": tok, "time": t})
        return len(r.generated) >= r.max_new or tok in set(o.get("stop_ids", []))

    def run(self) -> None:
        done: dict[int, list[int]] = {}
        while self.waiting or self.running:
            for r in self._admit():
                self.pool.add(r.seq)
                t0 = time.time()
                lg = self._forward([r.seq], np.asarray([r.ids], np.int32), len(r.ids))
                t1 = time.time()
                self.rec.span("cpu", t0, t1, f"prefill {len(r.ids)} tokens", r.seq, 0)
                if self._sample(r, lg[0], t1):
                    self.pool.free(r.seq)
                    done[r.seq] = r.generated
                else:
                    self.running.append(r)
            if not self.running:
                if self.waiting and not self._admit_possible():

                    raise WorkerError("a waiting request can never be admitted", where="batch",
                                      fix="give the device more memory")
                continue
            self.stats["max_running"] = max(self.stats["max_running"], len(self.running))
            b = facts.batch_bucket(len(self.running))
            seqs: list[int | None] = [r.seq for r in self.running] + [None] * (b - len(self.running))
            ids = np.zeros((b, 1), np.int32)
            ids[:len(self.running), 0] = [r.last for r in self.running]
            t0 = time.time()
            lg = self._forward(seqs, ids, 1)
            t1 = time.time()
            self.rec.span("cpu", t0, t1, f"decode batch {len(self.running)} (padded {b})", 0, -1)
            self.rec.sample("batch_size", t1, len(self.running))
            self.rec.sample("kv_free_blocks", t1, self.pool.free_blocks)
            self.rec.sample("disk_read_bytes", t1, self.io.read_bytes())
            self.mem.sample()
            still = []
            for i, r in enumerate(self.running):
                if self._sample(r, lg[i], t1):
                    self.pool.free(r.seq)
                    done[r.seq] = r.generated
                else:
                    still.append(r)
            self.running = still
        self.emit(MsgType.DONE, {"tokens": {str(k): v for k, v in sorted(done.items())}, **self.stats})

    def _admit_possible(self) -> bool:
        return self._full(self.waiting[0]) <= self.pool.n_blocks - 1

    @staticmethod
    def preallocate(stage: Any, options: dict[str, Any], max_seq: int) -> Any:
        """The run's KV pool, allocated at set-up when its size is known (options `kv_bytes`);
        None otherwise (the pool is then sized from the memory left when generation starts)."""
        if not options.get("kv_bytes"):
            return None


        block = block_tokens(options)
        sp = stage.spec
        n_blocks = int(float(options["kv_bytes"]) // facts.kv_bytes(len(stage.layers), block, sp.n_kv_heads, sp.head_dim))
        if n_blocks < 2:
            return None
        pool = PagedKVPool(sp, stage.layers, n_blocks=n_blocks, block_size=block, max_seq=max_seq)
        jax.block_until_ready(list(pool.layers.values()))
        return pool

    @staticmethod
    def warmup(stage: Any, lengths: list[int], max_batch: int, block: int = facts.BLOCK_TOKENS, *, max_seq: int | None = None,
               kv_bytes: float | None = None, pool: Any = None) -> None:
        """Compile the prefill shapes and every decode bucket up to max_batch, without running them
        (no weight read, no pool allocated: set-up comes before the device's memory limit). Given
        the pool's size (`kv_bytes`, as the run's options give it) and `max_seq`, the shapes are the
        run's own, so nothing compiles during generation. Given the run's `pool` (at LOAD, on the
        stage's zero weights), the same shapes are run once instead (XLA's first executions)."""

        longest = max(lengths) + 1
        n_blocks = 1 + -(-longest // block) * max(1, max_batch)
        if kv_bytes:  # the run's pool (preallocate's formula): its shapes are the ones to compile
            sp = stage.spec
            n_blocks = max(2, int(float(kv_bytes) // facts.kv_bytes(len(stage.layers), block, sp.n_kv_heads, sp.head_dim)))
        only = pool is None
        if pool is None:
            pool = PagedKVPool(stage.spec, stage.layers, n_blocks=n_blocks, block_size=block,
                               max_seq=max(longest, max_seq or 0), abstract=True)
        for n in sorted(set(lengths)):
            pos = pool.padding(1)
            x = md.embed(stage.params, np.zeros((1, n), np.int32), compile_only=only)
            for s, e in stage.windows:
                x, pool = md.run_layers(stage.params, pool, x, pos, range(s, e), compile_only=only)
            md.head(stage.params, x[:, -1:], compile_only=only)
        for b in facts.BATCH_BUCKETS:
            if b > facts.batch_bucket(max_batch):
                break
            pos = pool.padding(b)
            x = md.embed(stage.params, np.zeros((b, 1), np.int32), compile_only=only)
            for s, e in stage.windows:
                x, pool = md.run_layers(stage.params, pool, x, pos, range(s, e), compile_only=only)
            md.head(stage.params, x[:, -1:], compile_only=only)
