"""`primasim worker`: one process per device. It listens for a driver, loads its layer windows from
a memory-mapped checkpoint, and passes hidden states around the ring of devices over zmq.

Sockets (all on the address given with ``--listen``):

- control, ROUTER, ``tcp://HOST:PORT``: the driver's DEALER connects here (HELLO, SETUP, PING, ...).
  A dedicated thread serves it, so heartbeats are answered even while the compute thread is busy,
  and it ends the session when the driver's heartbeat stops for ``--heartbeat-timeout`` seconds;
- data, PULL, ``tcp://HOST:PORT+1`` (a random port with ``:0``): activations from the ring
  predecessor. The worker's own PUSH connects to its successor's data socket; a sender thread
  delays each message by the link's latency (+ seeded jitter) before sending it (user-space link
  latency, since ``netem`` is not available) and records a ``send`` span.

The compute thread executes `Plan.segments()`: an ACT message names the segment to run next; the
worker runs it if the segment is its own (and any of its own segments that directly follow),
relays it otherwise, and the head device turns a finished activation into a token (output layer +
sampling) and feeds the token back in. With S sequences in flight (RPP) every worker keeps one KV
cache per sequence. Prefetch (madvise WILLNEED of the next window) runs in a background thread.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import mmap
import os
import queue
import struct
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from primasim.core.errors import PrimasimError, WireError, WorkerError

from . import wire
from ._measure import IoCounter, MemorySampler, meminfo, own_cgroup, read_int
from .wire import Message, MsgType

CMD_ENDPOINT = "inproc://primasim-cmd"


# ======================================================================================== pages
def _file_mappings(path: str) -> list[tuple[int, int, int]]:
    """(start address, end address, file offset) of this process's mappings of `path`."""
    real = os.path.realpath(path)
    out = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() == real:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi, int(parts[2], 16)))
    except OSError:
        pass
    return out


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_PAGE = mmap.PAGESIZE


