"""The event layer: SimPy servers with busy-time accounting, and the recorder that fills a Trace.

Every device resource of the simulator (CPU, GPU, disk, PCIe, the Wi-Fi medium, point-to-point
links) is a `Server`: a `simpy.Resource` (FIFO) or `simpy.PriorityResource` plus the bookkeeping the
metrics need. The queueing tests (tests/test_sim_queue.py) check this same class against M/M/1 and
M/D/1 closed forms, work conservation and Little's law, so what the LLM schedules build on is
checked on its own first.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import simpy

from primasim.core.trace import Sample, Span, Trace


class Recorder:
    """Writes spans, samples and per-device counters into a Trace (spans optional for speed)."""

    def __init__(self, trace: Trace, *, spans: bool = True) -> None:
        self.trace = trace
        self.keep_spans = spans
        self._last: dict[tuple[str, str], Span] = {}

    def span(self, device: str, resource: str, start: float, end: float, name: str = "",
             seq: int = 0, token: int = -1, nbytes: float = 0.0) -> None:
        if not self.keep_spans or end <= start:
            return
        key = (device, resource)
        last = self._last.get(key)
        if (last is not None and last.end == start and last.name == name and last.seq == seq
                and last.token == token):
            # back-to-back work of one step (e.g. layer by layer): one span on the timeline
            last.end = end
            last.nbytes += nbytes
            return
        sp = Span(device, resource, start, end, name, seq, token, nbytes)
        self.trace.spans.append(sp)
        self._last[key] = sp

    def clear_spans(self) -> None:
        self.trace.spans.clear()
        self._last.clear()

    def sample(self, device: str, name: str, time: float, value: float) -> None:
        self.trace.samples.append(Sample(device, name, time, value))

    def add(self, device: str, key: str, value: float) -> None:
        self.trace.add_stat(device, key, value)

    def set(self, device: str, key: str, value: float) -> None:
        self.trace.device_stats.setdefault(device, {})[key] = value

    def device(self, name: str) -> DeviceRecorder:
        """This recorder as one device's (the `primasim.core.trace.Recorder` protocol, which the
        runtime's workers implement too)."""
        return DeviceRecorder(self, name)


class DeviceRecorder:
    """One device's view of a simulation's Recorder."""

    def __init__(self, rec: Recorder, device: str) -> None:
        self.rec, self.name = rec, device

    def span(self, resource: str, start: float, end: float, name: str = "", seq: int = 0, token: int = -1,
             nbytes: float = 0.0) -> None:
        self.rec.span(self.name, resource, start, end, name, seq, token, nbytes)

    def sample(self, name: str, t: float, value: float) -> None:
        self.rec.sample(self.name, name, t, value)

    def add(self, key: str, v: float) -> None:
        self.rec.add(self.name, key, v)


Proc = Generator[simpy.events.Event, Any, Any]


class Server:
    """One SimPy resource with FIFO (or priority) queueing and exact busy-time accounting.

    `serve(d)` is the whole life of one job (queue, hold for d, release); `acquire`/`release` plus
    `work(d)` let a caller hold the server across several steps (e.g. compute interleaved with
    page-fault stalls, where a stalled compute thread keeps its core).
    """

    def __init__(self, env: simpy.Environment, *, device: str = "", resource: str = "cpu",
                 capacity: int = 1, priority: bool = False, recorder: Recorder | None = None) -> None:
        self.env = env
        self.device = device
        self.resource = resource
        self.capacity = capacity
        self.res: simpy.Resource = (simpy.PriorityResource(env, capacity) if priority
                                    else simpy.Resource(env, capacity))
        self._priority = priority
        self.recorder = recorder
        self.busy_time = 0.0  # seconds of work done (summed over parallel slots)
        self.jobs = 0
        # extension point: maps (start time, duration at the average rate) to the wall time the
        # job holds the server -- e.g. a CFS quota that runs bursts at full speed (sim/_runtime.py)
        self.throttle: Callable[[float, float], float] | None = None
        # extension point: maps (start time, duration at the average rate) to the event of the job's
        # end, for a server whose speed others change while the job runs (a host CPU that emulated
        # devices share: sim/_cpu.py HostCpu); takes precedence over `throttle`
        self.runner: Callable[[float, float], simpy.events.Event] | None = None

    # ---------------------------------------------------------------- whole jobs
    def serve(self, duration: float, *, name: str = "", priority: int = 0, nbytes: float = 0.0,
              seq: int = 0, token: int = -1) -> Proc:
        """Queue for the server, hold it for `duration`, release. Use with `yield from`."""
        req = self.res.request(priority=priority) if self._priority else self.res.request()
        yield req
        try:
            yield from self.work(duration, name=name, nbytes=nbytes, seq=seq, token=token)
        finally:
            self.res.release(req)

    # ---------------------------------------------------------------- held across steps
    def acquire(self, priority: int = 0) -> simpy.events.Event:
        return self.res.request(priority=priority) if self._priority else self.res.request()

    def release(self, req: simpy.events.Event) -> None:
        self.res.release(req)

    def work(self, duration: float, *, name: str = "", nbytes: float = 0.0, seq: int = 0,
             token: int = -1) -> Proc:
        """Spend `duration` on the server (the caller holds it)."""
        if duration <= 0.0:
            return
        t0 = self.env.now
        if self.runner is not None:
            yield self.runner(t0, duration)
        else:
            if self.throttle is not None:
                duration = self.throttle(t0, duration)
            yield self.env.timeout(duration)
        self.busy_time += self.env.now - t0
        self.jobs += 1
        if self.recorder is not None:
            self.recorder.span(self.device, self.resource, t0, self.env.now, name, seq, token, nbytes)

    # ---------------------------------------------------------------- state
    @property
    def queue_length(self) -> int:
        return len(self.res.queue)

    @property
    def in_service(self) -> int:
        return self.res.count
