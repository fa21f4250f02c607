"""What a worker measures about itself: disk reads, page faults, memory, from /proc and cgroup v1.

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

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60


def proc_io(pid: int | str = "self") -> dict[str, int]:
    """/proc/<pid>/io as a dict (rchar, wchar, read_bytes, write_bytes, ...); {} if unreadable."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/io") as fh:
            for line in fh:
                k, v = line.split(":", 1)
                out[k.strip()] = int(v)
    except OSError:
        pass
    return out


def proc_faults(pid: int | str = "self") -> tuple[int, int]:
    """(minor, major) page faults of a process so far (all threads)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except OSError:
        return 0, 0
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[7]), int(fields[9])


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """Byte-valued lines of /proc/<pid>/status (VmRSS, RssAnon, RssFile, ...)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                parts = v.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[k] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


# ----------------------------------------------------------------------------------- cgroup v1
def own_cgroup(controller: str = "memory") -> Path | None:
    """This process's cgroup directory for a v1 controller, if mounted and readable."""
    try:
        with open("/proc/self/cgroup") as fh:
            for line in fh:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                if controller in ctrls.split(","):
                    d = CGROUP_ROOT / controller / path.lstrip("/")
                    return d if d.is_dir() else None
    except OSError:
        pass
    return None


def read_int(path: Path, default: int = 0) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def memory_stat(cg: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in (cg / "memory.stat").read_text().splitlines():
            k, v = line.split()
            out[k] = int(v)
    except (OSError, ValueError):
        pass
    return out


def blkio_read_bytes(cg: Path) -> int:
    """Bytes read through the block layer by a blkio cgroup (all devices)."""
    total = 0
    try:
        for line in (cg / "blkio.throttle.io_service_bytes").read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] == "Read":
                total += int(parts[2])
    except (OSError, ValueError):
        pass
    return total


@dataclass(frozen=True)
class MemoryView:
    total: float  # bytes: the cgroup limit, or MemTotal
    used: float  # bytes of non-reclaimable memory (cgroup: usage - page cache; else our RssAnon)
    limited: bool  # inside a memory cgroup with a limit


def memory_view(cg: Path | None) -> MemoryView:
    """Total and non-reclaimable memory as prima.cpp counts them (see the module docstring).
    `cg`: the device's own memory cgroup (an emulated device's), whose limit may come later."""
    total = float(meminfo().get("MemTotal", 0))
    if cg is not None:
        limit = read_int(cg / "memory.limit_in_bytes", _UNLIMITED)
        usage = read_int(cg / "memory.usage_in_bytes")
        st = memory_stat(cg)
        cache = st.get("total_cache", st.get("cache", 0))
        limited = limit < _UNLIMITED // 2
        return MemoryView(float(limit) if limited else total, float(max(0, usage - cache)), limited)
    return MemoryView(total, float(proc_status().get("RssAnon", 0)), False)


def device_cgroup() -> Path | None:
    """This process's memory cgroup if it is an emulated device's own (primasim-e*), else None:
    any other cgroup (a container, a session) is shared with unrelated processes."""
    cg = own_cgroup("memory")
    return cg if cg is not None and cg.name.startswith("primasim-") else None


class MemorySampler:
    """Memory pressure of one device, prima.cpp's definition: the drop of available memory (free +
    reclaimable) caused by the run, over total memory. `before` is the runtime's own footprint
    (Python, JAX, compiled code: `set_before` after warm-up, minus pinned weights), so pinned
    weights (exo) count and mmap'd ones (page cache, reclaimable) do not; the peak is tracked from `rebase()` (generation start) on, by a
    background thread and at every `sample()`. Total is read at the end: an emulated device's
    memory cgroup limit is set after start-up. With a `sink`, each sample (time, available bytes)
    goes there instead of into `samples` (the worker's Recorder spills them to disk: at 20 a
    second a list grows without bound over a long run)."""

    def __init__(self, interval: float = 0.05, sink: Callable[[float, float], None] | None = None) -> None:
        self.interval = interval
        self.sink = sink
        self.cg = device_cgroup()
        self.before = memory_view(self.cg).used
        self.peak = self.before
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
            self.samples.clear()

    def sample(self) -> float:
        mv = memory_view(self.cg)
        with self._lock:
            self.peak = max(self.peak, mv.used)
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
                    "memory_pressure": drop / mv.total if mv.total else 0.0}


class IoCounter:
    """Deltas of this process's disk reads and major faults since the last `reset`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.read0 = proc_io().get("read_bytes", 0)
        self.min0, self.maj0 = proc_faults()

    def read_bytes(self) -> int:
        return proc_io().get("read_bytes", 0) - self.read0

    def major_faults(self) -> int:
        return proc_faults()[1] - self.maj0

    def minor_faults(self) -> int:
        return proc_faults()[0] - self.min0


def block_device_of(path: str | os.PathLike[str]) -> str | None:
    """'MAJ:MIN' of the whole disk holding `path` (blkio throttles whole disks, not partitions)."""
    st = os.stat(path)
    maj, mnt = os.major(st.st_dev), os.minor(st.st_dev)
    sys_dev = Path(f"/sys/dev/block/{maj}:{mnt}")
    if not sys_dev.exists():
        return None  # tmpfs, overlay on a non-block device, ...
    real = sys_dev.resolve()
    if (real / "partition").exists():
        parent = real.parent
        return (parent / "dev").read_text().strip()
    return f"{maj}:{mnt}"
