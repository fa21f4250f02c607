"""primasim's own runtime (runtime/), as the simulator models it (`SimConfig(runtime=True)`).

(Longer than ~600 lines: the runtime's residency, disk streaming, CPU quota and ring schedule share
one device state per run; split, they would pass it between modules.)

The other schedules model the systems of the papers (llama.cpp's engine under the OS page cache).
This one models what `primasim.runtime.head.run_plan` executes, so a plan can be predicted and then run on
the (emulated) cluster and the two compared (`primasim validate`, experiments/fidelity.py):

- **Residency**, in the run's mode (`SimConfig.residency`), decided by the worker's own formula
  (`primasim.core.runtime_facts.plan_residency`) from the device's budget -- `ram_avail` minus the
  KV caches of the sequences in flight (f32, `max_seq` positions) and an 8 MiB activation reserve:
  weights that fit stay resident. Otherwise, `planned`: the device keeps the first fraction r of
  every layer and *streams* the rest from disk each time the layer runs, evicting it right after,
  with r the largest fraction such that r * window + c * (1 - r) * layer fits (c = 2 with
  prefetch: room for the next layer's streamed part, else 1) -- the bytes a token reads are the
  streamed bytes, not an emergent re-read pattern (the head keeps its output layer as far as it
  fits beside them and reads the rest before the output call); `lru`: the weights go through the simulated OS
  page cache (`PageCache`: the kernel's LRU lists and refaults), faulted in by the window's compute;
  with prefetch and a ring the next window is read ahead in the background (madvise WILLNEED) --
  what a token reads emerges from the policy, as for llama.cpp and prima.cpp. Pinned weights
  never touch the disk.
- **Compute**: one jitted call per window (per layer on a streaming device; on a single device
  that does not stream, one call per token for embedding, blocks and head), each costing the
  device's `call_overhead` plus, per layer, the cost model's roofline terms at the attention span
  the runtime uses (256 positions at least, powers of two), at the matrix rate measured for that
  many rows (`gemm_bw_at`). The head embeds each token (a jitted gather, not charged: `embed`),
  and runs the output layer (a call) and the sampler. An emulated CPU quota refills every CFS period (`CpuQuota`).
- **Disk**: a blkio throttle's slices (`DiskBucket`). A streaming device reads each layer's
  streamed part by demand faults before it can compute the layer; with prefetch, it first asks
  for the *next* layer's streamed part in the background (lower priority than demand reads, in
  the order posted), as the worker's prefetch thread does.
- **Network**: every hop is the cluster's link (bandwidth + latency with the cluster's jitter; a
  shaped link's token bucket, `LinkBucket`); activations are 4e bytes per token.
- **KV caches** are allocated at set-up, as the worker does (a Bud pool of unknown size when the
  batch starts).
- **Schedules**: `ring` (k laps, one token in flight), `rpp` (S sequences in flight, FIFO at every
  device), `batch` (runtime/batch.py: requests admitted up to the batch, each prefilled alone,
  then decoded together in power-of-two buckets).
- The run starts cold: resident parts loaded, streamed parts not (the runtime's RELEASE + LOAD);
  there is no warm-up pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import simpy

from primasim.core.model import ModelSpec
from primasim.core.plan import Plan
from primasim.core.runtime_facts import (
    ACT_RESERVE,
    BLOCK_TOKENS,
    KV_POOL_SHARE,
    MIN_SPAN,
    STREAM_CPU_PER_BYTE,
    anon_reserve,
    attention_span,
    batch_bucket,
    kv_bytes,
    lru_room,
    plan_residency,
)
from primasim.core.units import MiB

from ._context import SimContext, SimResult, infeasible
from ._cpu import CpuQuota, host_cpus
from ._devices import DEMAND, PREFETCH, SimDevice
from ._engine import Proc
from ._timing import DeviceTiming

STREAM_CHUNK = 2 * MiB  # granularity of streamed reads (demand reads can pass a prefetch between chunks)


@dataclass
class Residency:
    """What one device keeps in memory and what it streams (runtime/worker/residency.py)."""

    mode: str  # pinned | fits | planned (streams part of every layer) | lru (the page cache decides) | none
    budget: float
    keep_fraction: float = 1.0
    stream_prefetch: bool = False
    streamed: dict[int, float] = field(default_factory=dict)  # layer -> bytes streamed per use
    resident_bytes: float = 0.0
    anon_bytes: float = 0.0  # KV + activations (+ pinned weights)
    window_prefetch: bool = False  # lru: the next window is madvise(WILLNEED)'d while the ring computes
    output_streamed: float = 0.0  # planned, head: output-layer bytes read before its call, evicted after
    output_blocks: int = 1  # planned, head: the output computed in this many row-block calls

    @property
    def streams(self) -> bool:
        return self.mode == "planned" and any(v > 0 for v in self.streamed.values())


def device_layers(plan: Plan, name: str) -> list[int]:
    return [i for s in plan.segments() if s.device == name for i in range(s.start, s.end)]


def residency(plan: Plan, model: ModelSpec, ram_avail: float, name: str, *, max_seq: int,
              in_flight: int = 1, mode: str = "planned", ring: int = 1) -> Residency:
    """The worker's residency decision for device `name` (same formula, same inputs)."""
    layers = device_layers(plan, name)
    head = name == plan.devices[0].name
    reserve = float(anon_reserve(len(layers), max_seq, model.n_kv_heads, model.head_dim, in_flight))
    budget = ram_avail - reserve
    out_b = float(model.output_bytes) if head else 0.0
    pinned = plan.weights == "pinned"
    rp = plan_residency(mode, budget, {i: model.block_bytes(i) for i in layers}, out_b, pinned=pinned,
                        prefetch=plan.prefetch, ring=ring)
    if pinned:
        total = rp.resident_bytes + (float(model.input_bytes) if head else 0.0)
        return Residency("pinned", budget, resident_bytes=total, anon_bytes=reserve + total)
    return Residency("planned" if rp.state == "streams" else rp.state, budget, rp.keep_fraction, rp.stream_prefetch,
                     dict(rp.streamed), rp.resident_bytes, reserve, rp.window_prefetch, rp.output_streamed,
                     rp.output_blocks)