def _mapped_spans(ranges: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
    """Page-aligned (address, length) spans of our mappings that cover the file `ranges`."""
    spans: list[tuple[int, int]] = []
    maps: dict[str, list[tuple[int, int, int]]] = {}
    for f, off, length in ranges:
        if f not in maps:
            maps[f] = _file_mappings(f)
        for lo, hi, foff in maps[f]:
            a = max(off, foff)
            b = min(off + length, foff + (hi - lo))
            if b <= a:
                continue
            addr = lo + (a - foff)
            start = addr - addr % _PAGE
            end = -(-(lo + (b - foff)) // _PAGE) * _PAGE
            spans.append((start, end - start))
    return spans


def drop_pages(ranges: list[tuple[str, int, int]], spans: list[tuple[int, int]] | None = None) -> None:
    """Evict file ranges from memory: unmap our pages (MADV_DONTNEED keeps the mapping valid,
    reads fault the file back in), then drop them from the page cache (POSIX_FADV_DONTNEED).
    `spans`: the ranges' addresses from `_mapped_spans`, if already known (it reads /proc)."""
    for addr, length in _mapped_spans(ranges) if spans is None else spans:
        _libc.madvise(addr, length, mmap.MADV_DONTNEED)
    for f, off, length in ranges:
        with contextlib.suppress(OSError):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def touch_pages(ranges: list[tuple[str, int, int]]) -> int:
    """Read one byte per page of the mapped ranges (fault them in). Returns bytes touched."""
    n = 0
    for addr, length in _mapped_spans(ranges):
        arr = np.ctypeslib.as_array((ctypes.c_uint8 * length).from_address(addr))
        int(arr[::_PAGE].sum())
        n += length
    return n


def split_ranges(ranges: list[tuple[str, int, int]], keep: float) -> tuple[list[tuple[str, int, int]],
                                                                             list[tuple[str, int, int]]]:
    """Split file ranges into a first part of `keep` bytes and the rest (page-aligned cut)."""
    head: list[tuple[str, int, int]] = []
    tail: list[tuple[str, int, int]] = []
    left = int(keep)
    for f, off, length in ranges:
        if left >= length:
            head.append((f, off, length))
            left -= length
        elif left > 0:
            cut = off + left
            cut -= cut % _PAGE
            if cut > off:
                head.append((f, off, cut - off))
            if off + length > cut:
                tail.append((f, cut, off + length - cut))
            left = 0
        else:
            tail.append((f, off, length))
    return head, tail


# ======================================================================================== stage
class Stage:
    """The model code one worker runs: its layer windows and, on the head, embedding + output.
    The only place that calls primasim.runtime.model / primasim.runtime.checkpoint. Activations are (1, T, E) f32."""

    def __init__(self, path: str, windows: list[tuple[int, int]], *, head: bool, weights: str,
                 max_seq: int) -> None:
        from . import checkpoint as ck, model as md

        self._md, self._ck = md, ck
        self.ckpt = ck.open_checkpoint(path)
        self.spec = self.ckpt.spec
        self.windows = windows
        self.head = head
        self.max_seq = max_seq
        self.layers = [i for s, e in windows for i in range(s, e)]
        self.params = md.load_params(self.ckpt, self.layers, embed=head, head=head)
        if weights == "pinned":  # exo-style: weights copied into anonymous memory, never re-read
            self.params = md.pin_params(self.params)

    def fingerprint(self) -> str:
        return str(self.ckpt.fingerprint())

    def weight_bytes(self) -> int:
        """Bytes of this stage's weights (its layers, plus embedding and output on the head)."""
        return sum(n for _, _, n in self.all_ranges())

    def window_ranges(self, w: int) -> list[tuple[str, int, int]]:
        s, e = self.windows[w]
        return self.ckpt.layer_ranges(range(s, e))

    def layer_ranges(self, layer: int) -> list[tuple[str, int, int]]:
        return self.ckpt.layer_ranges([layer])

    def io_ranges(self) -> list[tuple[str, int, int]]:
        """The embedding and output tensors (head only)."""
        return self.ckpt.io_ranges() if self.head else []

    def input_ranges(self) -> list[tuple[str, int, int]]:
        return self.ckpt.input_ranges() if self.head else []

    def output_ranges(self) -> list[tuple[str, int, int]]:
        return self.ckpt.output_ranges() if self.head else []

    def all_ranges(self) -> list[tuple[str, int, int]]:
        return self.ckpt.layer_ranges(self.layers) + self.io_ranges()

    def prefetch(self, ranges: list[tuple[str, int, int]]) -> None:
        self._ck.prefetch(ranges)

    def new_kv(self) -> Any:
        return self._md.init_kv(self.spec, self.layers, self.max_seq)

    def bucket_starts(self) -> list[int]:
        """Decode positions where the attention span (primasim.runtime.model.attention_span) moves to a
        new bucket, up to the KV length."""
        span = self._md.attention_span
        return [p for p in (1 << i for i in range(self.max_seq.bit_length()))
                if p < self.max_seq and span(p + 1, self.max_seq) != span(p, self.max_seq)]

    def run(self, kv: Any, x: np.ndarray, pos: int, start: int, end: int) -> tuple[np.ndarray, Any]:
        y, kv = self._md.run_layers(self.params, kv, x, pos, range(start, end))
        return np.asarray(y), kv

    def embed(self, ids: list[int]) -> np.ndarray:
        return np.asarray(self._md.embed(self.params, [list(ids)]))

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits (V,) of the last position of x (1, T, E)."""
        return np.asarray(self._md.logits(self.params, x[:, -1:]))[0, -1]

    def sample(self, logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int,
               top_p: float) -> int:
        return int(self._md.sample(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p))


# ======================================================================================== recorder
MEM_SAMPLE = "mem_available_bytes"  # the MemorySampler's samples, kept by the Recorder


class Recorder:
    """Spans, samples and counters of one worker, in its own clock (time.time()).

    A run records a dozen spans and samples per token; kept as Python lists until the driver's
    STATS they grew every worker by ~4 KB a token (experiments/long_run.py). They are spilled
    instead to an unlinked temporary file (a SIGKILLed worker leaves nothing behind) as fixed-size
    records, strings interned in a table (resources and names come from a small set), so memory
    stays at one buffer of FLUSH records per kind however long the run; stats() reads them back."""

    SPAN = struct.Struct("<IIddqqd")  # resource id, name id, start, end, seq, token, nbytes
    SAMPLE = struct.Struct("<Idd")  # name id, time, value
    FLUSH = 4096  # records buffered per kind before a write

    def __init__(self) -> None:
        self.counters: dict[str, float] = collections.defaultdict(float)
        self.lock = threading.Lock()
        self._ids: dict[str, int] = {}
        self._strings: list[str] = []
        self._files = {self.SPAN: tempfile.TemporaryFile(prefix="primasim-rec-"),
                       self.SAMPLE: tempfile.TemporaryFile(prefix="primasim-rec-")}
        self._bufs = {self.SPAN: bytearray(), self.SAMPLE: bytearray()}

    def _id(self, s: str) -> int:
        i = self._ids.get(s)
        if i is None:
            i = self._ids[s] = len(self._strings)
            self._strings.append(s)
        return i

    def _put(self, kind: struct.Struct, *fields: Any) -> None:
        buf = self._bufs[kind]
        buf += kind.pack(*fields)
        if len(buf) >= self.FLUSH * kind.size:
            self._flush(kind)

    def _flush(self, kind: struct.Struct) -> None:
        f = self._files[kind]
        if not f.closed:  # a background thread may record after close(): drop it
            f.write(self._bufs[kind])
        self._bufs[kind].clear()

    def span(self, resource: str, start: float, end: float, name: str = "", seq: int = 0, token: int = -1,
             nbytes: float = 0.0) -> None:
        with self.lock:
            self._put(self.SPAN, self._id(resource), self._id(name), start, end, seq, token, nbytes)

    def sample(self, name: str, t: float, value: float) -> None:
        with self.lock:
            self._put(self.SAMPLE, self._id(name), t, value)

    def add(self, key: str, v: float) -> None:
        with self.lock:
            self.counters[key] += v

    def _read(self, kind: struct.Struct) -> Any:
        self._flush(kind)
        f = self._files[kind]
        f.seek(0)
        data = f.read()
        f.seek(0, os.SEEK_END)
        return kind.iter_unpack(data)

    def stats(self) -> tuple[list[list[Any]], list[list[Any]]]:
        """Every span [resource, start, end, name, seq, token, nbytes] and sample [name, time,
        value] since the last clear(), in recording order."""
        with self.lock:
            st = self._strings
            spans = [[st[r], a, b, st[n], seq, tok, nb] for r, n, a, b, seq, tok, nb in self._read(self.SPAN)]
            samples = [[st[n], t, v] for n, t, v in self._read(self.SAMPLE)]
        return spans, samples

    def clear(self) -> None:
        with self.lock:
            for kind, f in self._files.items():
                self._bufs[kind].clear()
                if not f.closed:
                    f.seek(0)
                    f.truncate()
            self.counters.clear()

    def close(self) -> None:
        with self.lock:
            for kind, f in self._files.items():
                self._bufs[kind].clear()
                f.close()


# ======================================================================================== sender
class Sender:
    """Owns the PUSH socket to the ring successor. Without emulated link latency the compute
    thread sends directly (a thread hand-off costs ~0.1-0.3 ms per hop on a busy host); with it, a
    sender thread holds each message until its due time, which also hides the hand-off inside the
    latency. Per-message latency: gamma-distributed with the link's latency as mean and the
    network's jitter as standard deviation, seeded (the simulator's draw); FIFO per link."""

    def __init__(self, ctx: zmq.Context, endpoint: str, latency: float, jitter: float, seed: int,
                 rec: Recorder, curve: dict[str, bytes] | None, peer: str) -> None:
        self.ctx, self.endpoint, self.latency, self.jitter = ctx, endpoint, latency, jitter
        self.direct = latency <= 0 and jitter <= 0
        self.rng = np.random.default_rng(seed)
        self.rec = rec
        self.curve = curve
        self.peer = peer
        self.q: queue.Queue[tuple[float, float, list[Any], dict[str, Any]] | None] = queue.Queue()
        self.last_due = 0.0
        self.error: BaseException | None = None
        self.idle = threading.Event()
        self.idle.set()
        self.connected = threading.Event()
        self.refused = ""
        self.sock: zmq.Socket | None = None
        self.thread: threading.Thread | None = None
        # what left for the successor: count and (count, time) of the last sends, reported to the
        # driver with every PONG so it can tell a stalled link from a busy device
        self.tx_n = 0
        self.tx_log: collections.deque[tuple[int, float]] = collections.deque(maxlen=32)

    def start(self, timeout: float) -> None:
        """Connect, and wait until the successor's handshake succeeds: an unreachable successor is
        an error at set-up (WorkerError), not a hang at the first token."""
        if self.direct:
            self.sock = self._connect(timeout)
            return
        self.thread = threading.Thread(target=self._run, args=(timeout,), name="primasim-sender", daemon=True)
        self.thread.start()
        if not self.connected.wait(timeout + 1.0):
            self.refused = self.refused or "no connection"
        if not self.connected.is_set():
            self.stop()
            raise self._unreachable(timeout)

    def _unreachable(self, timeout: float) -> WorkerError:
        return WorkerError(f"cannot reach the ring successor {self.peer} at {self.endpoint} within {timeout:.0f} s "
                           f"({self.refused or 'no connection'})", where="ring",
                           fix="check the address, firewall and keys; devices in emulated network namespaces "
                               "reach only each other and the head's host")

    def _connect(self, timeout: float) -> zmq.Socket:
        from zmq.utils.monitor import recv_monitor_message

        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        if self.curve:
            wire.curve_client(sock, self.curve)
        mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        sock.connect(self.endpoint)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not mon.poll(100):
                    continue
                ev = recv_monitor_message(mon)
                if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.connected.set()
                    return sock
                self.refused = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication failed (CURVE keys differ?)",
                                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error in the zmq handshake"}.get(
                    ev["event"], "handshake failed")
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            mon.close(linger=0)
        sock.close(linger=0)
        raise self._unreachable(timeout)

    def post(self, frames: list[Any], meta: dict[str, Any]) -> None:
        now = time.time()
        if self.direct:
            assert self.sock is not None
            self.sock.send_multipart(frames)
            self._account(now, now, time.time(), frames, meta)
            return
        delay = self.latency
        if self.jitter > 0 and self.latency > 0:  # gamma with the link's mean and sd, as the simulator draws it
            shape = (self.latency / self.jitter) ** 2
            delay = float(self.rng.gamma(shape, self.latency / shape))
        due = max(now + delay, self.last_due)  # FIFO: jitter never reorders a link
        self.last_due = due
        self.idle.clear()
        self.q.put((now, due, frames, meta))

    def _account(self, t_enq: float, due: float, t1: float, frames: list[Any], meta: dict[str, Any]) -> None:
        nbytes = len(frames[1])
        seq, step = meta.get("seq", 0), meta.get("step", -1)
        self.rec.span("send", t_enq, t1, f"to {self.peer}", seq, step, nbytes)
        if due > t_enq:
            self.rec.span("net", t_enq, min(due, t1), "link latency", seq, step, nbytes)
        self.rec.add("net_tx_bytes", nbytes + wire.HEADER_SIZE)
        self.rec.add("net_tx_msgs", 1)
        self.tx_n += 1
        self.tx_log.append((self.tx_n, t1))

    def reset_counts(self) -> None:
        self.tx_n = 0
        self.tx_log.clear()

    def stop(self) -> None:
        if self.thread is not None:
            self.q.put(None)
        elif self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def _run(self, timeout: float) -> None:
        try:
            sock = self._connect(timeout)
        except WorkerError:
            return  # start() reports it
        try:
            while True:
                item = self.q.get()
                if item is None:
                    return
                t_enq, due, frames, meta = item
                wait = due - time.time()
                if wait > 0:
                    time.sleep(wait)
                sock.send_multipart(frames)
                self._account(t_enq, due, time.time(), frames, meta)
                if self.q.empty():
                    self.idle.set()
        except BaseException as exc:  # reported by the compute thread
            self.error = exc
        finally:
            sock.close(linger=0)


class Prefetcher(threading.Thread):
    """madvise(WILLNEED) of the next window in the background (prima.cpp's prefetch)."""

    def __init__(self, stage: Stage, rec: Recorder) -> None:
        super().__init__(name="primasim-prefetch", daemon=True)
        self.stage, self.rec = stage, rec
        self.q: queue.Queue[tuple[str, list[tuple[str, int, int]]] | None] = queue.Queue()

    def post(self, name: str, ranges: list[tuple[str, int, int]]) -> None:
        if ranges:
            self.q.put((name, ranges))

    def stop(self) -> None:
        self.q.put(None)

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            name, ranges = item
            t0 = time.time()
            with contextlib.suppress(Exception):  # advisory: a failed hint must not stop the run
                self.stage.prefetch(ranges)
            self.rec.span("prefetch", t0, time.time(), name, nbytes=sum(r[2] for r in ranges))


# ======================================================================================== session
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
            from .batch import BatchServer

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
            from .batch import BatchServer, block_tokens

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
            for addr, length in _mapped_spans(self.stage.input_ranges()):
                _libc.madvise(addr, length, mmap.MADV_RANDOM)
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
            self.layer_spans[i] = _mapped_spans(st)
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
            from .batch import BatchServer

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


# ======================================================================================== worker
class Worker:
    """The worker process: a control thread (driver link, heartbeat) and a compute loop (ring)."""

    def __init__(self, listen: str, *, name: str = "", keys: str | None = None, model_override: str | None = None,
                 once: bool = False, heartbeat_timeout: float = 10.0, ready_file: str | None = None,
                 parent_pid: int | None = None) -> None:
        self.name = name or os.uname().nodename
        self.once = once
        self.heartbeat_timeout = heartbeat_timeout
        self.model_override = model_override
        self.parent_pid = parent_pid
        self.ctx = zmq.Context()
        self.keys = wire.load_keys(keys) if keys else None
        self.auth = None
        self.refused_peers = 0
        if self.keys:
            self.auth = self._start_authenticator()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.keys:
            wire.curve_server(self.control, self.keys)
        self.control_ep = _bind(self.control, listen)
        self.data = self.ctx.socket(zmq.PULL)
        self.data.setsockopt(zmq.LINGER, 0)
        self.data.setsockopt(zmq.RCVHWM, 1000)
        if self.keys:
            wire.curve_server(self.data, self.keys)
        host, port = self.control_ep.rsplit(":", 1)
        want = listen.rsplit(":", 1)[1]
        self.data_ep = _bind(self.data, f"{host}:{int(port) + 1}" if want not in ("0", "*") else f"{host}:0")
        self.driver: bytes | None = None
        self.closing = False
        self.last_heard = time.monotonic()
        self.session: Session | None = None
        self.stop_flag = threading.Event()
        self.cmd_ctl = self.ctx.socket(zmq.PAIR)
        self.cmd_ctl.bind(CMD_ENDPOINT)
        self.cmd = self.ctx.socket(zmq.PAIR)
        self.cmd.connect(CMD_ENDPOINT)
        self._emit_lock = threading.Lock()
        if ready_file:
            tmp = ready_file + ".tmp"
            Path(tmp).write_text(json.dumps({"control": self.control_ep, "data": self.data_ep, "pid": os.getpid()}))
            os.replace(tmp, ready_file)

    def _start_authenticator(self) -> Any:
        """Admit only peers presenting the cluster's public key; name the first few refusals."""
        assert self.keys is not None

        def refused() -> None:
            self.refused_peers += 1
            if self.refused_peers <= 5:
                print(f"primasim worker {self.name}: refused a peer presenting another key", file=sys.stderr,
                      flush=True)

        return wire.start_authenticator(self.ctx, self.keys, on_refused=refused)

    # ---------------------------------------------------------------------------- control thread
    def _control_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.cmd_ctl, zmq.POLLIN)
        while not self.stop_flag.is_set():
            events = dict(poller.poll(100))
            if self.control in events:
                try:
                    got = wire.recv(self.control, 0, peer="driver", router=True)
                except WireError as exc:
                    print(f"primasim worker {self.name}: {exc.message}", file=sys.stderr, flush=True)
                    got = None
                if got is not None:
                    self._on_control(*got)
            if self.cmd_ctl in events:
                frames = self.cmd_ctl.recv_multipart()
                if self.driver is not None:
                    with contextlib.suppress(zmq.ZMQError):
                        self.control.send_multipart([self.driver, *frames])
                    if self.closing and wire.decode(frames, peer="compute thread").type == MsgType.ACK:
                        self.driver, self.closing = None, False  # session over: accept the next driver
            if self.driver is not None and time.monotonic() - self.last_heard > self.heartbeat_timeout:
                print(f"primasim worker {self.name}: no heartbeat from the driver for "
                      f"{self.heartbeat_timeout:.0f} s; ending the session", file=sys.stderr, flush=True)
                self.driver = None
                if self.once:
                    os._exit(3)
                self._forward(wire.encode(MsgType.SHUTDOWN, obj={"reason": "heartbeat lost"}))
            if self.parent_pid and os.getppid() != self.parent_pid:
                os._exit(4)  # the driver that spawned us is gone

    def _on_control(self, ident: bytes | None, msg: Message) -> None:
        assert ident is not None
        if msg.type == MsgType.HELLO:
            if self.driver is not None and self.driver != ident and time.monotonic() - self.last_heard < self.heartbeat_timeout:
                wire.send(self.control, MsgType.ERROR, identity=ident,
                          obj={"what": f"worker {self.name} is busy with another driver", "fix": "wait or restart it"})
                return
            self.driver = ident
            self.last_heard = time.monotonic()
            wire.send(self.control, MsgType.HELLO_ACK, identity=ident,
                      obj=wire.hello_payload("worker", name=self.name, pid=os.getpid(), data=self.data_ep,
                                             control=self.control_ep, echo=msg.obj.get("time")))
            return
        if ident != self.driver:
            wire.send(self.control, MsgType.ERROR, identity=ident,
                      obj={"what": "send HELLO first", "fix": "connect through primasim's driver"})
            return
        self.last_heard = time.monotonic()
        if msg.type == MsgType.PING:
            pong: dict[str, Any] = {"time": time.time()}
            session = self.session
            if session is not None:
                with contextlib.suppress(Exception):  # a session being replaced: no state this time
                    pong["ring"] = session.ring_state()
            wire.send(self.control, MsgType.PONG, identity=ident, obj=pong)
            return
        if msg.type == MsgType.SHUTDOWN:
            self.closing = True
        self._forward(wire.encode(msg.type, obj=msg.obj, seq=msg.seq))

    def _forward(self, frames: list[Any]) -> None:
        self.cmd_ctl.send_multipart(frames)

    def emit(self, mtype: MsgType, obj: dict[str, Any]) -> None:
        """Compute thread -> driver (through the control thread)."""
        with self._emit_lock:
            self.cmd.send_multipart(wire.encode(mtype, obj=obj))

    # ---------------------------------------------------------------------------- compute loop
    def serve(self) -> int:
        ctl = threading.Thread(target=self._control_loop, name="primasim-control", daemon=True)
        ctl.start()
        poller = zmq.Poller()
        poller.register(self.cmd, zmq.POLLIN)
        poller.register(self.data, zmq.POLLIN)
        code = 0
        try:
            while True:
                pending = self.session is not None and self.session.sample_at is not None
                events = dict(poller.poll(1 if pending else 200))
                if not events and pending and self.session is not None:
                    self.session.on_idle()
                if self.cmd in events:
                    msg = wire.decode(self.cmd.recv_multipart(), peer="control thread")
                    if not self._on_command(msg):
                        if self.once:
                            break
                if self.data in events:
                    try:
                        got = wire.recv(self.data, 0, peer="ring predecessor")
                    except WireError as exc:
                        # a corrupted activation cannot be used: the run has to stop, saying why
                        self.emit(MsgType.ERROR, {"what": exc.what, "where": f"device {self.name}: {exc.where or ''}",
                                                  "fix": exc.fix or "", "kind": "wire"})
                        continue
                    if got is None:
                        continue
                    _, msg = got
                    if self.session is None or msg.type != MsgType.ACT:
                        self.emit(MsgType.ERROR, {"what": f"unexpected {msg.type.name} on the data socket",
                                                  "where": f"device {self.name}: data socket", "kind": "wire",
                                                  "fix": "check that only ring neighbours connect to it"})
                        continue
                    self._guard(lambda m=msg: self.session.on_act(m))  # type: ignore[union-attr]
        except KeyboardInterrupt:
            code = 130
        finally:
            self.stop_flag.set()
            if self.session is not None:
                self.session.close()
            ctl.join(timeout=1.0)
            if self.auth is not None:
                self.auth.stop()
            self.ctx.destroy(linger=0)
        return code

    def _guard(self, fn: Any) -> bool:
        try:
            fn()
            return True
        except PrimasimError as exc:
            self.emit(MsgType.ERROR, {"what": exc.what, "where": exc.where or f"device {self.name}", "fix": exc.fix or ""})
        except Exception as exc:
            self.emit(MsgType.ERROR, {"what": f"{type(exc).__name__}: {exc}", "where": f"device {self.name}",
                                      "fix": "see the worker's log", "traceback": traceback.format_exc()})
            traceback.print_exc()
        return False

    def _on_command(self, msg: Message) -> bool:
        """Handle a driver command; False ends the session."""
        t = msg.type
        if t == MsgType.SETUP:
            def setup() -> None:
                if self.session is not None:
                    self.session.close()
                self.session = Session(self, msg.obj)
                s = self.session
                self.emit(MsgType.READY, {"load_s": s.load_s, "warmup_s": s.warmup_s, "windows": s.windows})
            self._guard(setup)
        elif t == MsgType.RELEASE and self.session is not None:
            self._guard(lambda: self.emit(MsgType.ACK, {"op": "release", **self.session.release()}))  # type: ignore[union-attr]
        elif t == MsgType.LOAD and self.session is not None:
            self._guard(lambda: self.emit(MsgType.ACK, {"op": "load", **self.session.load()}))  # type: ignore[union-attr]
        elif t == MsgType.GENERATE and self.session is not None:
            self._guard(lambda: self.session.generate(msg.obj))  # type: ignore[union-attr]
        elif t == MsgType.STATS_REQ and self.session is not None:
            self._guard(lambda: self.emit(MsgType.STATS, self.session.stats()))  # type: ignore[union-attr]
        elif t == MsgType.RESET and self.session is not None:
            self.session.recycle_kv()
            self.session.reset_measurements()
            self.emit(MsgType.ACK, {"op": "reset"})
        elif t == MsgType.SHUTDOWN:
            if self.session is not None:
                self.session.close()
                self.session = None
            self.emit(MsgType.ACK, {"op": "shutdown"})
            time.sleep(0.05)  # let the control thread pass the ACK on
            return False
        else:
            self.emit(MsgType.ERROR, {"what": f"{t.name} before SETUP", "fix": "send SETUP first"})
        return True


def _bind(sock: zmq.Socket, addr: str) -> str:
    """Bind `addr` (port 0 or * = a free port); return the endpoint actually bound."""
    if not addr.startswith("tcp://"):
        addr = "tcp://" + addr
    host, _, port = addr[len("tcp://"):].rpartition(":")
    if not host or not port:
        raise WorkerError(f"bad listen address {addr!r}", where="--listen", fix="use tcp://HOST:PORT")
    try:
        if port in ("0", "*"):
            p = sock.bind_to_random_port(f"tcp://{host}")
            return f"tcp://{host}:{p}"
        sock.bind(addr)
    except zmq.ZMQError as exc:
        raise WorkerError(f"cannot listen on {addr}: {exc}", where="--listen",
                          fix="pick a free port and an address of this machine") from None
    return addr


def listen_host(addr: str) -> str:
    """The host part of a listen address (tcp://HOST:PORT, [v6]:PORT, HOST:PORT)."""
    if addr.startswith("tcp://"):
        addr = addr[len("tcp://"):]
    host = addr.rpartition(":")[0] if ":" in addr else addr
    return host.strip("[]")


def is_loopback(addr: str) -> bool:
    """Whether a listen address is reachable from this machine only (127.0.0.0/8, ::1, localhost).
    A name is resolved: loopback only if every address it resolves to is. Wildcards (*, 0.0.0.0,
    ::), interface names and names that do not resolve count as reachable from elsewhere."""
    import ipaddress
    import socket

    host = listen_host(addr)
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


def serve(listen: str, **kw: Any) -> int:
    """Run a worker until its session ends (--once) or forever."""
    w = Worker(listen, **kw)
    auth = "open to any peer that reaches it"
    if w.keys:
        from primasim.cli.keys import fingerprint

        auth = f"CurveZMQ, cluster key {fingerprint(w.keys['public'])}"
    print(f"primasim worker {w.name}: control {w.control_ep}, data {w.data_ep} ({auth})", file=sys.stderr, flush=True)
    return w.serve()
