"""An emulated device's CPU as the host kernel runs it: a CFS bandwidth quota charged at scheduler
ticks (`CpuQuota`), and the host CPU that the devices pinned to it share (`HostCpu`).

runtime/emulate.py confines each emulated device to a cgroup with `cpu.cfs_quota_us` /
`cpu.cfs_period_us` and pins a single-thread device to one of the host's CPUs
(`runtime_facts.emulated_cpus`); devices pinned to the same CPU compete for it when they compute
at once (the recurrent pipeline's S >= 2 sequences in flight, a draft beside a ring). Used by the
runtime model (sim/_runtime.py) through the event engine's `Server` extension points: `throttle`
(a duration, a device alone on its CPUs) and `runner` (an event, a device on a shared host CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import simpy

from primasim.core.runtime_facts import BACKGROUND_CPU, HOST_CONTENTION, SCHED_TICK, emulated_cpus

from ._engine import Proc

if TYPE_CHECKING:
    from ._context import SimContext
    from ._devices import SimDevice

_EPS = 1e-12  # 1 ps of work: a smaller remainder is done (it would not move the clock)


class CpuQuota:
    """A device's CPU behind a CFS bandwidth limit (cgroup `cpu.cfs_quota_us` / `cfs_period_us`).

    The profile measures the device's kernels back to back, i.e. at the quota's average rate
    (`quota / threads` of the CPUs). The kernel refills the group's pool with `quota x period`
    CPU-seconds at every period boundary, up to the quota (the period timer keeps its phase, and
    an idle spell leaves the pool full), so a short burst after a wait -- one ring hop's layers --
    runs at the CPUs' full speed until the pool is spent, then waits for the next refill. The
    kernel sees the pool spent only when it accounts the running thread's time, at a scheduler
    tick (`SCHED_TICK`) for a thread that computes without system calls (an XLA call): the thread
    runs on into the tick, and the overrun is a debt the next refills repay. The worker's
    background threads spend `BACKGROUND_CPU` of the quota (the profile's probe runs without
    them). Without an emulated quota (or one of at least the worker's threads) time is the
    profiled time. A device pinned to a host CPU that others share (`host`) runs its work through
    that CPU (`start`), which also slows it while the others compute."""

    def __init__(self, dev: SimDevice, enabled: bool = True, host: HostCpu | None = None,
                 tick: float = SCHED_TICK) -> None:
        em = dev.spec.emulate if enabled else None
        q = em.cpu_quota if em is not None else 0.0
        n = max(1, int(em.threads or math.ceil(q))) if em is not None else 1
        self.period = em.cpu_period if em is not None else 0.0
        self.frac = q / n if 0 < q < n and self.period > 0 else 1.0  # average speed / full speed
        # wall-seconds at full speed per period left to the compute: the worker's background threads
        # (memory sampler, control, zmq: `BACKGROUND_CPU`) take their share of every period's quota
        self.budget = max(0.5 * q, q - BACKGROUND_CPU) / n * self.period if self.frac < 1.0 else self.period
        self.tick = tick
        self.index = -1  # the period of the pool's last refill
        self.pool = self.budget  # CPU-seconds (full speed) left; negative: a debt
        self.used = 0.0  # CPU-seconds charged on a shared host CPU so far, contention included
        self.host = host  # the host CPU this device is pinned to, shared with others (or None)

    @property
    def limited(self) -> bool:
        return self.frac < 1.0

    def refill(self, k: int) -> None:
        """The pool at period `k` (refilled at every period boundary since the last, up to the quota)."""
        if k > self.index:
            self.pool = min(self.budget, self.pool + (k - self.index) * self.budget)
            self.index = k

    def duration(self, now: float, profiled: float) -> float:
        """Wall seconds of work that takes `profiled` seconds at the quota's average rate, on CPUs
        of the device's own."""
        if profiled <= 0 or not self.limited:
            return profiled
        P, T, t, left = self.period, self.tick, now, profiled * self.frac  # full-speed seconds to run
        check = True  # the kernel looks at the pool: when the work starts and at every tick
        while left > 1e-15:
            k = math.floor(t / P + 1e-12)
            self.refill(k)
            # throttled until a refill leaves time (1 ps: a smaller remainder would not move t)
            if (check or T <= 0) and self.pool <= _EPS:
                t = (k + 1) * P
                continue
            check = False
            edge = (k + 1) * P
            edge = min(edge, (math.floor(t / T + 1e-12) + 1) * T) if T > 0 else min(edge, t + self.pool)
            run = min(left, edge - t)
            self.pool -= run
            left -= run
            t += run
            check = T > 0 and abs(t / T - round(t / T)) < 1e-9
        return t - now

    def start(self, now: float, profiled: float) -> simpy.events.Event:
        """The event of work that takes `profiled` seconds at the quota's average rate ending,
        run on the shared host CPU (`host`)."""
        assert self.host is not None
        return self.host.run(self, now, profiled * self.frac if self.limited else profiled)


@dataclass
class _Job:
    cpu: int
    quota: CpuQuota
    left: float  # full-speed CPU-seconds still to run
    done: simpy.events.Event
    check: bool = True  # the kernel looks at the group's pool when the work starts


class Host:
    """The host CPUs an emulated cluster runs on, shared by the devices pinned to them.

    CFS shares a CPU evenly among the runnable groups of equal `cpu.shares` (the emulation gives
    every device the same): while n devices' jobs are runnable on one CPU each progresses at 1 / n
    of its speed, the one already running as well as the one that arrived -- processor sharing. A
    job's own quota still applies (`CpuQuota`, charged at ticks, the pool checked when the job
    starts and at every tick): a throttled device leaves the CPU to the others until its refill.
    While another CPU computes too, a job's work goes `contention` times slower for the same CPU
    time (the CPUs share the memory system the decode kernels stream weights through:
    `runtime_facts.HOST_CONTENTION`), and its quota is charged the CPU time. The state (each job's
    work left, each quota's pool) is advanced piecewise between the events that change a rate --
    an arrival, a completion, a period's refill, a tick -- and each arrival re-plans when the jobs end."""

    def __init__(self, env: simpy.Environment, tick: float = SCHED_TICK, contention: float = 1.0) -> None:
        self.env = env
        self.tick = tick
        self.contention = contention
        self.t = 0.0  # the time the jobs' state is advanced to
        self.jobs: list[_Job] = []
        self._plan = 0  # the current completion plan (an older wake-up is stale)

    def run(self, cpu: int, quota: CpuQuota, now: float, work: float) -> simpy.events.Event:
        """Start `work` full-speed CPU-seconds of `quota`'s device on `cpu` at `now`; the event fires when done."""
        self._advance(now)
        ev = self.env.event()
        if work <= 0:
            ev.succeed()
            return ev
        self.jobs.append(_Job(cpu, quota, work, ev))
        self._replan()
        return ev

    # ------------------------------------------------------------------------------ the state
    def _segment(self, t: float, until: float) -> float:
        """Advance every job from `t` by one piece (to the next rate change, at most `until`)."""
        T = self.tick
        nxt = until
        running: list[_Job] = []
        for j in self.jobs:
            q = j.quota
            if not q.limited:
                running.append(j)
                continue
            k = math.floor(t / q.period + 1e-12)
            q.refill(k)
            nxt = min(nxt, (k + 1) * q.period)
            if (j.check or T <= 0) and q.pool <= _EPS:
                continue  # throttled until the refill
            j.check = False
            running.append(j)
            if T > 0:
                nxt = min(nxt, (math.floor(t / T + 1e-12) + 1) * T)
        if not running:
            return nxt
        per_cpu: dict[int, int] = {}
        for j in running:
            per_cpu[j.cpu] = per_cpu.get(j.cpu, 0) + 1
        speed = 1.0 / self.contention if len(per_cpu) > 1 else 1.0
        for j in running:
            share = 1.0 / per_cpu[j.cpu]  # of the CPU's time
            nxt = min(nxt, t + j.left / (share * speed))
            if T <= 0 and j.quota.limited:
                nxt = min(nxt, t + max(j.quota.pool, 0.0) / share)
        at_tick = T > 0 and abs(nxt / T - round(nxt / T)) < 1e-9
        for j in running:
            cpu_time = (nxt - t) / per_cpu[j.cpu]
            j.left = max(0.0, j.left - cpu_time * speed)
            j.quota.used += cpu_time
            if j.quota.limited:
                j.quota.pool -= cpu_time
            j.check = at_tick
        return nxt

    def _advance(self, t1: float) -> None:
        """Run the jobs up to `t1`; those that finish fire their events (at the current time)."""
        t = self.t
        while self.jobs and t < t1 - 1e-15:
            t = self._segment(t, t1)
            for j in [j for j in self.jobs if j.left <= _EPS]:
                self.jobs.remove(j)
                j.done.succeed()
        self.t = max(self.t, t1)

    def _first_end(self) -> float:
        """When the first of the current jobs ends (no arrival meanwhile); the state is kept."""
        saved = [(j, j.left, j.check, j.quota.pool, j.quota.index, j.quota.used) for j in self.jobs]
        t = self.t
        try:
            while all(j.left > _EPS for j in self.jobs):
                t = self._segment(t, math.inf)
            return t
        finally:
            for j, left, check, pool, index, used in saved:
                j.left, j.check, j.quota.pool, j.quota.index, j.quota.used = left, check, pool, index, used

    def _replan(self) -> None:
        self._plan += 1
        if not self.jobs:
            return
        plan, end = self._plan, self._first_end()

        def wake() -> Proc:
            yield self.env.timeout(max(0.0, end - self.env.now))
            if plan == self._plan:
                self._advance(self.env.now)
                self._replan()

        self.env.process(wake())


class HostCpu:
    """One CPU of a `Host` (a device pinned to it runs its work there)."""

    def __init__(self, host: Host | simpy.Environment, index: int = 0) -> None:
        self.host = host if isinstance(host, Host) else Host(host)
        self.index = index

    def run(self, quota: CpuQuota, now: float, work: float) -> simpy.events.Event:
        return self.host.run(self.index, quota, now, work)


def host_cpus(ctx: SimContext) -> dict[str, HostCpu]:
    """Per emulated single-CPU device, the host CPU it is pinned to (`SimConfig.host_cpus`, the
    emulation's rule `emulated_cpus`); devices on several CPUs or not emulated get none."""
    n = int(ctx.cfg.host_cpus or 0)
    if n <= 0:
        return {}
    host = Host(ctx.env, ctx.cfg.sched_tick, HOST_CONTENTION if ctx.cfg.host_contention else 1.0)
    cpus: dict[int, HostCpu] = {}
    out = {}
    for i, (name, d) in enumerate(ctx.devices.items()):
        em = d.spec.emulate
        if em is None:
            continue
        pinned = emulated_cpus(i, em.threads, em.cpu_quota, list(range(n)))
        if len(pinned) == 1:
            out[name] = cpus.setdefault(pinned[0], HostCpu(host, pinned[0]))
    return out