def timing(dev: SimDevice, rows: int) -> DeviceTiming:
    """The device's timing for a call of `rows` tokens: XLA multiplies one token's activations as
    a matrix-vector product (streaming at `ram_bw`) and several as a matrix-matrix one (`gemm_bw`)."""
    sp = dev.spec
    bw = sp.gemm_bw_at(rows) if rows > 1 else 0.0
    if bw <= 0 or bw == sp.ram_bw:
        return dev.timing
    cache = dev.__dict__.setdefault("_gemm_timing", {})
    if bw not in cache:
        cache[bw] = DeviceTiming(sp.replace(ram_bw=bw), dev.model)
    return cache[bw]  # type: ignore[no-any-return]


def output_time(dev: SimDevice, rows: int) -> float:
    """The output layer (norm + vocabulary projection) for `rows` positions in one call.

    One row is a matrix-vector product at the device's GEMV rate (`ram_bw`, `cpu_flops`). Several
    rows run the same XLA dot as a block's projections, whose time per number of rows the probe
    measured (the rates `timing(dev, rows)` reproduces): the output layer's time grows with the
    rows as a block's does. (Pricing its 131 MB at the block's solved matrix-matrix rate instead
    made 5 rows cost half of one: that rate is fitted to a block's mix of bytes and FLOPs.)"""
    one = timing(dev, 1).output(1)
    base = timing(dev, 1).layer("cpu", 1, MIN_SPAN, pos=MIN_SPAN)
    # more rows never cost less (a noisy or interpolated rate table could say so between two shapes)
    grow = max((timing(dev, r).layer("cpu", r, MIN_SPAN, pos=MIN_SPAN) / base for r in range(2, rows + 1)),
               default=1.0)
    return one * max(1.0, grow)


