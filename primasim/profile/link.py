"""Network (cluster `[network]` / per-pair links): the runtime's zmq wire format
(primasim.runtime.wire) against an echo peer (`python -m primasim.profile.profiler --echo ADDR`):
one-way latency = RTT / 2 of empty PINGs; bandwidth = slope of transfer time over payload size.

zmq and the wire format are imported inside `serve_echo` and `measure_link`: a profile without a
peer does not load them."""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass

import numpy as np

from primasim.core.cluster import LinkSpec, NetworkSpec
from primasim.core.errors import WireError
from primasim.core.units import MB, MS, KiB, MiB

from .measurement import Measurement, measurement


@dataclass(frozen=True)
class LinkMeasurement:
    """One link measured over the runtime's wire format: one-way latency and bandwidth."""

    peer: str
    latency: Measurement  # one-way, s (RTT / 2 of empty PINGs)
    bandwidth: Measurement  # bytes/s
    payload: int  # bytes of the large message used for the bandwidth

    @property
    def jitter(self) -> float:
        """Robust std-dev of the one-way latency (IQR / 1.349)."""
        lo, hi = self.latency.spread
        return (hi - lo) / 1.349

    def link_spec(self, a: str, b: str) -> LinkSpec:
        return LinkSpec(a, b, self.bandwidth.value, self.latency.value)

    def network_spec(self, kind: str = "switched") -> NetworkSpec:
        src = {"bandwidth_mbps": f"measured to {self.peer}: {self.bandwidth.describe()}; {self.bandwidth.how}",
               "latency_ms": f"measured to {self.peer}: {self.latency.describe()}; {self.latency.how}",
               "jitter_ms": "IQR / 1.349 of the one-way latency samples"}
        return NetworkSpec(kind=kind, bandwidth=self.bandwidth.value, latency=self.latency.value,  # type: ignore[arg-type]
                           jitter=self.jitter, sources=src)


def check_addr(addr: str, *, bind: bool) -> None:
    port = r"(\d+|\*)" if bind else r"\d+"  # a listener may let the OS pick the port
    if not re.match(rf"^(tcp://[^:/]+:{port}|ipc://.+|inproc://.+)$", addr or ""):
        raise WireError(f"bad address {addr!r}", where="--echo" if bind else "--peer",
                        fix="use tcp://HOST:PORT (e.g. tcp://192.168.1.20:5599)")
    if not bind and addr.startswith("tcp://*"):
        raise WireError(f"cannot connect to a wildcard address {addr!r}", where="--peer",
                        fix="give the peer's host name or IP, e.g. tcp://192.168.1.20:5599")


def serve_echo(addr: str, *, idle_timeout: float | None = None, announce: bool = True) -> int:
    """The peer side of `measure_link`: a ROUTER socket answering every PING with a PONG that
    reports the payload size received. Ends on SHUTDOWN, SIGINT/SIGTERM, or `idle_timeout`
    seconds without a message. Returns the number of messages served."""
    import zmq

    from primasim.runtime import wire

    check_addr(addr, bind=True)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(addr)
    except zmq.ZMQError as exc:
        sock.close()
        ctx.term()
        raise WireError(f"cannot listen on {addr} ({exc})", where="--echo",
                        fix="pick a free port, or an address of this machine") from None
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    if announce:
        print(f"primasim-echo listening on {endpoint}", flush=True)
    served = 0
    last = time.monotonic()
    try:
        while True:
            try:
                got = wire.recv(sock, 0.2, peer="profiler", router=True)
            except WireError:
                continue  # junk from a stranger: ignore it, keep serving
            if got is None:
                if idle_timeout is not None and time.monotonic() - last > idle_timeout:
                    break
                continue
            ident, msg = got
            last = time.monotonic()
            served += 1
            if msg.type == wire.MsgType.PING:
                wire.send(sock, wire.MsgType.PONG, identity=ident, obj={"n": msg.nbytes, "t": time.time()},
                          crc=False)
            elif msg.type == wire.MsgType.SHUTDOWN:
                wire.send(sock, wire.MsgType.ACK, identity=ident, obj={"served": served}, crc=False)
                break
    except KeyboardInterrupt:
        pass
    finally:
        sock.close(0)
        ctx.term()
    return served


def measure_link(addr: str, *, timeout: float = 3.0, quick: bool = False, pings: int | None = None,
                 max_payload: int | None = None) -> LinkMeasurement:
    """Latency and bandwidth to an echo peer at `addr` over the runtime's wire format.

    Raises WireError (no hang) when the peer does not answer within `timeout` seconds."""
    import zmq

    from primasim.runtime import wire

    check_addr(addr, bind=False)
    pings = pings or (15 if quick else 40)
    max_payload = max_payload or ((4 if quick else 16) * MiB)
    target = 0.05 if quick else 0.15  # grow the payload until one transfer takes this long
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    fix = ("start `python -m primasim.profile.profiler --echo tcp://*:PORT` on the peer, "
           "and check the host, the port and any firewall in between")

    def rtt(payload: np.ndarray | None, tmo: float) -> float:
        t0 = time.perf_counter()
        wire.send(sock, wire.MsgType.PING, array=payload, crc=False)
        got = wire.recv(sock, tmo, peer=addr)
        dt = time.perf_counter() - t0
        if got is None:
            raise WireError(f"no reply from {addr} within {tmo:.1f} s", where="--peer", fix=fix)
        msg = got[1]
        if msg.type != wire.MsgType.PONG:
            raise WireError(f"peer answered {msg.type.name}, not PONG", where=f"--peer {addr}",
                            fix="point --peer at `python -m primasim.profile.profiler --echo` or a primasim worker")
        n = int(msg.obj.get("n", -1))
        if payload is not None and n not in (-1, payload.nbytes):
            raise WireError(f"peer received {n} of {payload.nbytes} bytes", where=f"--peer {addr}",
                            fix="check the network path")
        return dt

    try:
        try:
            sock.connect(addr)
        except zmq.ZMQError as exc:
            raise WireError(f"cannot connect to {addr} ({exc})", where="--peer",
                            fix="use tcp://HOST:PORT of a reachable peer") from None
        rtt(None, timeout)  # reachability; also sets up the TCP connection
        small = [rtt(None, timeout) for _ in range(pings)]
        rtt_med = statistics.median(small)
        size = 64 * KiB
        while True:  # find a payload big enough that bandwidth, not latency, dominates
            buf = np.zeros(size, dtype=np.uint8)
            t = rtt(buf, timeout + size / (0.1 * MB))
            if t - rtt_med > target or size >= max_payload:
                break
            size = min(size * 4, max_payload)
        reps = 3 if quick else 7
        big = [rtt(buf, timeout + size / (0.1 * MB)) for _ in range(reps)]
    finally:
        sock.close(0)
        ctx.term()
    lat = measurement("latency", (s / 2 for s in small), "ms", MS,
                   f"RTT / 2 of {pings} empty PING/PONG messages (primasim.runtime.wire over zmq DEALER -> ROUTER, no CRC)")
    bw = measurement("bandwidth", (size / max(t - rtt_med, 1e-9) for t in big), "MB/s", MB,
                  f"{size / KiB:.0f} KiB PING payload, (size) / (t - median RTT of empty PINGs), {reps} repeats")
    return LinkMeasurement(addr, lat, bw, size)
