"""The PUSH link to the ring successor, with the emulated link latency applied in user space."""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from primasim.core.errors import WorkerError

from .. import wire
from .._measure import name_thread
from .recorder import Recorder


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
        name_thread()
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