class DiskBucket:
    """A device's disk behind a blkio read throttle, as block/blk-throttle.c (Linux 6.14+) grants bytes.

    A throttle group keeps a slice (`slice_s` = `disk_burst / disk_seq`, 100 ms in the kernel):
    by time t it allows `rate x roundup(t - slice_start, slice)` bytes -- the elapsed time is
    rounded *up* to whole slices, so a slice's worth goes at the disk's own speed (`disk_peak`)
    and then the reader waits for the next slice. A dispatch keeps the slice alive until the next
    slice boundary after one more slice, and trims the account only once two whole slices have
    passed, keeping the last one (its unused allowance carries over: Linux commit 29cb955934,
    "fix lower bps rate by throtl_trim_slice()"); a longer idle spell starts a new slice. Reads are
    issued as `BIO`-sized requests. Without `disk_burst` (or a peak no faster than the rate) the
    disk is a plain rate."""

    BIO = 1 * MiB  # the probe's and readahead's request size

    def __init__(self, dev: SimDevice, slices: bool = True) -> None:
        sp = dev.spec
        self.rate = sp.disk_speed
        self.peak = max(sp.disk_peak, self.rate)
        self.slice = sp.disk_burst / self.rate if slices and self.rate > 0 and sp.disk_burst > 0 else 0.0
        self.start = -math.inf
        self.end = -math.inf
        self.disp = 0.0

    def _keep_alive(self, t: float) -> None:
        S = self.slice
        self.end = max(self.end, math.ceil((t + S) / S) * S)  # throtl_set_slice_end: rounded up

    def duration(self, now: float, nbytes: float) -> float:
        """Seconds to read `nbytes` starting at `now`."""
        if self.slice <= 0 or self.peak <= self.rate:
            return nbytes / self.rate
        S, t, left = self.slice, now, nbytes
        while left > 0:
            c = min(self.BIO, left)
            if not self.start <= t <= self.end:  # the slice expired while idle: a new one
                self.start, self.end, self.disp = t, t + S, 0.0
            self._keep_alive(t)
            el = t - self.start
            el_rnd = S if el <= 0 else math.ceil(el / S - 1e-12) * S
            allowed = self.rate * el_rnd
            if self.disp + c > allowed:  # wait for the slice that covers it (the kernel's jiffy_wait)
                t += (self.disp + c - allowed) / self.rate + (el_rnd - el)
                self._keep_alive(t)
            self.disp += c
            t += c / self.peak
            el_down = math.floor((t - self.start) / S + 1e-12) * S  # trim, keeping one finished slice
            if el_down >= 2 * S:
                trim = el_down - S
                self.disp = max(0.0, self.disp - self.rate * trim)
                self.start += trim
            left -= c
        return t - now


