"""The network between devices: one shared Wi-Fi medium, a switch with one NIC per device, or
independent shaped links per pair.

A message costs airtime on what it crosses, then a one-way latency that does not occupy it (stack,
AP forwarding, propagation):
- Wi-Fi: every device talks through one access point, so every message queues for the same airtime
  server (dllama's all-to-all, exo's broadcasts, a prefetching ring next to a busy link contend);
  each transmission opportunity pays its contention, preamble and block ack on top of the payload
  (NetworkSpec.airtime).
- switched, `contention = "nic"`: a message holds its sender's transmit NIC and its receiver's
  receive NIC for bytes / bandwidth (a cut-through switch): a node sending to seven peers shares its
  one NIC among them (dllama's all-reduce on 8 nodes).
- switched, `contention = "pair"`: each direction of each pair is its own server (the emulation's
  per-peer tbf; `burst_kb` makes it a token bucket).
Latency jitter is drawn from a gamma distribution with the cluster's mean and standard deviation,
from a seeded generator, so runs are reproducible and report P50/P90.
"""

from __future__ import annotations

import numpy as np
import simpy

from primasim.core.cluster import NetworkSpec

from ._engine import Proc, Recorder, Server

MTU = 1500  # bytes of one Ethernet frame


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
                 recorder: Recorder, jitter: bool = True, frames: bool = True, buckets: bool = True) -> None:
        self.env = env
        self.spec = spec
        self.rng = rng
        self.recorder = recorder
        self.jitter = jitter and spec.jitter > 0
        self.frames = frames
        self.buckets = buckets
        self.medium = Server(env, device="wifi", resource="net", recorder=None) if spec.kind == "wifi" else None
        self.nics = spec.kind == "switched" and spec.contention == "nic"
        self._links: dict[tuple[str, str], Server] = {}
        self._egress: dict[str, float] = {}  # when the switch port to each device has drained its queue
        self.bytes_on: dict[tuple[str, str], float] = {}
        self.messages = 0
        self._link_of: dict[tuple[str, str], tuple[float, float]] = {}  # (bandwidth, latency) per pair
        self._air: dict[tuple[str, str, float], float] = {}

    def link(self, a: str, b: str) -> tuple[float, float]:
        """The spec's (bandwidth, latency) of a pair, looked up once (every message asks)."""
        v = self._link_of.get((a, b))
        if v is None:
            v = self._link_of[(a, b)] = self.spec.link(a, b)
        return v

    def _nic(self, dev: str, direction: str) -> Server:
        key = (dev, direction)
        srv = self._links.get(key)
        if srv is None:
            srv = self._links[key] = Server(self.env, device=dev, resource="net", recorder=None)
        return srv

    def _server(self, a: str, b: str) -> Server:
        if self.medium is not None:
            return self.medium
        key = (a, b)
        srv = self._links.get(key)
        if srv is None:
            srv = self._links[key] = Server(self.env, device=a, resource="net", recorder=None)
            burst = self.spec.burst(a, b)
            if burst > 0 and self.buckets:
                srv.throttle = LinkBucket(self.link(a, b)[0], burst).duration
        return srv

    def latency(self, a: str, b: str) -> float:
        _, lat = self.link(a, b)
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
        bw, _ = self.link(a, b)
        t0 = self.env.now
        if overhead > 0:
            yield self.env.timeout(overhead)  # sender-side software cost (serialisation, RPC)
        if self.nics:
            # the sender's NIC puts the bytes on its port at line rate; the switch's port to the
            # receiver drains its queue first in, first out at the same rate (frames pipeline, so
            # an idle port adds one frame's time)
            yield from self._nic(a, "tx").serve(nbytes / bw)
            done = max(self.env.now + min(nbytes, MTU) / bw, self._egress.get(b, 0.0) + nbytes / bw)
            self._egress[b] = done
            yield self.env.timeout(done - self.env.now)
        else:
            key = (a, b, nbytes)  # a run sends few distinct sizes: the airtime formula once each
            air = self._air.get(key)
            if air is None:
                air = self._air[key] = self.spec.airtime(a, b, nbytes) if self.frames else nbytes / bw
            yield from self._server(a, b).serve(air)
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
        if self.nics:
            return sum(s.busy_time for s in self._links.values())
        return sum(s.busy_time for s in self._links.values())
