"""One driver's run on a worker: set-up (stage, KV caches, ring link), residency (LOAD), the ring's
compute loop, the head's sampling, and the measurements the driver collects.

Longer than ~600 lines: one run's state machine (SETUP -> LOAD -> steps -> STATS); its parts with
a concept of their own already live beside it (residency, prefetcher, sender, recorder, serving)."""

from __future__ import annotations

import collections
import gc
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from primasim.core.errors import WorkerError
from primasim.core.procfs import meminfo, thread_cpu, thread_cpu_since
from primasim.core.runtime_facts import (
    ACT_RESERVE,
    HOST_AVAILABLE_SHARE,
    anon_reserve,
    lru_room,
    residency_mode,
)

from .. import wire
from .._measure import IoCounter, MemorySampler, device_cgroup, process_memory
from ..pages import drop_pages, lock_code, resident_bytes, split_ranges, trim_heap
from ..wire import Message, MsgType
from . import residency as rs
from .pagetrace import PageTrace
from .prefetcher import Prefetcher
from .recorder import MEM_SAMPLE, Recorder
from .sender import Sender
from .serving import ServeLoop
from .speculation import HeadSpeculation
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
        self.mode = residency_mode(str(setup.get("residency", "planned")))
        self.pinned = setup.get("weights", "mmap") == "pinned"
        self.res: rs.Residency | None = None  # decided at LOAD
        self.code_locked = 0
        t0 = time.time()
        path = worker.model_override or setup["model_path"]
        if not os.path.exists(path):
            raise WorkerError(f"model file not found at {path}", where=f"device {self.name}",
                              fix="copy the model to the same path on every device, or start the worker "
                                  "with --model PATH")
        self.stage = Stage(path, self.windows, head=self.head, max_seq=int(setup["max_seq"]))
        fp = setup.get("fingerprint")
        if fp and self.stage.fingerprint() != fp:
            raise WorkerError(f"model file {path} differs from the head's (fingerprint "
                              f"{self.stage.fingerprint()[:16]}... != {fp[:16]}...)", where=f"device {self.name}",
                              fix="copy the exact same checkpoint to every device")
        self.load_s = time.time() - t0
        # a single-device ring runs each token as one call (embedding, blocks, head): no dispatches,
        # host copies or Python between them; not when it streams layer by layer (planned mode)
        self.single = (self.head and len(self.ring) == 1 and setup.get("schedule", "ring") in ("ring", "rpp")
                       and not (setup.get("options") or {}).get("serving")  # a server pads prompts: no fused step
                       and not setup.get("draft"))  # a verification needs every row's logits: no fused step
        # speculative decoding: the draft runs here, on the head (runtime/worker/speculation.py)
        self.speculation = HeadSpeculation(self, setup["draft"]) if self.head and setup.get("draft") else None
        self.fused = False
        t0 = time.time()
        self._compile(setup.get("warmup_lengths", [1]))
        self.warmup_s = time.time() - t0
        # set-up touched no weight page and allocated no model memory: what the process holds now is
        # the runtime's own (Python, JAX, compiled code), the baseline of memory pressure and of
        # the device's anonymous memory; the driver limits the device's memory from here on
        if device_cgroup() is not None:  # an emulated device: its code is its own (pages.lock_code)
            self.code_locked = lock_code()
        self.mem.set_before()
        self.footprint = process_memory()
        self.setup_resident = float(resident_bytes(self.stage.all_ranges()))  # ~ the checks' samples
        # KV caches are allocated at LOAD (inside the memory limit), before any token, as llama.cpp
        # allocates its context's: a first allocation inside a token costs ~10 ms per array under a
        # CPU quota. One per sequence the schedule keeps in flight; a finished sequence's cache is
        # reused (positions past a sequence's own are masked, so stale entries are inert).
        self.kv: dict[int, Any] = {}
        self.spare_kv: list[Any] = []
        self.batch_pool: Any = None
        self.sender: Sender | None = None
        if len(self.ring) > 1:
            self.sender = Sender(worker.ctx, setup["successor_data"], float(setup.get("latency", 0.0)),
                                 float(setup.get("jitter", 0.0)), int(setup.get("seed", 0)) + 7919 * self.ring.index(self.name),
                                 self.rec, worker.keys, self.successor)
            try:
                self.sender.start(float(setup.get("connect_timeout", 30.0)))
            except WorkerError as exc:
                raise WorkerError(exc.what, where=f"device {self.name}", fix=exc.fix) from None
        self.prefetcher: Prefetcher | None = None  # started at LOAD if the residency prefetches
        self.ptrace = PageTrace.from_env(str(self.stage.ckpt.path), self.name)  # diagnostic, off by default
        self.seqs: dict[int, SeqState] = {}
        # (seq, segment, activations or -- on the head, segment 0 -- the token ids to embed, pos, step)
        self.work: collections.deque[tuple[int, int, np.ndarray | list[int], int, int]] = collections.deque()
        self.rx_n = 0  # activations received from the ring predecessor (this generation)
        self.rx_t: float | None = None
        self.busy_since: float | None = None  # computing since (None: waiting for input)
        self.item_since: float | None = None  # the current window (activation) started
        self.item_times: collections.deque[float] = collections.deque(maxlen=64)  # recent window times (s)
        self.idle_from = time.time()
        self.idle_since: float | None = None
        self.sample_at: float | None = None
        self.gen_opts: dict[str, Any] = {}
        self.stop_ids: set[int] = set()
        self.threads0: dict[int, tuple[str, float]] = {}
        self.pending: collections.deque[int] = collections.deque()
        self.serving: ServeLoop | None = None  # primasim serve: requests arrive one by one (serving.py)

    # ---------------------------------------------------------------------------- set-up
    def _compile(self, lengths: list[int], kv: Any = None) -> Any:
        """Compile every shape the run will use, without running it: no weight page is read and no
        KV cache allocated (the memory limit comes after set-up), and nothing compiles inside a token.
        Shapes: the prompt lengths at position 0 and one token at the first position of every
        attention-span bucket the KV length reaches (256, 512, ...); per device its windows, one
        layer if it may stream layer by layer, the embedding and output on the head, and on a
        single device the whole-model step. With `kv` (a real cache, at LOAD) the same shapes are
        *run* instead, on the stage's zero weights (`Stage.zero_weights`): XLA's first execution of
        each executable happens here, not in a token; the garbage written into the cache sits at
        positions a sequence writes before it reads them."""
        run = kv is not None
        if self.cfg.get("schedule") == "batch":
            from ..batch import BatchServer, block_tokens  # JAX: loaded at SETUP, not at start-up

            o = self.cfg.get("options", {})
            # with the pool's size given (options kv_bytes) the warm-up compiles the run's shapes
            BatchServer.warmup(self.stage, [int(x) for x in lengths], int(self.cfg.get("max_batch", 1)),
                               block_tokens(o), max_seq=int(self.cfg["max_seq"]) if o.get("kv_bytes") else None,
                               kv_bytes=o.get("kv_bytes"), pool=kv if run else None)
            return
        if kv is None:
            kv = self.stage.new_kv(abstract=True)
        steps = [(int(n), 0) for n in sorted(set(int(x) for x in lengths if int(x) > 0))]
        decode = sorted({1, *(int(n) for n in self.cfg.get("decode_lengths", [1]))})  # K + 1 with a draft
        steps += [(n, pos) for pos in self.stage.bucket_starts() for n in decode]
        if self.speculation is not None and not run:
            self.speculation.compile(lengths)
        may_stream = self._may_stream() if not run else bool(self.res and self.res.streams)
        only = not run
        for n, pos in steps:
            if self.single and (not run or self.fused):
                _, top, kv = self.stage.step(kv, [0] * n, pos, compile_only=only)
                if run:
                    top.block_until_ready()
                if not may_stream:
                    continue
            x = np.zeros((1, n, self.stage.spec.hidden), np.float32)
            if self.head:
                x = self.stage.embed([0] * n, compile_only=only)
            for s, e in self.windows:
                x, kv = self.stage.run(kv, x, pos, s, e, compile_only=only)
            if may_stream and self.windows:
                s = self.windows[0][0]
                _, kv = self.stage.run(kv, x, pos, s, s + 1, compile_only=only)
            if self.head and pos == 0:
                self.stage.output(x, compile_only=only)
                if run and self.res is not None:  # the output's row blocks (decided at LOAD): one shape each
                    for a, b in {b - a: (a, b) for a, b, _ in self.res.output_blocks}.values():
                        self.stage.output_block(x, a, b).block_until_ready()
                if self.speculation is not None and n in decode and n > 1:  # a verification's K + 1 rows of logits
                    self.stage.output_rows(x, compile_only=only)
        return kv if run else None

    def _may_stream(self) -> bool:
        """Whether LOAD may decide to stream layer by layer (planned mode, mmap'd weights, and the
        weights + reserve exceed the memory the driver says the device will have, or else the
        host's): then the one-layer shapes are compiled too."""
        if self.mode != "planned" or self.pinned or not self.windows:
            return False
        hint = self.cfg.get("memory_hint")
        room = float(hint) if hint else HOST_AVAILABLE_SHARE * meminfo().get("MemAvailable", 1 << 62)
        return self.stage.weight_bytes() + self._anon_reserve() > room

    def _anon_reserve(self, *, draft_loaded: bool = False) -> int:
        """Memory the run allocates besides weights: the KV caches of the sequences in flight plus
        the activation reserve (primasim.core.runtime_facts.anon_reserve), and a draft's weights and
        KV cache unless it is loaded already (then its memory is in the cgroup's usage)."""
        sp = self.stage.spec
        draft = self.speculation.reserve_bytes() if (self.speculation is not None and not draft_loaded) else 0
        return draft + anon_reserve(len(self.stage.layers), int(self.cfg["max_seq"]), sp.n_kv_heads, sp.head_dim,
                                    max(1, int(self.cfg.get("in_flight", 1))))

    def release(self) -> dict[str, Any]:
        """Drop this worker's weight pages (a cold start; the checkpoint's checks read a few): what
        the process holds afterwards is the runtime's own footprint, which the emulator measures
        before it limits the device's memory. The whole file, not only this worker's layers: the
        read-around brings in the neighbours' bytes, and those an earlier run left in the page cache
        (outside this device's limit) were found instead of read (experiments/results/lru_trace.md)."""
        ranges = self.stage.all_ranges()
        drop_pages([(str(f), 0, os.path.getsize(f)) for f in self.stage.ckpt.files])
        return {"bytes": sum(r[2] for r in ranges), **process_memory()}

    def load(self) -> dict[str, Any]:
        """Map the weights, allocate the KV caches and bring the weights in, within the device's
        memory budget (after the driver has limited the device's memory, so every byte the model
        takes is charged to it). Residency per the run's mode (primasim.core.runtime_facts)."""
        t0 = time.time()
        # the draft first, pinned (prima.cpp loads it before the target): the target's residency
        # budget then sees the head without it
        draft_info = self.speculation.load() if self.speculation is not None else {}
        # weights are mapped again here: a tensor that cannot stay file-backed (a converted dtype,
        # an unaligned offset) is copied under the limit; pinned weights (exo) are copied here too
        self.stage.load_weights(pinned=self.pinned)
        # the draft is loaded: its bytes are in the usage the budget subtracts (count them once)
        budget, how = rs.memory_budget(self._anon_reserve(draft_loaded=True))
        opts = self.cfg.get("options", {}) or {}
        if self.cfg.get("schedule") == "batch":
            from ..batch import (
                BatchServer,  # JAX: loaded at SETUP, not when the worker starts listening
            )

            self.batch_pool = BatchServer.preallocate(self.stage, opts, int(self.cfg["max_seq"]))
        else:
            import jax  # loaded at SETUP, not when the worker starts listening

            n_seq = int(opts.get("S") or len(self.ring)) if self.cfg.get("schedule") == "rpp" else 1
            self.spare_kv = [self.stage.new_kv() for _ in range(max(1, n_seq))]
            jax.block_until_ready(self.spare_kv)
        # a server (primasim serve) warms up before its weights are read, then gives the warm-up's
        # temporaries back to the OS: its compiled prompt lengths reach the context (256 positions
        # and more) and it runs them on every slot's cache, whose buffers the C heap keeps (measured
        # 2026-12-07, llama-mini-300m, 15 layers, buckets 16/64/256, 2 slots: +20 MiB of RssAnon,
        # past ACT_RESERVE; 0 after malloc_trim). Read after them, the weights were evicted by the
        # kernel at the device's memory limit, and a window read in a cycle then faulted on every
        # page: 15-30 s a token where `primasim run` of the plan took 73 ms.
        serving = bool(opts.get("serving")) and self.batch_pool is None and self.cfg.get("schedule") != "batch"
        warm_s = 0.0

        def warm() -> float:
            """Run every compiled shape once, reading no weight (a server: on every slot's cache, then
            its temporaries back to the OS); returns the seconds it took."""
            t = time.time()
            lengths = self.cfg.get("warmup_lengths", [1])
            with self.stage.zero_weights():
                if self.batch_pool is not None or self.cfg.get("schedule") == "batch":
                    if self.batch_pool is not None:
                        self._compile(lengths, self.batch_pool)
                else:
                    slots = range(len(self.spare_kv))
                    for i in slots if serving else slots[-1:]:
                        self.spare_kv[i] = self._compile(lengths, self.spare_kv[i])
            if serving:
                gc.collect()
                trim_heap()
            return time.time() - t

        def warm_first(res: rs.Residency) -> None:
            nonlocal warm_s
            self.res = res
            self.fused = self.single and not res.streams
            warm_s = warm()

        self.res = rs.load(self.stage, self.mode, budget, pinned=self.pinned, prefetch=self.prefetch_on,
                           ring=len(self.ring), how=how, before_reading=warm_first if serving else None)
        self.fused = self.single and not self.res.streams
        if not serving:
            warm_s = warm()
        if self.res.plan.stream_prefetch or self.res.plan.window_prefetch:
            self.prefetcher = Prefetcher(self.stage, self.rec)
            self.prefetcher.start()
        # everything alive now (JAX, the compiled steps, the stage) lives as long as the session:
        # out of the collector's sight, a collection during the tokens scans only what they
        # allocate (a full one over the ~1.1e5 objects of the set-up took 20-40 ms, inside a token)
        gc.freeze()
        return self.res.info | draft_info | {"fused": self.fused, "code_locked": float(self.code_locked), "load_s": time.time() - t0, "warm_s": warm_s, "kv_bytes": float(
            self._anon_reserve() - ACT_RESERVE), **process_memory()}

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

    def _advance(self, seq: int, seg: int, x: np.ndarray | list[int], pos: int, step: int) -> None:
        if isinstance(x, list):  # token ids on the head: one call for the whole model, or embed them
            if self.fused:
                self._step(seq, x, pos, step)
                return
            t0 = time.time()
            x = self.stage.embed(x)
            self.rec.span("cpu", t0, time.time(), "embed", seq, step)
        n = len(self.segments)
        while seg < n and self.segments[seg][0] == self.name:
            x = self._compute(seq, seg, x, pos, step)
            seg += 1
        if seg == n and self.head:
            self._finish(seq, x, pos, step)
            return
        self._send(seq, seg, x, pos, step)

    def _kv(self, seq: int) -> Any:
        if seq not in self.kv:
            self.kv[seq] = self.spare_kv.pop() if self.spare_kv else self.stage.new_kv()
        return self.kv[seq]

    def _compute(self, seq: int, seg: int, x: np.ndarray, pos: int, step: int) -> np.ndarray:
        w = self.win_of_seg[seg]
        s, e = self.windows[w]
        kv = self._kv(seq)
        res = self.res
        t0 = time.time()
        if res is not None and res.streams:  # planned: stream each layer's part, evict it after use
            for i in range(s, e):
                if self.prefetcher is not None:
                    nxt = i + 1 if i + 1 < e else self.windows[(w + 1) % len(self.windows)][0]
                    self.prefetcher.post(f"layer {nxt}", res.layer_stream.get(nxt, []))
                res.read_layer(i)
                x, kv = self.stage.run(kv, x, pos, i, i + 1)
                res.evict_layer(i)
        else:
            self.ptrace.sample("before", (s, e), pos=pos, step=step)
            x, kv = self.stage.run(kv, x, pos, s, e)
            self.ptrace.sample("after", (s, e), pos=pos, step=step)
            if self.prefetcher is not None:  # lru: the next window, while the rest of the ring computes,
                # as far as the page cache's room holds it (lru_room): WILLNEED of more than that
                # evicts the window's own first pages before use, and a 37 MB window into ~20 MB of
                # room got the phone OOM-killed (pages under read are locked)
                nw = (w + 1) % len(self.windows)
                ahead, _ = split_ranges(self.stage.window_ranges(nw), lru_room(res.plan.budget) if res else 0.0)
                self.prefetcher.post(f"window {nw}", ahead)
        t1 = time.time()
        self.kv[seq] = kv
        self.rec.span("cpu", t0, t1, f"L{s}-{e - 1} lap {self.segments[seg][1]}", seq, step)
        self.rec.add("compute_s", t1 - t0)
        self.sample_at = t1  # counters are read once the activation is on its way (not on the hop)
        return x

    def _step(self, seq: int, ids: list[int], pos: int, step: int) -> None:
        """A single device's token: embedding, blocks and head in one call, then sampling."""
        kv = self._kv(seq)
        t0 = time.time()
        lg, top, kv = self.stage.step(kv, ids, pos)
        self.kv[seq] = kv
        top.block_until_ready()
        t1 = time.time()  # the model's time ends here; what follows is outside it
        tok, logits = self._pick(seq, lg, top)
        self.rec.span("cpu", t0, t1, f"L0-{self.stage.spec.n_layers - 1}+head", seq, step)
        self.rec.add("compute_s", t1 - t0)
        self._token(seq, tok, logits, pos + len(ids), step, time.time())

    def _pick(self, seq: int, lg: Any, top: Any) -> tuple[int, np.ndarray | None]:
        """The next token from the head's logits (on the device) and their argmax: greedy copies
        only the argmax to the host; sampling (or returning logits) copies the logits."""
        o = self.gen_opts if self.serving is None else self.serving.opts(seq)
        temp = float(o.get("temperature", 0.0))
        if temp <= 0 and not o.get("return_logits"):
            return int(np.asarray(top).reshape(-1)[0]), None
        logits = np.asarray(lg).reshape(-1)
        tok = int(np.asarray(top).reshape(-1)[0]) if temp <= 0 else self.stage.sample(
            logits, self.seqs[seq].rng if self.serving is None else self.serving.rng(seq), temp, int(o.get("top_k", 0)), float(o.get("top_p", 1.0)))
        return tok, logits

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
        if self.speculation is not None and self.head:  # the draft's prompt while the ring computes
            self.speculation.after_send(seq, step)

    # ---------------------------------------------------------------------------- head
    def generate(self, obj: dict[str, Any]) -> None:
        if not self.head:
            raise WorkerError("GENERATE sent to a worker that is not the head", where=f"device {self.name}",
                              fix="send GENERATE to the plan's first device")
        self.gen_opts = obj
        self.stop_ids = {int(t) for t in obj.get("stop_ids", [])}
        self.reset_measurements()
        self.recycle_kv()
        if self.speculation is not None:
            if obj.get("schedule", "ring") != "ring" or int(obj.get("in_flight", 1)) != 1:
                raise WorkerError("speculative decoding runs one sequence at a time on a ring", where="GENERATE",
                                  fix="run a ring (prima/llama.cpp) plan without --in-flight")
            if obj.get("serve"):
                raise WorkerError("the server does not speculate yet", where="GENERATE", fix="serve without --draft")
            self.speculation.reset()
        self.serving = ServeLoop(self, obj) if obj.get("serve") else None
        if self.serving is not None:
            return
        if obj.get("schedule") == "batch":
            from ..batch import (
                BatchServer,  # JAX: loaded at SETUP, not when the worker starts listening
            )

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
        self.work.append((seq, 0, list(self.seqs[seq].ids), 0, 0))

    def _finish(self, seq: int, x: np.ndarray, pos: int, step: int) -> None:
        if self.speculation is not None:
            self.speculation.finish(seq, x, pos, step)
            return
        if self.serving is not None:
            x = self.serving.trim(seq, x)  # a padded prompt: the output at its last real position
        t0 = time.time()
        out_streams = self.res is not None and bool(self.res.output_stream)
        if out_streams and self.res.output_blocks:  # planned: in row blocks, each read, used, evicted
            parts = []
            for a, b, rng in self.res.output_blocks:
                self.stage.prefetch(rng)
                parts.append(self.stage.output_block(x, a, b))
                parts[-1].block_until_ready()
                drop_pages(rng)
            lg = np.concatenate([np.asarray(p) for p in parts], axis=-1)
            top = np.argmax(lg, axis=-1)
        else:
            if out_streams:  # planned: the part of the output layer that does not fit (residency.py)
                self.res.read_output()
            lg, top = self.stage.output(x)
            top.block_until_ready()
            if out_streams:
                self.res.evict_output()
        t1 = time.time()
        tok, logits = self._pick(seq, lg, top)
        self.rec.span("cpu", t0, t1, "output", seq, step)
        self._token(seq, tok, logits, pos + x.shape[1], step, time.time())

    def _token(self, seq: int, tok: int, logits: np.ndarray | None, next_pos: int, step: int, t: float) -> None:
        """Report a generated token to the driver; queue the sequence's next step (or finish it)."""
        if self.serving is not None:
            self.serving.token(seq, tok, next_pos, step, t)
            return
        st = self.seqs[seq]
        o = self.gen_opts
        st.generated.append(tok)
        payload: dict[str, Any] = {"seq": seq, "index": step, "token_id": tok, "time": t}
        if o.get("return_logits") and logits is not None:
            payload["logits"] = logits.astype(float).tolist()
        self.w.emit(MsgType.TOKEN, payload)
        if len(st.generated) >= st.max_new or tok in self.stop_ids:
            st.done = True
            self._seq_done(seq)
            return
        self.work.append((seq, 0, [tok], next_pos, step + 1))

    def _seq_done(self, seq: int) -> None:
        """A finished sequence: its KV cache goes back to the spares, the next one starts."""
        kv = self.kv.pop(seq, None)
        if kv is not None:
            self.spare_kv.append(kv)
        if self.pending:
            self._start_seq(self.pending.popleft())
        elif all(s.done for s in self.seqs.values()):
            self._done()

    def _done(self) -> None:
        obj: dict[str, Any] = {"tokens": {str(k): v.generated for k, v in self.seqs.items()}}
        if self.speculation is not None:
            obj["speculation"] = self.speculation.report()
        self.w.emit(MsgType.DONE, obj)

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
                         "resident_weight_bytes": float(self.res.info["resident_bytes"]) if self.res else 0.0,
                         **self._memory_report(), **self.mem.stats(),
                         # CPU time of each thread since GENERATE: the compute's and what competes with it
                         **{f"thread_cpu_s.{k}": v for k, v in thread_cpu_since(self.threads0).items()}},
               "mem_samples": mem_samples, "time": time.time()}
        return out

    def _memory_report(self) -> dict[str, float]:
        """What the device's memory holds for the run: anonymous memory above the runtime's own
        footprint (peak since GENERATE), and how much of its weight file is in the page cache."""
        ranges = self.stage.all_ranges()
        now = process_memory()
        return {"anon_footprint_bytes": self.footprint["anon_bytes"], "anon_end_bytes": now["anon_bytes"],
                "file_rss_bytes": now["file_bytes"], "weight_bytes": float(sum(r[2] for r in ranges)),
                "file_resident_bytes": float(resident_bytes(ranges))}

    def recycle_kv(self) -> None:
        """Keep the caches of the last generation's sequences for the next one."""
        self.spare_kv.extend(self.kv.values())
        self.kv.clear()

    def reset_measurements(self) -> None:
        self.rx_n, self.rx_t = 0, None
        if self.sender is not None:
            self.sender.reset_counts()
        self.rec.clear()
        self.threads0 = thread_cpu()
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