class RuntimeRing:
    """The ring / recurrent-pipeline schedule of runtime/worker/ on simulated devices."""

    def __init__(self, ctx: SimContext) -> None:
        assert ctx.plan is not None
        self.ctx, self.plan, self.model, self.cfg = ctx, ctx.plan, ctx.model, ctx.cfg
        plan = self.plan
        self.segs = plan.segments()
        self.head = plan.devices[0].name
        self.S = int(ctx.cfg.S or plan.options.get("S") or len(plan.active)) if plan.schedule == "rpp" else 1
        P, N = ctx.cfg.prompt_tokens, ctx.cfg.tokens
        self.max_seq = max(plan.n_ctx, P + N)
        self.prefetch = plan.prefetch and plan.weights == "mmap"
        ring = len([d for d in plan.devices if d.layers > 0 or d.name == self.head])
        self.res: dict[str, Residency] = {}
        for name, dev in ctx.devices.items():
            r = residency(plan, self.model, dev.spec.ram_avail, name, max_seq=self.max_seq, in_flight=self.S,
                          mode=ctx.cfg.residency, ring=ring)
            if not self.prefetch:
                r.stream_prefetch = r.window_prefetch = False
            self.res[name] = r
        # a single device that does not stream runs a token as one call (runtime/worker/session.py)
        self.fused = ring == 1 and not self.res[self.head].streams
        # serving (runtime/worker/session.py drain): the head computes a token's output and, in the same
        # uninterrupted work item, that sequence's next window (or the prompt of the request taking its
        # freed slot); a SUBMIT or an activation that arrived meanwhile waits. hold_head keeps the head's
        # CPU from the output to the next window of the same slot (seq -> the held request).
        self.hold_head = False
        self.held: dict[int, Any] = {}
        self.buckets = {n: DiskBucket(d, ctx.cfg.disk_slices) for n, d in ctx.devices.items()}
        self._setup_lru()
        self.prefetch_queue = {n: simpy.Resource(ctx.env, 1) for n in ctx.devices}
        hosts = host_cpus(ctx)
        self.quota: dict[str, CpuQuota] = {}
        for d in ctx.devices.values():  # an emulated CPU quota runs short calls in bursts
            q = self.quota[d.name] = CpuQuota(d, ctx.cfg.cpu_quota_bursts, hosts.get(d.name),
                                              ctx.cfg.sched_tick)
            if q.host is not None:  # a host CPU other devices share: they slow each other
                d.cpu.runner = q.start
            else:
                d.cpu.throttle = q.duration
            if self.res[d.name].mode == "lru":
                # a byte the faults bring in costs the faulting thread the kernel's work, as a
                # planned worker's WILLNEED + touch + evict do (STREAM_CPU_PER_BYTE): on its quota
                d.fault_cpu_per_byte = STREAM_CPU_PER_BYTE / self.quota[d.name].frac
        # streamed part of each layer: absent (None), being read (an event) or resident (True)
        self.state: dict[tuple[str, int], Any] = {}
        self.next_layer: dict[tuple[str, int], int] = {}
        for name in ctx.devices:
            wins = [(s.start, s.end) for s in self.segs if s.device == name]
            for w, (a, b) in enumerate(wins):
                for i in range(a, b):
                    self.next_layer[(name, i)] = i + 1 if i + 1 < b else wins[(w + 1) % len(wins)][0]

    def _setup_lru(self) -> None:
        """lru mode: a device whose weights do not fit holds them in the simulated page cache (its
        budget), read by demand faults at the throttled disk's rate; LOAD reads the window and the
        output layer in order, so the cache starts with what the kernel's lists keep of that."""
        for name, dev in self.ctx.devices.items():
            r = self.res[name]
            if r.mode != "lru":
                continue
            dev.setup_memory(r.anon_bytes, mmap=True)
            assert dev.cache is not None
            dev.cache.capacity = max(0.0, lru_room(r.budget))  # the limit less the anonymous memory in use
            bucket = self.buckets[name]
            dev.disk_time = lambda t0, n, _prio, b=bucket: b.duration(t0, n)
            n = self.cfg.chunks_per_layer
            lb = float(self.model.layer_bytes)
            if dev.spec.read_ahead > 0:  # chunks fine enough for the kernel's readahead window
                n = max(n, math.ceil(8 * lb / dev.spec.read_ahead))
            base = 0
            order: list[int] = []
            own = set(device_layers(self.plan, name))
            for i in sorted(own):  # each block its own bytes (Q4_K_M's Q6_K blocks are larger)
                order += dev.register_chunks(i, self.model.block_bytes(i), n, metal=False, base=base)
                base += n
            if name == self.head:
                order += dev.register_chunks(-1, float(self.model.output_bytes), n, metal=False, base=base)
                base += n
            if dev.spec.read_ahead > 0:
                dev.map_file(self.model, own, lb / n, head=name == self.head, base=base)
                # touched pages are rotated once, not activated at their first scan
                # (PageCache.large_folios stays off): a mapping's accessed PTEs count once per
                # mapping (folio_referenced), and traced on the runtime (PRIMASIM_PAGE_TRACE,
                # 2026-12-08, cold starts) one-layer lru windows kept 0.1-0.2 MB on the active
                # file list of 17-43 MB and read 25 MB a window, as the model now does
            for cid in order:  # cold start + LOAD: read in order, the LRU keeps the latest
                dev.cache.admit(cid, demand=True)
                dev.cache.unlock(cid)
            dev.cache.stats = type(dev.cache.stats)()

    # ---------------------------------------------------------------- memory accounting
    def setup_stats(self) -> None:
        rec = self.ctx.rec
        for name, dev in self.ctx.devices.items():
            r = self.res[name]
            d = dev.spec
            rec.set(name, "mem_total", d.ram_total)
            rec.set(name, "mem_avail_before", d.ram_avail)
            rec.set(name, "mem_avail_min", d.ram_avail - r.anon_bytes)
            rec.set(name, "anon_bytes", r.anon_bytes)
            rec.set(name, "resident_weight_bytes", r.resident_bytes)
            rec.set(name, "keep_fraction", r.keep_fraction)
            rec.set(name, "streamed_bytes_per_pass", sum(r.streamed.values()))
            # whether the device reads ahead at all (a plan's prefetch flag does nothing where there
            # is no room for a second streamed part)
            rec.set(name, "prefetches", float(r.stream_prefetch or r.window_prefetch))
            rec.set(name, "output_blocks", float(r.output_blocks))

    # ---------------------------------------------------------------- streaming
    def _read(self, dev: SimDevice, nbytes: float, priority: int, token: int) -> Proc:
        """Read `nbytes` in chunks on the device's disk (demand reads before prefetch reads)."""
        bucket = self.buckets[dev.name]
        eff = self.cfg.fault_efficiency if priority == DEMAND else 1.0
        left = nbytes
        while left > 0:
            n = min(STREAM_CHUNK, left)
            req = dev.disk.acquire(priority)
            yield req
            t0 = self.ctx.env.now
            try:
                yield from dev.disk.work(bucket.duration(t0, n) / eff)
            finally:
                dev.disk.release(req)
            dev.disk_bytes += n
            self.ctx.rec.add(dev.name, "disk_read_bytes", n)
            self.ctx.rec.span(dev.name, "disk" if priority == DEMAND else "prefetch", t0, self.ctx.env.now,
                              "stream" if priority == DEMAND else "prefetch", token=token, nbytes=n)
            left -= n

    def _prefetch(self, dev: SimDevice, layer: int, token: int) -> None:
        key = (dev.name, layer)
        if self.state.get(key) is not None:
            return
        ev = self.ctx.env.event()
        self.state[key] = ev

        def proc() -> Proc:
            # the worker's prefetch thread madvises one layer after the other and the block layer
            # serves their reads in submission order: a layer's read does not share the disk with
            # the next one's (demand reads still pass between chunks)
            with self.prefetch_queue[dev.name].request() as turn:
                yield turn
                yield from self._read(dev, self.res[dev.name].streamed.get(layer, 0.0), PREFETCH, token)
            if self.state.get(key) is ev:
                self.state[key] = True
            ev.succeed()

        self.ctx.env.process(proc())

    def _ensure(self, dev: SimDevice, layer: int, token: int) -> Proc:
        key = (dev.name, layer)
        t0 = self.ctx.env.now
        st = self.state.get(key)
        if isinstance(st, simpy.events.Event):
            yield st
        elif st is None:
            yield from self._read(dev, self.res[dev.name].streamed.get(layer, 0.0), DEMAND, token)
        self.state[key] = True
        if self.ctx.env.now > t0:
            dev.stall += self.ctx.env.now - t0
            self.ctx.rec.add(dev.name, "stall_s", self.ctx.env.now - t0)
            self.ctx.rec.span(dev.name, "wait", t0, self.ctx.env.now, "page faults", token=token)

    def _demand(self, dev: SimDevice, nbytes: float, token: int) -> Proc:
        """Read `nbytes` by demand before a call that needs them: the wait is the device's stall."""
        t0 = self.ctx.env.now
        yield from self._read(dev, nbytes, DEMAND, token)
        dev.stall += self.ctx.env.now - t0
        self.ctx.rec.add(dev.name, "stall_s", self.ctx.env.now - t0)

    def stream_cpu(self, dev: SimDevice, nbytes: float) -> float:
        """The worker's own CPU for reading ahead, touching and evicting `nbytes` of a streamed part
        (`STREAM_CPU_PER_BYTE`, host CPU-seconds), in the profiled seconds `dev.cpu` runs at."""
        return STREAM_CPU_PER_BYTE * nbytes / self.quota[dev.name].frac

    # ---------------------------------------------------------------- compute
    def t_layer(self, dev: SimDevice, n_tokens: int, pos: int) -> float:
        span = attention_span(pos + n_tokens, self.max_seq)
        return timing(dev, n_tokens).layer("cpu", n_tokens, span, pos=min(span, MIN_SPAN))

    def segment(self, dev: SimDevice, start: int, end: int, n_tokens: int, pos: int, seq: int,
                token: int, name: str) -> Proc:
        r = self.res[dev.name]
        call = dev.spec.call_overhead
        t_l = self.t_layer(dev, n_tokens, pos)
        if r.mode == "lru":  # the page cache decides: faults stall the window's compute
            yield from dev.run_layers(dev.cpu, list(range(start, end)), t_l, name=name, seq=seq, token=token,
                                      tail=0.0 if self.fused else call, tail_name=name)
            if r.window_prefetch:  # the next window, while the rest of the ring computes
                nxt = self.next_layer[(dev.name, end - 1)]
                win = next(s for s in self.segs if s.device == dev.name and s.start == nxt)
                cids = [c for i in range(win.start, win.end) for c in dev.weights.chunks.get(i, ())]
                # as far as the page cache's room holds it (runtime/worker/session.py: WILLNEED of
                # the next window's first lru_room bytes)
                room, ahead = lru_room(r.budget), []
                for c in cids:
                    room -= dev.cache.size[c]  # type: ignore[union-attr]
                    if room < 0:
                        break
                    ahead.append(c)
                self.ctx.env.process(dev.prefetch(ahead, token=token))
            return
        req = self.held.pop(seq, None) if dev.name == self.head else None
        if req is None:
            req = dev.cpu.acquire()
            yield req
        try:
            # (the worker allocates every in-flight sequence's KV cache at set-up, not here)
            if not r.streams:
                yield from dev.cpu.work((end - start) * t_l + (0.0 if self.fused else call), name=name, seq=seq,
                                        token=token)
                return
            for i in range(start, end):
                if r.stream_prefetch:
                    self._prefetch(dev, self.next_layer[(dev.name, i)], token)
                yield from self._ensure(dev, i, token)
                yield from dev.cpu.work(t_l + call + self.stream_cpu(dev, r.streamed.get(i, 0.0)), name=name,
                                        seq=seq, token=token)
                self.state[(dev.name, i)] = None  # evicted right after use
        finally:
            dev.cpu.release(req)

    def head_out(self, n_tokens: int, seq: int, token: int, logits: int = 1) -> Proc:
        """Output layer + sampling on the head (resident, or as far as it fits: plan_residency), for the
        last `logits` positions in one call (a speculative verification needs all of them)."""
        dev = self.ctx.dev(self.head)
        # a fused token pays one call overhead, for the whole model (charged here)
        t = (output_time(dev, logits) + dev.spec.call_overhead
             + self.cfg.sample_cost_per_vocab * self.model.vocab * logits)
        r = self.res[self.head]
        if r.mode == "lru":
            yield from dev.run_chunks(dev.cpu, dev.weights.output_chunks, t, name="output", seq=seq, token=token)
            return
        if r.output_blocks > 1:  # planned: in row blocks, each read (by demand) before its own call
            for b in range(r.output_blocks):
                yield from self._demand(dev, r.output_streamed / r.output_blocks, token)
                yield from dev.cpu.serve(t / r.output_blocks + (dev.spec.call_overhead if b else 0.0)
                                         + self.stream_cpu(dev, r.output_streamed / r.output_blocks), name="output",
                                         seq=seq, token=token)
            return
        if r.output_streamed > 0:  # planned: the part of the output that does not fit, read by demand
            yield from self._demand(dev, r.output_streamed, token)
            t += self.stream_cpu(dev, r.output_streamed)
        if self.hold_head and r.mode != "lru" and seq >= 0:  # kept for the slot's next window
            req = dev.cpu.acquire()
            yield req
            yield from dev.cpu.work(t, name="output", seq=seq, token=token)
            self.held[seq] = req
            return
        yield from dev.cpu.serve(t, name="output", seq=seq, token=token)

    def release_head(self, seq: int) -> None:
        """The slot goes idle: the head's CPU it kept after its last output is free."""
        req = self.held.pop(seq, None)
        if req is not None:
            self.ctx.dev(self.head).cpu.release(req)

    def walk(self, n_tokens: int, pos: int, seq: int, token: int, logits: int = 1) -> Proc:
        m = self.model
        hidden = m.hidden_bytes * n_tokens
        # the head's embedding (a jitted gather, 0.04-0.08 ms probed as `embed_s`) is not charged a call
        prev = self.head
        if seq in self.held and (self.segs[0].device != self.head or self.res[self.head].mode == "lru"):
            self.release_head(seq)  # the first window is not a plain one on the head
        for s in self.segs:
            if s.device != prev:
                yield from self.ctx.net.send(prev, s.device, hidden, seq=seq, token=token)
            label = f"L{s.start}-{s.end - 1}" + (f" lap {s.lap}" if self.plan.k > 1 else "")
            yield from self.segment(self.ctx.dev(s.device), s.start, s.end, n_tokens, pos, seq, token, label)
            prev = s.device
        if prev != self.head:
            yield from self.ctx.net.send(prev, self.head, hidden, seq=seq, token=token)
        yield from self.head_out(n_tokens, seq, token, logits)

    def sequence(self, seq: int) -> Proc:
        P, N = self.cfg.prompt_tokens, self.cfg.tokens
        self.ctx.request(seq, P, N)
        yield from self.walk(P, 0, seq, 0)
        self.ctx.emit(seq, 0)
        for i in range(1, N):
            yield from self.walk(1, P + i - 1, seq, i)
            self.ctx.emit(seq, i)

    def main(self) -> Proc:
        env = self.ctx.env
        yield env.all_of([env.process(self.sequence(s)) for s in range(self.S)])


