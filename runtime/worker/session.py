"""One driver's run on a worker: set-up (stage, KV caches, ring link), residency (LOAD), the ring's
compute loop, the head's sampling, and the measurements the driver collects."""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from primasim.core.errors import WorkerError

from .. import wire
from .._measure import IoCounter, MemorySampler, meminfo, own_cgroup, read_int
from ..pages import advise_random, drop_pages, mapped_spans, split_ranges, touch_pages
from ..wire import Message, MsgType
from .prefetcher import Prefetcher
from .recorder import MEM_SAMPLE, Recorder
from .sender import Sender
from .stage import Stage

if TYPE_CHECKING:
    from .server import Worker


@dataclass
class SeqState:
    ids: list[int]
    max_new: int
    rng: np.random.Generator
    generated: list[int]
    done: bool = False


class Session:
    """One driver's run on this worker: the stage, the ring, the sequences (head), measurements."""

    def __init__(self, worker: Worker, setup: dict[str, Any]) -> None:
        self.w = worker
        self.cfg = setup
        self.name: str = setup["device"]
        self.head: bool = setup["head"]
        self.segments: list[list[Any]] = setup["segments"]  # [device, lap, start, end]
        self.ring: list[str] = setup["ring"]
        self.successor: str = setup["successor"]
        self.mine = [i for i, s in enumerate(self.segments) if s[0] == self.name]
        self.windows = [(int(self.segments[i][2]), int(self.segments[i][3])) for i in self.mine]
        self.win_of_seg = {seg: w for w, seg in enumerate(self.mine)}
        self.rec = Recorder()
        self.io = IoCounter()
        self.mem = MemorySampler(sink=lambda t, v: self.rec.sample(MEM_SAMPLE, t, v))
        self.prefetch_on = bool(setup.get("prefetch", False))
        self.layer_stream: dict[int, list[tuple[str, int, int]]] = {}  # per layer, evicted after use
        self.layer_spans: dict[int, list[tuple[int, int]]] = {}
        self.stream_prefetch = False
        self.resident_bytes = 0
        t0 = time.time()
        path = worker.model_override or setup["model_path"]
        if not os.path.exists(path):
            raise WorkerError(f"model file not found at {path}", where=f"device {self.name}",
                              fix="copy the model to the same path on every device, or start the worker "
                                  "with --model PATH")
        self.stage = Stage(path, self.windows, head=self.head, weights=setup.get("weights", "mmap"),
                           max_seq=int(setup["max_seq"]))
        fp = setup.get("fingerprint")
        if fp and self.stage.fingerprint() != fp:
            raise WorkerError(f"model file {path} differs from the head's (fingerprint "
                              f"{self.stage.fingerprint()[:16]}... != {fp[:16]}...)", where=f"device {self.name}",
                              fix="copy the exact same checkpoint to every device")
        self.load_s = time.time() - t0
        t0 = time.time()
        self._warmup(setup.get("warmup_lengths", [1]))
        self.warmup_s = time.time() - t0
        # the runtime's own memory (JAX, compiled windows) is not the run's: measure pressure from here
        pinned = self.stage.weight_bytes() if setup.get("weights", "mmap") == "pinned" else 0
        self.mem.set_before(discount=pinned)
        # KV caches are allocated here, at set-up, as llama.cpp allocates its context's: never
        # inside a measured token (a first allocation after warm-up costs ~10 ms per array under
        # a CPU quota). One per sequence the schedule keeps in flight; a finished sequence's
        # cache is reused (positions past a sequence's own are masked, so stale entries are inert).
        self.kv: dict[int, Any] = {}
        self.spare_kv: list[Any] = []
        self.batch_pool: Any = None
        opts = setup.get("options", {}) or {}
        if setup.get("schedule") == "batch":
            from ..batch import BatchServer

            self.batch_pool = BatchServer.preallocate(self.stage, opts, int(setup["max_seq"]))
        else:
            import jax

            n_seq = int(opts.get("S") or len(self.ring)) if setup.get("schedule") == "rpp" else 1
            self.spare_kv = [self.stage.new_kv() for _ in range(max(1, n_seq))]
            jax.block_until_ready(self.spare_kv)
        self.sender: Sender | None = None
        if len(self.ring) > 1:
            self.sender = Sender(worker.ctx, setup["successor_data"], float(setup.get("latency", 0.0)),
                                 float(setup.get("jitter", 0.0)), int(setup.get("seed", 0)) + 7919 * self.ring.index(self.name),
                                 self.rec, worker.keys, self.successor)
            try:
                self.sender.start(float(setup.get("connect_timeout", 30.0)))
            except WorkerError as exc:
                raise WorkerError(exc.what, where=f"device {self.name}", fix=exc.fix) from None
        self.prefetcher: Prefetcher | None = None
        if self.prefetch_on:
            self.prefetcher = Prefetcher(self.stage, self.rec)
            self.prefetcher.start()
        self.seqs: dict[int, SeqState] = {}
        self.work: collections.deque[tuple[int, int, np.ndarray, int, int]] = collections.deque()
        self.rx_n = 0  # activations received from the ring predecessor (this generation)
        self.rx_t: float | None = None
        self.busy_since: float | None = None  # computing since (None: waiting for input)
        self.item_since: float | None = None  # the current window (activation) started
        self.item_times: collections.deque[float] = collections.deque(maxlen=64)  # recent window times (s)
        self.idle_from = time.time()
        self.idle_since: float | None = None
        self.sample_at: float | None = None
        self.gen_opts: dict[str, Any] = {}
        self.pending: collections.deque[int] = collections.deque()

    # ---------------------------------------------------------------------------- set-up
    def _warmup(self, lengths: list[int]) -> None:
        """Compile every shape the run will use (windows, one layer for streaming, the head's
        embedding and output) so compilation never lands inside a measured token."""
        if self.cfg.get("schedule") == "batch":
            from ..batch import BatchServer, block_tokens

            o = self.cfg.get("options", {})
            # with the pool's size given (options kv_bytes) the warm-up compiles the run's shapes
            BatchServer.warmup(self.stage, [int(x) for x in lengths], int(self.cfg.get("max_batch", 1)),
                               block_tokens(o), max_seq=int(self.cfg["max_seq"]) if o.get("kv_bytes") else None,
                               kv_bytes=o.get("kv_bytes"))
            return
        kv = self.stage.new_kv()
        steps = [(int(n), 0) for n in sorted(set(int(x) for x in lengths if int(x) > 0))]
        # one decode step at the first position of every attention-span bucket the KV length
        # reaches (256, 512, ...): each is a new compiled shape, which would otherwise compile
        # inside a token and add its code (~7 MiB a worker) to memory mid-run
        steps += [(1, pos) for pos in self.stage.bucket_starts()]
        for n, pos in steps:
            x = np.zeros((1, n, self.stage.spec.hidden), np.float32)
            for s, e in self.windows:
                x, kv = self.stage.run(kv, x, pos, s, e)
            if self.stream_layerwise() and self.windows:
                s = self.windows[0][0]
                _, kv = self.stage.run(kv, x, pos, s, s + 1)
            if self.head and pos == 0:
                self.stage.logits(self.stage.embed([0] * n))

    def _anon_reserve(self) -> int:
        """Memory the run will still allocate after LOAD: the KV caches of the sequences in
        flight (allocated on first use) plus 8 MiB for activations and the allocator."""
        sp = self.stage.spec
        kv = 2 * len(self.stage.layers) * int(self.cfg["max_seq"]) * sp.n_kv_heads * sp.head_dim * 4
        return kv * max(1, int(self.cfg.get("in_flight", 1))) + (8 << 20)

    def stream_layerwise(self) -> bool:
        return bool(self.cfg.get("streaming", True)) and self.cfg.get("weights", "mmap") == "mmap"

    def release(self) -> dict[str, Any]:
        """Drop this worker's weight pages (a cold start; also lets the emulator measure the
        runtime's own footprint before it sets the memory limit)."""
        ranges = self.stage.all_ranges()
        drop_pages(ranges)
        return {"bytes": sum(r[2] for r in ranges)}

    def load(self) -> dict[str, Any]:
        """Load the weights into memory, within the device's memory budget.

        When the weights do not fit, the worker plans residency itself instead of leaving it to
        the kernel's LRU, which re-reads nearly every page of a cyclic scan larger than memory: it
        keeps a fraction r of every layer and streams the rest of each layer from disk, evicting it
        right after use (MADV_DONTNEED + POSIX_FADV_DONTNEED). Memory then never fills up, so the
        kernel need not reclaim and the kept part stays resident without mlock (which would turn a
        small misestimate of the other memory into an OOM kill instead of a few re-reads). A token
        re-reads the streamed bytes, about the bytes that do not fit, as prima.cpp's cost model has
        it (T_disk = (bytes - available) / disk speed). The streamed part of the layer being
        computed (with prefetch, also of the next one) needs room: r is the largest fraction with
        r * window + c * (1 - r) * layer <= budget (c = 1, or 2 with prefetch), so streamed bytes
        = missing bytes + about c streamed layer parts."""
        t0 = time.time()
        # the memory this device has for weights, measured now (LOAD follows RELEASE, so our
        # weights are out of memory): in a memory cgroup (an emulated device, a container) the
        # limit minus what the cgroup holds (anon memory, library code pages); else prima.cpp's
        # d_avail, MemAvailable x 0.8; minus what the run will still allocate
        cg = own_cgroup("memory")
        limit = read_int(cg / "memory.limit_in_bytes", 1 << 62) if cg is not None else 1 << 62
        if cg is not None and limit < 1 << 60:
            budget = float(limit - read_int(cg / "memory.usage_in_bytes") - self._anon_reserve())
        else:
            budget = 0.8 * meminfo().get("MemAvailable", 1 << 62) - self._anon_reserve()
        layers = [i for s, e in self.windows for i in range(s, e)]
        lay_ranges = {i: self.stage.layer_ranges(i) for i in layers}
        lay_bytes = {i: sum(r[2] for r in rs) for i, rs in lay_ranges.items()}
        # the head reads all of the output layer per token but one row of the embedding: the
        # embedding is left to the kernel (neither kept nor evicted)
        out = self.stage.output_ranges()
        out_b = sum(r[2] for r in out)
        total = sum(lay_bytes.values()) + out_b
        self.layer_stream = {}
        self.layer_spans: dict[int, list[tuple[int, int]]] = {}
        pinned = self.cfg.get("weights", "mmap") == "pinned"
        kernel = self.cfg.get("residency") == "kernel"
        fits = pinned or total <= budget or kernel or not layers
        if self.head and not pinned:
            # one embedding row is read per token: without MADV_RANDOM each row's page fault reads
            # the disk's whole readahead window around it (8 MiB here), filling the budget
            advise_random(self.stage.input_ranges())
        info: dict[str, Any] = {"window_bytes": float(sum(lay_bytes.values())), "output_bytes": float(out_b),
                                "budget": budget, "residency": "pinned" if pinned else "fits" if total <= budget
                                else "kernel" if kernel or not layers else "planned"}
        if fits:
            self.resident_bytes = total
            # the embedding (one row read per token) is loaded too only if it also fits: touching it
            # past the budget made the kernel evict the window, which the first token re-read
            inp = self.stage.input_ranges()
            if not pinned and total + sum(r[2] for r in inp) > budget:
                inp = []
            # pinned weights are copies in anonymous memory: their file pages are not used
            touched = 0 if pinned else touch_pages([r for i in layers for r in lay_ranges[i]] + out + inp)
            return info | {"resident_bytes": total, "streamed_bytes": 0, "touched": touched,
                           "load_s": time.time() - t0}
        big = max(lay_bytes.values())
        lt = sum(lay_bytes.values())
        avail = budget - out_b

        def keep_fraction(c: float) -> float:
            return max(0.0, min(1.0, (avail - c * big) / (lt - c * big))) if lt > c * big else 0.0

        r = keep_fraction(1.0)
        # prefetching the next layer's streamed part needs room for two; when the window is too
        # small for that (r would be 0), stream without prefetching the streamed parts
        self.stream_prefetch = self.prefetch_on and keep_fraction(2.0) > 0.0
        if self.stream_prefetch:
            r = keep_fraction(2.0)
        keep: list[tuple[str, int, int]] = list(out)
        for i in layers:
            k, st = split_ranges(lay_ranges[i], r * lay_bytes[i])
            keep += k
            self.layer_stream[i] = st
            self.layer_spans[i] = mapped_spans(st)
        touch_pages(keep)
        self.resident_bytes = sum(x[2] for x in keep)
        streamed = sum(x[2] for st in self.layer_stream.values() for x in st)
        return info | {"resident_bytes": self.resident_bytes, "streamed_bytes": streamed,
                       "keep_fraction": r, "stream_prefetch": self.stream_prefetch, "load_s": time.time() - t0}

    # ---------------------------------------------------------------------------- compute
    def on_act(self, msg: Message) -> None:
        now = time.time()
        if self.idle_since is not None:
            self.rec.span("wait", self.idle_since, now, "wait for input", msg.seq, msg.step)
        self.rec.add("net_rx_bytes", msg.nbytes + wire.HEADER_SIZE)
        self.rx_n += 1
        self.rx_t = now
        assert msg.array is not None
        self.work.append((msg.seq, msg.segment, np.array(msg.array), msg.pos, msg.step))
        self.drain()

    def drain(self) -> None:
        self.busy_since = time.time()
        try:
            while self.work:
                seq, seg, x, pos, step = self.work.popleft()
                self.item_since = t0 = time.time()
                self._advance(seq, seg, x, pos, step)
                self.item_times.append(time.time() - t0)
        finally:
            self.busy_since = self.item_since = None
            self.idle_from = self.idle_since = time.time()

    def ring_state(self) -> dict[str, Any]:
        """Where this device is in the ring, for the driver's stall diagnosis (read by the control
        thread while the compute thread runs: plain reads of numbers, ages in seconds)."""
        now = time.time()
        busy, item, rx_t, snd = self.busy_since, self.item_since, self.rx_t, self.sender
        times = sorted(self.item_times)
        out: dict[str, Any] = {"rx": self.rx_n, "rx_age": None if rx_t is None else now - rx_t,
                               "busy_age": None if busy is None else now - busy,
                               # one window computing for far longer than usual = a hung compute thread
                               "item_age": None if item is None else now - item,
                               "item_median": times[len(times) // 2] if len(times) >= 3 else None,
                               "idle_age": None if busy is not None else now - self.idle_from,
                               "tx": 0, "tx_log": []}
        if snd is not None:
            out["tx"] = snd.tx_n
            out["tx_log"] = [[n, now - t] for n, t in list(snd.tx_log)]
        return out

    def on_idle(self) -> None:
        """Nothing arrived for a millisecond: read the counters now, off the ring's critical path
        (reading /proc right after a send delays the next device on a busy host)."""
        self._sample_counters()

    def _advance(self, seq: int, seg: int, x: np.ndarray, pos: int, step: int) -> None:
        n = len(self.segments)
        while seg < n and self.segments[seg][0] == self.name:
            x = self._compute(seq, seg, x, pos, step)
            seg += 1
        if seg == n and self.head:
            self._finish(seq, x, pos, step)
            return
        self._send(seq, seg, x, pos, step)

    def _compute(self, seq: int, seg: int, x: np.ndarray, pos: int, step: int) -> np.ndarray:
        w = self.win_of_seg[seg]
        s, e = self.windows[w]
        if seq not in self.kv:
            self.kv[seq] = self.spare_kv.pop() if self.spare_kv else self.stage.new_kv()
        kv = self.kv[seq]
        t0 = time.time()
        if self.layer_stream and self.cfg.get("weights", "mmap") == "mmap":
            for i in range(s, e):
                if self.prefetcher is not None and self.stream_prefetch:
                    nxt = i + 1 if i + 1 < e else self.windows[(w + 1) % len(self.windows)][0]
                    self.prefetcher.post(f"layer {nxt}", self.layer_stream.get(nxt, []))
                x, kv = self.stage.run(kv, x, pos, i, i + 1)
                drop_pages(self.layer_stream.get(i, []), self.layer_spans.get(i))
        else:
            x, kv = self.stage.run(kv, x, pos, s, e)
            if self.prefetcher is not None:
                nw = (w + 1) % len(self.windows)
                if nw != w or len(self.windows) == 1:
                    self.prefetcher.post(f"window {nw}", self.stage.window_ranges(nw))
        t1 = time.time()
        self.kv[seq] = kv
        self.rec.span("cpu", t0, t1, f"L{s}-{e - 1} lap {self.segments[seg][1]}", seq, step)
        self.rec.add("compute_s", t1 - t0)
        self.sample_at = t1  # counters are read once the activation is on its way (not on the hop)
        return x

    def _sample_counters(self) -> None:
        if self.sample_at is not None:
            t = self.sample_at
            self.sample_at = None
            self.rec.sample("disk_read_bytes", t, self.io.read_bytes())
            self.rec.sample("major_faults", t, self.io.major_faults())
            self.mem.sample()

    def _send(self, seq: int, seg: int, x: np.ndarray, pos: int, step: int) -> None:
        if self.sender is None:
            raise WorkerError(f"segment {seg} needs another device but this worker has no ring successor",
                              where=f"device {self.name}", fix="check the plan")
        if self.sender.error is not None:
            raise WorkerError(f"sending to {self.successor} failed: {self.sender.error}", where=f"device {self.name}",
                              fix="check the network")
        lap = int(self.segments[seg][1]) if seg < len(self.segments) else 0
        frames = wire.encode(MsgType.ACT, array=x, seq=seq, pos=pos, step=step, lap=lap, segment=seg)
        self.sender.post(frames, {"seq": seq, "step": step})

    # ---------------------------------------------------------------------------- head
    def generate(self, obj: dict[str, Any]) -> None:
        if not self.head:
            raise WorkerError("GENERATE sent to a worker that is not the head", where=f"device {self.name}",
                              fix="send GENERATE to the plan's first device")
        self.gen_opts = obj
        self.reset_measurements()
        self.recycle_kv()
        if obj.get("schedule") == "batch":
            from ..batch import BatchServer

            t0 = time.time()
            server = BatchServer(self.stage, {**obj, "setup_max_seq": int(self.cfg["max_seq"])}, self.rec,
                                 self.w.emit, self.io, self.mem, pool=self.batch_pool)
            self.rec.span("cpu", t0, time.time(), "kv pool alloc", 0, 0)
            server.run()
            return
        seed = int(obj.get("seed", 0))
        for i, ids in enumerate(obj["prompts"]):
            self.seqs[i] = SeqState(list(ids), int(obj["max_new_tokens"]), np.random.default_rng([seed, i]), [])
        in_flight = max(1, int(obj.get("in_flight", 1)))
        self.pending = collections.deque(sorted(self.seqs))
        for _ in range(min(in_flight, len(self.pending))):
            self._start_seq(self.pending.popleft())
        self.drain()

    def _start_seq(self, seq: int) -> None:
        st = self.seqs[seq]
        t0 = time.time()
        x = self.stage.embed(st.ids)
        self.rec.span("cpu", t0, time.time(), "embed", seq, 0)
        self.work.append((seq, 0, x, 0, 0))

    def _finish(self, seq: int, x: np.ndarray, pos: int, step: int) -> None:
        st = self.seqs[seq]
        o = self.gen_opts
        t0 = time.time()
        logits = self.stage.logits(x)
        tok = self.stage.sample(logits, st.rng, float(o.get("temperature", 0.0)), int(o.get("top_k", 0)),
                                float(o.get("top_p", 1.0)))
        t1 = time.time()
        self.rec.span("cpu", t0, t1, "output+sample", seq, step)
        st.generated.append(tok)
        payload: dict[str, Any] = {"seq": seq, "index": step, "token_id": tok, "time": t1}
        if o.get("return_logits"):
            payload["logits"] = logits.astype(float).tolist()
        self.w.emit(MsgType.TOKEN, payload)
        stop = set(o.get("stop_ids", []))
        if len(st.generated) >= st.max_new or tok in stop:
            st.done = True
            kv = self.kv.pop(seq, None)
            if kv is not None:
                self.spare_kv.append(kv)
            if self.pending:
                self._start_seq(self.pending.popleft())
            elif all(s.done for s in self.seqs.values()):
                self._done()
            return
        t0 = time.time()
        xe = self.stage.embed([tok])
        self.rec.span("cpu", t0, time.time(), "embed", seq, step + 1)
        self.work.append((seq, 0, xe, pos + x.shape[1], step + 1))

    def _done(self) -> None:
        self.w.emit(MsgType.DONE, {"tokens": {str(k): v.generated for k, v in self.seqs.items()}})

    # ---------------------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        if self.sender is not None:
            self.sender.idle.wait(timeout=5.0)
        self._sample_counters()
        self.mem.sample()
        with self.rec.lock:
            c = dict(self.rec.counters)
        spans, recorded = self.rec.stats()
        samples = [sm for sm in recorded if sm[0] != MEM_SAMPLE]
        mem_samples = [(t, v) for name, t, v in recorded if name == MEM_SAMPLE]
        minflt = self.io.minor_faults()
        out = {"device": self.name, "spans": spans, "samples": samples,
               "stats": {"disk_read_bytes": float(self.io.read_bytes()), "page_faults": float(self.io.major_faults()),
                         "minor_faults": float(minflt), "net_tx_bytes": c.get("net_tx_bytes", 0.0),
                         "net_rx_bytes": c.get("net_rx_bytes", 0.0), "compute_s": c.get("compute_s", 0.0),
                         "resident_weight_bytes": float(self.resident_bytes), **self.mem.stats()},
               "mem_samples": mem_samples, "time": time.time()}
        return out

    def recycle_kv(self) -> None:
        """Keep the caches of the last generation's sequences for the next one."""
        self.spare_kv.extend(self.kv.values())
        self.kv.clear()

    def reset_measurements(self) -> None:
        self.rx_n, self.rx_t = 0, None
        if self.sender is not None:
            self.sender.reset_counts()
        self.rec.clear()
        self.io.reset()
        self.mem.rebase()
        self.mem.start()

    def close(self) -> None:
        if self.sender is not None:
            self.sender.stop()
        if self.prefetcher is not None:
            self.prefetcher.stop()
        self.mem.stop()
        self.rec.close()
