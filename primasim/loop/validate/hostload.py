"""How much of the host's CPU other processes took while ours ran (the simulator does not know them)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import psutil


# ============================================================================ host load
def _host_busy() -> float:
    """CPU seconds all CPUs of the host spent busy since boot (idle, iowait and steal excluded)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def _tree_cpu(root: int) -> float:
    """CPU seconds used so far by `root` and all its descendants (alive ones)."""
    total = 0.0
    try:
        procs = [psutil.Process(root)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return total
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


class HostLoad:
    """How much of the host's CPU *other* processes used while something of ours ran: the
    emulated devices share the host's cores with whatever else runs on it, which the simulator
    does not know about. Sampled at start and stop (our tree = this process and its children,
    counted at stop, plus finished children's time from os.times)."""

    def __init__(self) -> None:
        self.t0 = self.h0 = self.o0 = 0.0
        self.foreign_share = float("nan")
        self.load1 = float("nan")

    def _ours(self) -> float:
        t = os.times()  # children_*: finished (reaped) children, e.g. the workers of a run
        return _tree_cpu(os.getpid()) + t.children_user + t.children_system

    def start(self) -> HostLoad:
        self.t0, self.h0, self.o0 = time.monotonic(), _host_busy(), self._ours()
        return self

    def stop(self) -> float:
        dt = time.monotonic() - self.t0
        busy = _host_busy() - self.h0
        ours = self._ours() - self.o0
        ncpu = len(os.sched_getaffinity(0))
        self.foreign_share = max(0.0, busy - ours) / (dt * ncpu) if dt > 0 else float("nan")
        with contextlib.suppress(OSError):
            self.load1 = float(Path("/proc/loadavg").read_text().split()[0])
        return self.foreign_share