def run_runtime_ring(ctx: SimContext) -> SimResult:
    rr = RuntimeRing(ctx)
    rr.setup_stats()
    done = ctx.env.process(rr.main())
    ctx.run(until=done)
    per_tok = ctx.cfg.tokens * rr.S
    extra = {"disk_read_bytes_per_token": {n: d.disk_bytes / per_tok for n, d in ctx.devices.items()},
             "residency": {n: {"mode": r.mode, "keep_fraction": r.keep_fraction, "budget": r.budget,
                               "streamed_bytes": sum(r.streamed.values()), "resident_bytes": r.resident_bytes,
                               "stream_prefetch": r.stream_prefetch, "window_prefetch": r.window_prefetch}
                           for n, r in rr.res.items()},
             "engine": "primasim-runtime"}
    return ctx.result(extra=extra)


# ------------------------------------------------------------------------------------ batch
def run_runtime_batch(ctx: SimContext) -> SimResult:
    """runtime/batch.py BatchServer: identical requests (the prompt repeated), admitted up to the
    batch size while the KV pool holds their whole length; each admitted request is prefilled
    alone, then every running request decodes one token per step in one call padded to a
    power-of-two bucket. Weights are pinned (no disk)."""
    plan, m, cfg, env = ctx.plan, ctx.model, ctx.cfg, ctx.env
    assert plan is not None
    act = plan.active
    if len(act) != 1:
        return infeasible(plan.system, "a batch plan runs the whole model on one device", plan, cfg)
    dev = ctx.dev(act[0].name)
    o = plan.options
    n_req = int(cfg.requests if cfg.batch is not None or "requested_batch" not in o else o["requested_batch"])
    max_batch = int(cfg.batch or o.get("batch", 64))
    P, N = cfg.prompt_tokens, cfg.tokens
    need = P + N
    block = int(o.get("tile_tokens", BLOCK_TOKENS))
    per_req_blocks = math.ceil(need / block)
    block_bytes = float(kv_bytes(m.n_layers, block, m.n_kv_heads, m.head_dim))
    pinned = float(m.total_bytes)
    # runtime/batch.py kv_budget: half of the room the memory limit leaves; the emulator's limit is
    # the worker's footprint (pinned weights included) + the device's budget, i.e. ram_avail
    pool_blocks = int(max(0.0, KV_POOL_SHARE * dev.spec.ram_avail) // block_bytes)
    max_seq = need
    if o.get("kv_bytes"):  # the pool's size given: the run keeps the warm-up's shapes (setup's max_seq)
        pool_blocks = int(float(o["kv_bytes"]) // block_bytes)
        max_seq = max(need, plan.n_ctx)
    if pool_blocks - 1 < per_req_blocks:
        return infeasible(plan.system, f"the KV pool ({pool_blocks} blocks) cannot hold one request", plan, cfg)
    cap = max(1, min(max_batch, (pool_blocks - 1) // per_req_blocks))
    rec = ctx.rec
    rec.set(dev.name, "mem_total", dev.spec.ram_total)
    rec.set(dev.name, "mem_avail_before", dev.spec.ram_avail)
    anon = pinned + ACT_RESERVE + min(n_req, cap) * per_req_blocks * block_bytes
    rec.set(dev.name, "mem_avail_min", dev.spec.ram_avail - anon)
    call = dev.spec.call_overhead
    dev.cpu.throttle = CpuQuota(dev, cfg.cpu_quota_bursts, tick=cfg.sched_tick).duration

    def forward(n_tok_per_seq: int, seqs: int, pos: int) -> float:
        """One call per window + output for `seqs` sequences of `n_tok_per_seq` tokens (the
        embedding, a gather, is not charged a call: `RuntimeRing.embed`)."""
        rows = n_tok_per_seq * seqs
        tm = timing(dev, rows)
        span = attention_span(pos + n_tok_per_seq, max_seq, block)
        flops = tm._flop_time(dev.spec.cpu_flops, min(span, MIN_SPAN), rows)
        kv_read = m.kv_bytes_per_token() * span * seqs
        per_layer = flops + dev.spec.kv_copy * rows + (m.layer_bytes + kv_read) / tm.dev.ram_bw
        windows = len([s for s in plan.segments() if s.device == dev.name])
        out = output_time(dev, seqs)  # the output layer runs on each sequence's last row
        return m.n_layers * per_layer + (windows + 1) * call + out

    def engine() -> Proc:
        if dev.spec.alloc_bw > 0 and not o.get("kv_bytes"):
            # a pool of known size is allocated at set-up; otherwise when the batch starts
            yield from dev.cpu.serve(pool_blocks * block_bytes / dev.spec.alloc_bw, name="kv pool alloc")
        waiting = list(range(n_req))
        for r in waiting:
            ctx.request(r, P, N)
        running: list[int] = []
        made: dict[int, int] = {}
        while waiting or running:
            new = []
            while waiting and len(running) + len(new) < cap:
                new.append(waiting.pop(0))
            for r in new:
                yield from dev.cpu.serve(forward(P, 1, 0), name=f"prefill {P} tokens", seq=r, token=0)
                ctx.emit(r, 0)
                made[r] = 1
                if made[r] < N:
                    running.append(r)
            if not running:
                continue
            b = batch_bucket(len(running))
            pos = P + made[running[0]] - 1
            yield from dev.cpu.serve(forward(1, b, pos), name=f"decode batch {len(running)} (padded {b})",
                                     seq=0, token=-1)
            still = []
            for r in running:
                ctx.emit(r, made[r])
                made[r] += 1
                if made[r] < N:
                    still.append(r)
            running = still

    done = env.process(engine())
    ctx.run(until=done)
    return ctx.result(extra={"engine": "primasim-runtime", "batch_cap": cap, "kv_pool_blocks": pool_blocks})


def run_runtime(ctx: SimContext) -> SimResult:
    """Simulate `ctx.plan` as primasim's runtime executes it."""
    assert ctx.plan is not None
    if ctx.plan.schedule == "batch":
        return run_runtime_batch(ctx)
    if ctx.plan.schedule not in ("ring", "rpp"):
        return infeasible(ctx.system, f"the runtime does not execute schedule {ctx.plan.schedule!r}",
                          ctx.plan, ctx.cfg)
    return run_runtime_ring(ctx)
