"""Ring schedules: a token walks the plan's segments device by device, lap after lap.

One walker covers prima.cpp's piped ring (k laps, per-device windows, GPU/CPU split, prefetch of
the next window), plain pipelines (k = 1: prima w/o Halda's memory-ratio split, exo), a single
device (llama.cpp: a ring of one), and MDI-LLM's recurrent pipeline (S sequences walk the ring at
once and queue at the busy device's compute server, so no device idles when S >= N).

Per segment: receive the hidden state (4e bytes per token over the network), copy it to VRAM if
the window starts on a discrete GPU, run the GPU layers, copy back, run the CPU layers (each layer
first faults in whatever of its weights is not resident), then, with prefetch on, madvise the
device's *next* window so the disk fills the page cache while the other devices work. The head
reads one embedding row per token and runs the output layer and sampling on its CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from primasim.core.plan import Plan, Segment

from ._context import SimContext, SimResult
from ._devices import DEMAND, SimDevice
from ._engine import Proc
from ._timing import kv_span


@dataclass(frozen=True)
class RingOptions:
    """What distinguishes the ring-shaped systems from each other (beyond their plans)."""

    msg_overhead: float = 0.0  # sender-side software cost per hop (RPC, serialisation), seconds
    status_broadcasts: int = 0  # small messages to every peer per segment (exo's opaque status)
    result_broadcast: bool = False  # the sampled token goes to every peer (exo's broadcast_result)
    broadcast_bytes: float = 256.0
    sequences: int = 1  # sequences in flight (MDI-LLM's S)
    output_on_gpu: bool = False  # llama.cpp -ngl > L puts the output layer on the GPU
    compute_scale: float = 1.0  # engine efficiency relative to llama.cpp's kernels (time multiplier)
    layer_overhead: float = 0.0  # fixed seconds per transformer block (and per output layer) of an
    # eager-mode engine: Python dispatch + kernel launches, independent of the block's size
    overhead_on_compute: bool = False  # the per-message cost blocks the sender's compute (one
    # Python process: pickling holds the GIL), instead of only delaying the message


def ring_head(plan: Plan) -> str:
    """The device that embeds, samples and runs the output layer.

    The plan's first device, unless it has no layers and only one device is left in the ring
    (device selection collapsed the ring onto one device: prima.cpp then is llama.cpp there).
    """
    active = plan.active
    if plan.devices[0].layers == 0 and len(active) == 1:
        return active[0].name
    return plan.devices[0].name


class Ring:
    def __init__(self, ctx: SimContext, opts: RingOptions) -> None:
        assert ctx.plan is not None
        self.ctx = ctx
        self.opts = opts
        self.plan = plan = ctx.plan
        self.model = ctx.model
        self.cfg = ctx.cfg
        self.mmap = plan.weights == "mmap"
        self.prefetch = self.mmap and (ctx.cfg.prefetch if ctx.cfg.prefetch is not None else plan.prefetch)
        self.segs: list[Segment] = plan.segments()
        self.head = ring_head(plan)
        self.ring_names = [d.name for d in plan.active]
        if self.head not in self.ring_names:
            self.ring_names.insert(0, self.head)
        ctx.setup_plan_memory(mmap=self.mmap)
        self._register_weights()
        # next window of the same device, for each segment (prefetch target)
        by_dev: dict[str, list[int]] = {}
        for i, s in enumerate(self.segs):
            by_dev.setdefault(s.device, []).append(i)
        self.next_window: dict[int, int] = {}
        for idxs in by_dev.values():
            for j, i in enumerate(idxs):
                self.next_window[i] = idxs[(j + 1) % len(idxs)]

    # ---------------------------------------------------------------- weights
    def _register_weights(self) -> None:
        self.window_chunks: list[list[int]] = [[] for _ in self.segs]
        self.output_chunks: list[int] = []
        if not self.mmap:
            return
        cpl = self.cfg.chunks_per_layer
        m = self.model
        for i, s in enumerate(self.segs):
            dev = self.ctx.dev(s.device)
            for layer in range(s.start, s.end):
                on_gpu = layer - s.start < s.gpu_layers
                if on_gpu and not dev.spec.uma:
                    continue  # CUDA layers are copied into VRAM at load: never faulted
                ids = dev.register_chunks(layer, m.layer_bytes, cpl, metal=on_gpu, base=layer * cpl)
                self.window_chunks[i].extend(ids)
        head = self.ctx.dev(self.head)
        chunk = m.layer_bytes / cpl
        n_out = max(1, math.ceil(m.output_bytes / chunk))
        self.output_chunks = head.register_chunks(-1, m.output_bytes, n_out, metal=False,
                                                  base=m.n_layers * cpl)

    # ---------------------------------------------------------------- one pass of the ring
    def _segment(self, i: int, s: Segment, n_tokens: int, kv: tuple[int, int], seq: int, token: int) -> Proc:
        dev = self.ctx.dev(s.device)
        name = f"L{s.start}-{s.end - 1}" + (f" lap{s.lap}" if self.plan.k > 1 else "")
        hidden = self.model.hidden_bytes * n_tokens
        gpu_layers = list(range(s.start, s.start + s.gpu_layers))
        cpu_layers = list(range(s.start + s.gpu_layers, s.end))
        nxt = self.segs[i + 1].device if i + 1 < len(self.segs) else self.head
        # a per-message cost that blocks this device's compute is paid in the same hold as the
        # compute that produced the message (MDI-LLM: the node's one Python process pickles it)
        tail = self.opts.msg_overhead if (self.opts.overhead_on_compute and nxt != s.device) else 0.0
        scale = self.opts.compute_scale
        if gpu_layers:
            assert dev.gpu is not None
            t_copy = dev.timing.host_copy(hidden)
            if t_copy > 0:
                yield from dev.pcie.serve(t_copy, name="h2d", seq=seq, token=token, nbytes=hidden)
            yield from dev.run_layers(dev.gpu, gpu_layers, scale * dev.timing.layer("gpu", n_tokens, *kv)
                                      + self.opts.layer_overhead,
                                      name=name, seq=seq, token=token, tail=0.0 if cpu_layers else tail,
                                      tail_name="serialise")
            if t_copy > 0:
                yield from dev.pcie.serve(t_copy, name="d2h", seq=seq, token=token, nbytes=hidden)
        if cpu_layers:
            yield from dev.run_layers(dev.cpu, cpu_layers, scale * dev.timing.layer("cpu", n_tokens, *kv)
                                      + self.opts.layer_overhead,
                                      name=name, seq=seq, token=token, tail=tail, tail_name="serialise")
        if self.prefetch and dev.cache is not None:
            nxt = self.window_chunks[self.next_window[i]]
            if nxt:
                self.ctx.env.process(dev.prefetch(nxt, token=token))
        if self.opts.status_broadcasts:
            self._broadcast(dev.name, self.opts.status_broadcasts, seq, token)

    def _broadcast(self, src: str, count: int, seq: int, token: int) -> None:
        env = self.ctx.env
        for peer in self.ring_names:
            if peer != src:
                for _ in range(count):
                    env.process(self.ctx.net.send(src, peer, self.opts.broadcast_bytes, name="status",
                                                  seq=seq, token=token, overhead=self.opts.msg_overhead))

    def _hop(self, a: str, b: str, nbytes: float, seq: int, token: int, *, first: bool = False) -> Proc:
        over = 0.0 if self.opts.overhead_on_compute else self.opts.msg_overhead
        if first and self.opts.overhead_on_compute and self.opts.msg_overhead > 0:
            # the pass starts on a head without layers: it serialises the embedded token itself
            yield from self.ctx.dev(a).cpu.serve(self.opts.msg_overhead, name="serialise", seq=seq, token=token)
        yield from self.ctx.net.send(a, b, nbytes, seq=seq, token=token, overhead=over)

    def walk(self, n_tokens: int, kv: tuple[int, int], seq: int, token: int, logits: int = 1) -> Proc:
        """One forward pass of `n_tokens` tokens of sequence `seq` around the ring; the head computes
        the logits of the last `logits` positions (a speculative verification needs all of them)."""
        ctx, m = self.ctx, self.model
        head: SimDevice = ctx.dev(self.head)
        if self.mmap:
            # the token embedding is one row of a table that is never resident: one small read
            yield from head.read(m.input_bytes / m.vocab * n_tokens, priority=DEMAND, name="embedding", token=token)
        hidden = m.hidden_bytes * n_tokens
        prev = self.head
        for i, s in enumerate(self.segs):
            if s.device != prev:
                yield from self._hop(prev, s.device, hidden, seq, token, first=i == 0)
            yield from self._segment(i, s, n_tokens, kv, seq, token)
            prev = s.device
        if prev != self.head:
            yield from self._hop(prev, self.head, hidden, seq, token)
        where = "gpu" if (self.opts.output_on_gpu and head.gpu is not None) else "cpu"
        # logits for the last token only (llama.cpp requests no others for a prompt)
        t_out = self.opts.compute_scale * head.timing.output(logits, where) + self.opts.layer_overhead
        t_sample = self.cfg.sample_cost_per_vocab * m.vocab * logits
        server = head.gpu if where == "gpu" and head.gpu is not None else head.cpu
        if self.output_chunks and where == "cpu":
            yield from head.run_chunks(server, self.output_chunks, t_out, name="output", seq=seq, token=token)
        else:
            yield from server.serve(t_out, name="output", seq=seq, token=token)
        if t_sample > 0:
            yield from head.cpu.serve(t_sample, name="sample", seq=seq, token=token)
        if self.opts.result_broadcast:
            self._broadcast(self.head, 1, seq, token)

    # ---------------------------------------------------------------- a whole generation
    def n_kv(self, filled: int) -> tuple[int, int]:
        """(KV positions read, positions attended) with `filled` tokens in the context."""
        return kv_span(self.cfg.kv_read, self.plan.n_ctx, filled)

    def sequence(self, seq: int) -> Proc:
        cfg, ctx = self.cfg, self.ctx
        P, N = cfg.prompt_tokens, cfg.tokens
        ctx.request(seq, P, N)
        yield from self.walk(P, self.n_kv(P), seq, 0)
        ctx.emit(seq, 0)
        if seq == 0:
            ctx.sample_residency()
        for i in range(1, N):
            yield from self.walk(1, self.n_kv(P + i), seq, i)
            ctx.emit(seq, i)
            if seq == 0:
                ctx.sample_residency()

    def main(self) -> Proc:
        env = self.ctx.env
        if self.cfg.warmup:
            yield from self.walk(1, self.n_kv(self.cfg.prompt_tokens), -1, -1)
            # drain background reads so the timed part starts from the steady state (wait on the
            # reads themselves: one event per read, not a poll)
            while True:
                pending = [ev for d in self.ctx.devices.values() for ev in d.loading.values()]
                if not pending:
                    break
                yield env.all_of(pending)
            self._reset_counters()
        self.ctx.sample_residency()
        procs = [env.process(self.sequence(s)) for s in range(self.opts.sequences)]
        yield env.all_of(procs)

    def _reset_counters(self) -> None:
        """Start the measured run at t = 0 of a clean trace (warm-up is not reported)."""
        ctx = self.ctx
        t0 = ctx.env.now
        tr = ctx.trace
        ctx.rec.clear_spans()
        ctx.trace.meta["t_warmup_end"] = t0
        for st in tr.device_stats.values():
            for k in list(st):
                if k in ("disk_read_bytes", "net_tx_bytes", "net_rx_bytes", "page_faults", "stall_s") \
                        or k.startswith("tx_bytes_to:"):
                    st[k] = 0.0
        for dev in ctx.devices.values():
            dev.disk_bytes = 0.0
            dev.stall = 0.0
            if dev.cache is not None:
                dev.cache.stats = type(dev.cache.stats)()
        ctx.net.messages = 0
        self.t0 = t0


def run_ring(ctx: SimContext, opts: RingOptions) -> SimResult:
    ring = Ring(ctx, opts)
    ring.t0 = 0.0
    done = ctx.env.process(ring.main())
    ctx.run(until=done)
    _shift(ctx, getattr(ring, "t0", 0.0))
    per_tok = ctx.cfg.tokens * opts.sequences
    extra = {"disk_read_bytes_per_token": {n: d.disk_bytes / per_tok for n, d in ctx.devices.items()}}
    return ctx.result(extra=extra)


def _shift(ctx: SimContext, t0: float) -> None:
    """Make the warm-up end t = 0 for every timestamp of the trace."""
    if t0 <= 0:
        return
    tr = ctx.trace
    for s in tr.spans:
        s.start -= t0
        s.end -= t0
    for t in tr.tokens:
        t.time -= t0
    for r in tr.requests:
        r.arrival -= t0
    tr.samples = [s for s in tr.samples if s.time >= t0]
    for s in tr.samples:
        s.time -= t0
