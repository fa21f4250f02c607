"""Request batching on one CPU device: Bud's paged ("tiled") KV pool vs max-length preallocation
vs one request at a time (reference B.2-B.4).

All requests arrive at t = 0 (the paper's 100 parallel requests; prompt and output lengths drawn
from a seeded distribution around the configured means), unless a request stream is given
(`requests` with arrival times: primasim.sim.serve_workload); a request waits until it arrives. The engine runs iterations: admit waiting
requests while the KV pool has room, then one forward pass over every running request (the new
ones' whole prompts plus one token for each decoding one). An iteration streams the weights from
RAM once whatever the batch, reads each request's filled KV cache, and computes FLOPs for every
token in it -- so batching amortises the weight traffic, which is the lever behind the paper's
18-22x. Admission is by memory:
- paged: the pool is cut into tiles of `TILE_TOKENS` positions; a request holds the tiles its
  context fills and grows tile by tile (if the pool runs dry the youngest request is preempted
  and re-queued);
- prealloc: a request reserves `max_len` positions at admission, so far fewer fit at once;
- serial: no batching, one request from prompt to last token, then the next.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from primasim.core.device import rate
from primasim.core.units import MiB

from ._context import SimContext, SimResult, infeasible
from ._engine import Proc

if TYPE_CHECKING:  # the registry imports the schedules: the entry's type only, for annotations
    from ._systems import SystemEntry

TILE_TOKENS = 16


@dataclass
class _Req:
    rid: int
    prompt: int
    gen: int
    done: int = 0  # tokens generated since (re)admission
    tiles: int = 0
    emitted: int = 0  # tokens generated in total (index of the next token)
    arrival: float = 0.0

    def __post_init__(self) -> None:
        self.total = self.gen

    @property
    def ctx(self) -> int:
        return self.prompt + self.done


def draw_requests(ctx: SimContext) -> list[_Req]:
    """`requests` requests with prompt/output lengths around the configured means (seeded)."""
    cfg, rng = ctx.cfg, ctx.rng
    prompts = rng.poisson(cfg.prompt_tokens, cfg.requests).clip(1, None)
    gens = rng.poisson(cfg.tokens, cfg.requests).clip(1, None)
    return [_Req(i, int(p), int(g)) for i, (p, g) in enumerate(zip(prompts, gens))]


def run_batch(ctx: SimContext, entry: SystemEntry, requests: list[_Req] | None = None,
              on_admit: Callable[[_Req], None] | None = None) -> SimResult:
    assert ctx.plan is not None
    plan, m, cfg, env = ctx.plan, ctx.model, ctx.cfg, ctx.env
    opts = plan.options
    kv_mode = str(opts.get("kv", "paged"))
    max_batch = int(cfg.batch or opts.get("requested_batch", opts.get("batch", cfg.requests)))
    batching = max_batch > 1
    max_len = int(opts.get("max_len", cfg.max_len))
    tile_tokens = int(opts.get("tile_tokens", TILE_TOKENS))
    dev = ctx.dev(plan.head)
    spec = dev.spec
    buffers = m.compute_buffer_bytes(max_len) + 256 * MiB
    pool = spec.ram_avail - m.total_bytes - buffers
    if pool <= 0:
        return infeasible(entry.name, f"weights ({m.total_bytes / 2**30:.1f} GiB) + buffers do not fit in "
                          f"{spec.ram_avail / 2**30:.1f} GiB on {spec.name} (OOM)", plan, cfg)
    kv_tok = m.kv_bytes_per_token() * m.n_layers  # one position, every layer
    tile = tile_tokens * kv_tok
    n_tiles = int(pool // tile)
    reqs = draw_requests(ctx) if requests is None else requests
    for r in reqs:
        ctx.request(r.rid, r.prompt, r.gen, arrival=r.arrival)
    prealloc_tiles = math.ceil(max_len / tile_tokens)
    if kv_mode == "prealloc" and prealloc_tiles > n_tiles:
        return infeasible(entry.name, "one max-length KV reservation does not fit in RAM (OOM)", plan, cfg)
    dev.setup_memory(m.total_bytes + buffers, mmap=False)
    tm = dev.timing
    peak_batch = 0
    free = n_tiles
    t_token_flops = tm._flop_time(spec.cpu_flops, 1, 1)  # one token through one layer (weights)
    attn_rate = rate(spec.cpu_flops, "f16")

    def tiles_for(r: _Req, extra: int = 0) -> int:
        if kv_mode == "prealloc":
            return prealloc_tiles
        return math.ceil((r.ctx + extra) / tile_tokens)

    def step_time(batch: list[_Req], new: list[_Req]) -> float:
        """One iteration: weights once, each request's KV, FLOPs per token, logits per request."""
        fresh = set(id(r) for r in new)
        toks = sum(r.ctx if id(r) in fresh else 1 for r in batch)
        kv_read = sum(r.ctx for r in batch if id(r) not in fresh) * m.kv_bytes_per_token()
        attn = 4.0 * m.n_heads * m.head_dim * sum(r.ctx for r in batch) / attn_rate
        per_layer = (t_token_flops * toks + attn + spec.kv_copy * toks
                     + (m.layer_bytes + kv_read) / spec.ram_bw)
        return m.n_layers * per_layer + tm.output(len(batch))

    def engine() -> Proc:
        nonlocal free, peak_batch
        future = deque(sorted(reqs, key=lambda r: r.arrival))
        waiting: deque[_Req] = deque()
        running: list[_Req] = []
        it = 0
        while future or waiting or running:
            while future and future[0].arrival <= env.now:
                waiting.append(future.popleft())
            if not waiting and not running:
                yield env.timeout(future[0].arrival - env.now)  # idle until the next request arrives
                continue
            it += 1
            new: list[_Req] = []
            while waiting and len(running) < max_batch:
                r = waiting[0]
                need = tiles_for(r, 1)
                # keep a tile of headroom per running request so they can grow (paged)
                headroom = 0 if kv_mode == "prealloc" else len(running)
                if need + headroom > free and running:
                    break
                waiting.popleft()
                if on_admit is not None:
                    on_admit(r)
                r.tiles = need
                free -= need
                running.append(r)
                new.append(r)
            peak_batch = max(peak_batch, len(running))
            yield from dev.cpu.serve(step_time(running, new), name=f"iteration {it}: batch {len(running)}"
                                     + (f", {len(new)} new" if new else ""))
            finished = []
            for r in list(running):
                if r not in running:
                    continue  # preempted by an earlier request of this iteration
                ctx.emit(r.rid, r.emitted)
                r.emitted += 1
                r.done += 1
                if r.emitted >= r.total:
                    finished.append(r)
                    running.remove(r)
                    free += r.tiles
                    r.tiles = 0
                elif kv_mode == "paged":
                    while tiles_for(r, 1) > r.tiles:
                        if free == 0:
                            victim = max((x for x in running if x is not r), key=lambda x: x.rid, default=None)
                            if victim is None:
                                break
                            free += victim.tiles
                            victim.tiles = 0
                            _preempt(victim, running, waiting)
                            continue
                        free -= 1
                        r.tiles += 1

    done = env.process(engine())
    ctx.run(until=done)
    res = ctx.result(extra={"kv_pool_tiles": n_tiles, "tile_tokens": tile_tokens, "peak_batch": peak_batch,
                            "kv_mode": kv_mode, "batching": batching})
    return res


def _preempt(victim: _Req, running: list[_Req], waiting: deque[_Req]) -> None:
    """Drop a running request's KV (it restarts from its prompt later, recompute-style)."""
    running.remove(victim)
    victim.prompt += victim.done
    victim.done = 0
    waiting.appendleft(victim)
