"""The network between devices: one shared Wi-Fi medium, or independent switched links.

A message costs airtime (bytes / bandwidth, plus an optional per-frame overhead) on the medium it
crosses, then a one-way latency that does not occupy the medium (stack, AP forwarding,
propagation). On Wi-Fi every device talks through one access point, so all messages queue for the
same airtime server: concurrent senders (dllama's all-to-all, exo's broadcasts, a prefetching ring
next to a busy link) contend. On a switched network each direction of each pair is its own server.
Latency jitter is drawn from a gamma distribution with the cluster's mean and standard deviation,
from a seeded generator, so runs are reproducible and report P50/P90.
"""

from __future__ import annotations

import numpy as np
import simpy

from .._cluster import NetworkSpec
from ._engine import Proc, Recorder, Server


class LinkBucket:
    """A shaped link's token bucket (tc tbf): tokens refill at the link's rate up to `burst` bytes;
    a message passes at once while the bucket holds its bytes, and waits at the rate for the rest.
    Plugged into the link's Server as its throttle: the job's duration is bytes / rate."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.t = burst, 0.0

    def duration(self, now: float, seconds: float) -> float:
        need = seconds * self.rate  # bytes
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        wait = max(0.0, need - self.tokens) / self.rate
        self.tokens = max(0.0, self.tokens - need)
        self.t = now + wait
        return wait


class Network:
    """Airtime servers plus latency draws for one cluster's network."""

    def __init__(self, env: simpy.Environment, spec: NetworkSpec, *, rng: np.random.Generator,
                 recorder: Recorder, jitter: bool = True, frame_overhead: float = 0.0, buckets: bool = True) -> None:
        self.env = env
        self.spec = spec
        self.rng = rng
        self.recorder = recorder
        self.jitter = jitter and spec.jitter > 0
        self.frame_overhead = frame_overhead
        self.buckets = buckets
        self.medium = Server(env, device="wifi", resource="net", recorder=None) if spec.kind == "wifi" else None
        self._links: dict[tuple[str, str], Server] = {}
        self.bytes_on: dict[tuple[str, str], float] = {}
        self.messages = 0

    def _server(self, a: str, b: str) -> Server:
        if self.medium is not None:
            return self.medium
        key = (a, b)
        srv = self._links.get(key)
        if srv is None:
            srv = self._links[key] = Server(self.env, device=a, resource="net", recorder=None)
            burst = self.spec.burst(a, b)
            if burst > 0 and self.buckets:
                srv.throttle = LinkBucket(self.spec.link(a, b)[0], burst).duration
        return srv

    def latency(self, a: str, b: str) -> float:
        _, lat = self.spec.link(a, b)
        if not self.jitter or lat <= 0:
            return lat
        sd = self.spec.jitter
        shape = (lat / sd) ** 2
        return float(self.rng.gamma(shape, lat / shape))

    def send(self, a: str, b: str, nbytes: float, *, name: str = "", seq: int = 0, token: int = -1,
             overhead: float = 0.0) -> Proc:
        """Deliver `nbytes` from a to b (returns when the receiver has them)."""
        if a == b:
            return
        bw, _ = self.spec.link(a, b)
        t0 = self.env.now
        if overhead > 0:
            yield self.env.timeout(overhead)  # sender-side software cost (serialisation, RPC)
        yield from self._server(a, b).serve(self.frame_overhead + nbytes / bw)
        yield self.env.timeout(self.latency(a, b))
        self.messages += 1
        self.bytes_on[(a, b)] = self.bytes_on.get((a, b), 0.0) + nbytes
        rec = self.recorder
        rec.add(a, "net_tx_bytes", nbytes)
        rec.add(b, "net_rx_bytes", nbytes)
        rec.add(a, f"tx_bytes_to:{b}", nbytes)
        rec.span(a, "send", t0, self.env.now, name or f"->{b}", seq, token, nbytes)

    def airtime_busy(self) -> float:
        if self.medium is not None:
            return self.medium.busy_time
        return sum(s.busy_time for s in self._links.values())
