"""What a worker measures about itself: disk reads, page faults, memory, from /proc and its cgroup (v1 or v2).

- bytes read from disk: ``/proc/<pid>/io`` ``read_bytes`` (bytes this process caused to be fetched
  from the block layer, page-fault and readahead reads included; all threads of the process);
- page faults: ``/proc/<pid>/stat`` fields 10 and 12 (minflt, majflt; majflt = faults that read disk);
- memory pressure as prima.cpp defines it, (available before - available during) / total, where
  available counts free + reclaimable (page cache) memory, so the drop is the non-reclaimable
  memory the run adds. Inside a primasim memory cgroup, total = the cgroup limit and
  non-reclaimable = usage - page cache; outside one, the host's memory is shared with unrelated
  processes, so we count this process's own non-reclaimable memory (RssAnon) against MemTotal
  instead of the noisy host-wide MemAvailable.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from primasim.core.cgroups import UNLIMITED, Group, own_group
from primasim.core.procfs import anon_bytes, meminfo, proc_faults, proc_status, read_bytes
from primasim.core.runtime_facts import MEM_SAMPLE_INTERVAL

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NAME = 15


def name_thread(name: str | None = None) -> None:
    """Give the calling thread its Python name at the OS level too (15 characters; `top -H`,
    /proc/<pid>/task/<tid>/comm), so a thread's CPU time can be told from the compute's."""
    raw = (name or threading.current_thread().name).encode()[:15]
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)


def process_memory(pid: int | str = "self") -> dict[str, float]:
    """A process's anonymous and file-backed resident memory (RssAnon, RssFile), bytes."""
    st = proc_status(pid)
    return {"anon_bytes": float(st.get("RssAnon", 0)), "file_bytes": float(st.get("RssFile", 0))}


# ----------------------------------------------------------------------------------- cgroups
@dataclass(frozen=True)
class MemoryView:
    total: float  # bytes: the cgroup limit, or MemTotal
    used: float  # bytes of non-reclaimable memory (cgroup: usage - page cache; else our RssAnon)
    limited: bool  # inside a memory cgroup with a limit


def memory_view(cg: Group | None) -> MemoryView:
    """Total and non-reclaimable memory as prima.cpp counts them (see the module docstring).
    `cg`: the device's own memory cgroup (an emulated device's), whose limit may come later."""
    if cg is not None:
        limit = cg.memory_max()
        limited = limit < UNLIMITED // 2
        return MemoryView(float(limit) if limited else mem_total(),
                          float(max(0, cg.memory_current() - cg.page_cache())), limited)
    return MemoryView(mem_total(), float(anon_bytes()), False)


@functools.cache
def mem_total() -> float:
    """MemTotal (it does not change while we run; sampled many times a second, read once)."""
    return float(meminfo().get("MemTotal", 0))


def device_cgroup() -> Group | None:
    """This process's memory cgroup if it is an emulated device's own (primasim-e*), else None:
    any other cgroup (a container, a session) is shared with unrelated processes."""
    g = own_group("memory")
    return g if g is not None and g.name.startswith("primasim-") else None


class MemorySampler:
    """Memory pressure of one device, prima.cpp's definition: the drop of available memory (free +
    reclaimable) caused by the run, over total memory. `before` is the runtime's own footprint
    (Python, JAX, compiled code: `set_before` after warm-up, minus pinned weights), so pinned
    weights (exo) count and mmap'd ones (page cache, reclaimable) do not; the peak is tracked from `rebase()` (generation start) on, by a
    background thread and at every `sample()`. Total is read at the end: an emulated device's
    memory cgroup limit is set after start-up. With a `sink`, each sample (time, available bytes)
    goes there instead of into `samples` (the worker's Recorder spills them to disk: at 20 a
    second a list grows without bound over a long run)."""

    def __init__(self, interval: float = MEM_SAMPLE_INTERVAL, sink: Callable[[float, float], None] | None = None) -> None:
        self.interval = interval
        self.sink = sink
        self.cg = device_cgroup()
        self.before = memory_view(self.cg).used
        self.peak = self.before
        self.anon_peak = float(anon_bytes())  # this process's anonymous memory, peak since rebase()
        self.samples: list[tuple[float, float]] = []  # (time, available bytes)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def set_before(self, discount: float = 0.0) -> None:
        """Take 'before' now, minus `discount` bytes that belong to the run (pinned weights)."""
        with self._lock:
            self.before = memory_view(self.cg).used - discount
            self.peak = max(self.peak, self.before)

    def rebase(self) -> None:
        """Start tracking the peak again (a new generation)."""
        with self._lock:
            self.peak = memory_view(self.cg).used
            self.anon_peak = float(anon_bytes())
            self.samples.clear()

    def sample(self) -> float:
        mv = memory_view(self.cg)
        anon = float(anon_bytes())
        with self._lock:
            self.peak = max(self.peak, mv.used)
            self.anon_peak = max(self.anon_peak, anon)
            if self.sink is None:
                self.samples.append((time.time(), mv.total - mv.used))
        if self.sink is not None:
            self.sink(time.time(), mv.total - mv.used)
        return mv.used

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="primasim-memsampler", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        name_thread()
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict[str, float]:
        mv = memory_view(self.cg)
        with self._lock:
            drop = max(0.0, self.peak - self.before)
            return {"mem_total": mv.total, "mem_avail_before": mv.total - self.before,
                    "mem_avail_min": mv.total - self.peak, "mem_limited": float(mv.limited),
                    "anon_peak_bytes": self.anon_peak,
                    "memory_pressure": drop / mv.total if mv.total else 0.0}


class IoCounter:
    """Deltas of this process's disk reads and major faults since the last `reset`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.read0 = read_bytes()
        self.min0, self.maj0 = proc_faults()

    def read_bytes(self) -> int:
        return read_bytes() - self.read0

    def major_faults(self) -> int:
        return proc_faults()[1] - self.maj0

    def minor_faults(self) -> int:
        return proc_faults()[0] - self.min0
