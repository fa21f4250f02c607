"""Everything primasim reads about the machine it runs on, in one place: /proc (memory, I/O and page
faults of a process), cgroups v1 and v2 (limits, usage, page cache, throttles), /sys (block devices,
caches) and macOS's vm_stat/sysctl. The profiler, `local`, the worker's measurements, the emulator
and validate all read through here (psutil where it does the job: a process's I/O counters).
"""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil

from .cgroups import UNLIMITED, Mounts, kv_file, own_dirs, read_int, read_text
from .units import MB, GiB, KiB, MiB

CGROUP_V1 = Path("/sys/fs/cgroup")  # where the emulator makes its v1 cgroups (one directory per controller)


def meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """/proc/meminfo in bytes ({} where there is none)."""
    out: dict[str, int] = {}
    try:
        with open(path) as fh:
            for line in fh:
                k, _, v = line.partition(":")
                parts = v.split()
                if parts:
                    out[k.strip()] = int(parts[0]) * (KiB if len(parts) > 1 and parts[1] == "kB" else 1)
    except (OSError, ValueError):
        pass
    return out


@dataclass(frozen=True)
class CgroupDirs:
    """This process's cgroup directories: v1 per controller, and the v2 (unified) one."""

    v1: dict[str, Path] = field(default_factory=dict)
    v2: Path | None = None


def cgroup_dirs(proc_cgroup: str = "/proc/self/cgroup", mountinfo: str = "/proc/self/mountinfo") -> CgroupDirs:
    """This process's cgroup directories (primasim.core.cgroups reads the mounts and /proc/self/cgroup)."""
    v1, v2 = own_dirs(proc_cgroup, Mounts.read(mountinfo))
    return CgroupDirs(v1, v2)


@dataclass(frozen=True)
class Limits:
    """OS limits this process runs under (None = no such limit)."""

    cpu_affinity: int
    cpu_quota: float | None = None  # cores (cfs_quota / cfs_period), lowest along the hierarchy
    cpu_period: float | None = None  # s, the CFS period of that quota
    mem_limit: int | None = None  # bytes
    mem_usage: int = 0
    mem_file: int = 0  # page cache charged to the cgroup (reclaimable)
    mem_slab_reclaimable: int = 0
    cgroup_version: int = 0  # 1 or 2 for the memory limit seen; 0 when none
    memsw_limit: int | None = None
    blkio_read_bps: dict[str, int] = field(default_factory=dict)  # "major:minor" -> bytes/s
    cgroups: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [f"affinity {self.cpu_affinity} CPUs"]
        parts.append(f"cpu quota {self.cpu_quota:.2f} cores" if self.cpu_quota else "no cpu quota")
        parts.append(f"memory limit {self.mem_limit / MiB:.0f} MiB (cgroup v{self.cgroup_version})"
                     if self.mem_limit else "no memory limit")
        if self.blkio_read_bps:
            parts.append("blkio read " + ", ".join(f"{d} {b / MB:.0f} MB/s" for d, b in self.blkio_read_bps.items()))
        else:
            parts.append("no blkio throttle")
        return "; ".join(parts)


def read_limits(dirs: CgroupDirs | None = None) -> Limits:
    """CPU, memory and block-I/O limits of this process, from cgroup v1 or v2."""
    dirs = dirs if dirs is not None else cgroup_dirs()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        affinity = os.cpu_count() or 1
    quota: float | None = None
    period: float | None = None
    mem_limit: int | None = None
    usage = file_ = slab = 0
    version = 0
    memsw: int | None = None
    blk: dict[str, int] = {}
    cg: dict[str, str] = {}
    if "cpu" in dirs.v1:
        d = dirs.v1["cpu"]
        cg["cpu"] = str(d)
        quota, period = _v1_cpu_quota(d)
    if "memory" in dirs.v1:
        d = dirs.v1["memory"]
        cg["memory"] = str(d)
        lim = read_int(d / "memory.limit_in_bytes")
        st = kv_file(d / "memory.stat")
        hier = st.get("hierarchical_memory_limit")
        cands = [x for x in (lim, hier) if x is not None and x < UNLIMITED]
        if cands:
            mem_limit = min(cands)
            version = 1
            usage = read_int(d / "memory.usage_in_bytes") or 0
            file_ = st.get("total_inactive_file", st.get("inactive_file", 0)) + \
                st.get("total_active_file", st.get("active_file", 0))
            sw = read_int(d / "memory.memsw.limit_in_bytes")
            hsw = st.get("hierarchical_memsw_limit")
            swc = [x for x in (sw, hsw) if x is not None and x < UNLIMITED]
            memsw = min(swc) if swc else None
    if "blkio" in dirs.v1:
        d = dirs.v1["blkio"]
        cg["blkio"] = str(d)
        for line in (read_text(d / "blkio.throttle.read_bps_device") or "").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                blk[parts[0]] = int(parts[1])
    if dirs.v2 is not None:
        d = dirs.v2
        cg.setdefault("unified", str(d))
        if quota is None:
            quota, period = _v2_cpu_quota(d)
        if mem_limit is None:
            lim = read_int(d / "memory.max")
            if lim is not None and lim < UNLIMITED:
                mem_limit, version = lim, 2
                usage = read_int(d / "memory.current") or 0
                st = kv_file(d / "memory.stat")
                file_ = st.get("file", 0)
                slab = st.get("slab_reclaimable", 0)
        if not blk:
            for line in (read_text(d / "io.max") or "").splitlines():
                m = re.match(r"(\d+:\d+)\s.*\brbps=(\d+)", line)
                if m:
                    blk[m.group(1)] = int(m.group(2))
    return Limits(affinity, quota, period, mem_limit, usage, file_, slab, version, memsw, blk, cg)


def _v1_cpu_quota(d: Path) -> tuple[float | None, float | None]:
    """Lowest cfs quota (cores) of this cgroup and its ancestors (v1 quotas nest), and its period (s)."""
    best: tuple[float | None, float | None] = (None, None)
    while True:
        q = read_int(d / "cpu.cfs_quota_us")
        p = read_int(d / "cpu.cfs_period_us")
        if q is None:
            break
        if q > 0 and p and (best[0] is None or q / p < best[0]):
            best = (q / p, p / 1e6)
        if d.parent == d or not (d.parent / "cpu.cfs_quota_us").exists():
            break
        d = d.parent
    return best


def _v2_cpu_quota(d: Path) -> tuple[float | None, float | None]:
    best: tuple[float | None, float | None] = (None, None)
    while (d / "cgroup.controllers").exists():
        q, _, p = (read_text(d / "cpu.max") or "max").partition(" ")
        if q != "max" and p and (best[0] is None or int(q) / int(p) < best[0]):
            best = (int(q) / int(p), int(p) / 1e6)
        if d.parent == d:
            break
        d = d.parent
    return best


def effective_cores(limits: Limits) -> int:
    """Compute threads: CPUs we may run on, capped by the CPU quota (rounded up)."""
    n = limits.cpu_affinity
    if limits.cpu_quota:
        n = min(n, max(1, math.ceil(limits.cpu_quota - 1e-9)))
    return max(1, n)


@dataclass(frozen=True)
class MemoryInfo:
    """prima.cpp's view of memory: total, available for the model, swap."""

    total: float
    available: float
    swap_total: float
    swap_available: float
    how: str


def linux_memory(mi: dict[str, int], limits: Limits) -> MemoryInfo:
    """Linux: MemAvailable x 0.8 (prima.cpp); inside a memory cgroup, the lower of that and what
    the cgroup still allows (v1: limit - usage + its page cache; v2: prima.cpp's Docker formula)."""
    total = float(mi.get("MemTotal", 0))
    host_avail = 0.8 * float(mi.get("MemAvailable", mi.get("MemFree", 0)))
    how = "Linux: /proc/meminfo MemAvailable x 0.8 (prima.cpp)"
    avail = host_avail
    swap_total = float(mi.get("SwapTotal", 0))
    swap_avail = float(mi.get("SwapFree", 0))
    if limits.mem_limit:
        lim = float(limits.mem_limit)
        if limits.cgroup_version == 2:
            cg = max(0.0, lim - limits.mem_usage) + 0.5 * (limits.mem_slab_reclaimable + limits.mem_file)
            cg = min(cg, lim)
            f = "memory.max - memory.current + 0.5 (slab_reclaimable + file) (prima.cpp, cgroup v2)"
        else:
            cg = min(lim, max(0.0, lim - limits.mem_usage) + limits.mem_file)
            f = "limit - usage + page cache (total_inactive_file + total_active_file) (cgroup v1)"
        if cg < avail:
            avail = cg
            how = f"memory cgroup: {f} = {cg / GiB:.2f} GiB < host MemAvailable x 0.8 = {host_avail / GiB:.2f} GiB"
        else:
            how += f"; memory cgroup allows more ({f} = {cg / GiB:.2f} GiB)"
        total = min(total, lim) if total else lim
        if limits.memsw_limit is not None:
            swap_total = min(swap_total, max(0.0, limits.memsw_limit - lim))
            swap_avail = min(swap_avail, swap_total)
    return MemoryInfo(total, min(avail, total), swap_total, swap_avail, how)


def macos_available_memory(vm: dict[str, int], page_size: int, uma: bool) -> float:
    """prima.cpp's macOS formula (profiler.cpp device_host_physical_memory): free + inactive +
    purgeable pages, plus the share of active pages the compressor can free (10% on Apple Silicon,
    where the GPU tends to use inactive memory; 50% on Intel), plus speculative and compressor
    pages on Intel. `vm` holds page counts keyed like vm_statistics64 (free_count, ...)."""
    pages = vm.get("free_count", 0) + vm.get("inactive_count", 0) + vm.get("purgeable_count", 0)
    avail = float(pages * page_size)
    avail += vm.get("active_count", 0) * (0.1 if uma else 0.5) * page_size
    if not uma:
        avail += (vm.get("speculative_count", 0) + vm.get("compressor_page_count", 0)) * page_size
    return avail


_VM_STAT_KEYS = {"Pages free": "free_count", "Pages active": "active_count", "Pages inactive": "inactive_count",
                 "Pages speculative": "speculative_count", "Pages purgeable": "purgeable_count",
                 "Pages occupied by compressor": "compressor_page_count"}


def parse_vm_stat(text: str) -> tuple[dict[str, int], int]:
    """Page counts and page size from macOS `vm_stat` output."""
    m = re.search(r"page size of (\d+) bytes", text)
    page = int(m.group(1)) if m else 4096
    out: dict[str, int] = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k.strip() in _VM_STAT_KEYS:
            try:
                out[_VM_STAT_KEYS[k.strip()]] = int(v.strip().rstrip("."))
            except ValueError:
                pass
    return out, page


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def macos_memory() -> MemoryInfo:
    """macOS: vm_stat + sysctl (not exercised on Linux; the formula is unit-tested)."""
    try:
        text = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    vm, page = parse_vm_stat(text)
    uma = _sysctl("hw.optional.arm64") == "1"
    total = float(_sysctl("hw.memsize") or 0)
    avail = macos_available_memory(vm, page, uma)
    swap_total = swap_avail = 0.0
    m = re.search(r"total = ([\d.]+)M .* free = ([\d.]+)M", _sysctl("vm.swapusage"))
    if m:
        swap_total, swap_avail = float(m.group(1)) * MiB, float(m.group(2)) * MiB
    return MemoryInfo(total, min(avail, total) if total else avail, swap_total, swap_avail,
                      "macOS: (free + inactive + purgeable) + active x " + ("0.1 (UMA)" if uma else
                                                                            "0.5 + speculative + compressor (Intel)"))


def device_os() -> str:
    if sys.platform == "darwin":
        return "macos"
    if "ANDROID_ROOT" in os.environ or "com.termux" in os.environ.get("PREFIX", ""):
        return "android"
    return "linux"


def memory_info(limits: Limits | None = None) -> MemoryInfo:
    if device_os() == "macos":
        return macos_memory()
    return linux_memory(meminfo(), limits if limits is not None else read_limits())


def cpu_model() -> str:
    for line in (read_text(Path("/proc/cpuinfo")) or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return _sysctl("machdep.cpu.brand_string") or platform.processor() or platform.machine()


def llc_bytes() -> int:
    """Size of the last-level cache as the OS reports it (0 if unknown)."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        s = read_text(idx / "size")
        if s and (read_text(idx / "type") or "") != "Instruction":
            m = re.match(r"(\d+)([KMG]?)", s)
            if m:
                best = max(best, int(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": GiB}[m.group(2)])
    return best


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "numpy", "pyzmq"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# =============================================================================== processes
def read_bytes(pid: int | None = None) -> int:
    """Bytes a process caused to be read from the block layer so far (page-fault and readahead
    reads included; all threads): /proc/<pid>/io read_bytes, through psutil. 0 if unreadable."""
    try:
        return int(psutil.Process(pid).io_counters().read_bytes)
    except (psutil.Error, AttributeError):  # no such process; no io_counters on this OS
        return 0


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


def thread_cpu(pid: int | str = "self") -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of each thread of a process: tid -> (name, seconds)."""
    out: dict[int, tuple[str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        f = raw[raw.rindex(")") + 2:].split()
        sec = (int(f[11]) + int(f[12])) / tick
        try:  # nanoseconds on the CPU (clock ticks are 10 ms: too coarse for a thread's share of a token)
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                sec = int(fh.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            pass
        out[int(tid)] = (raw[raw.index("(") + 1:raw.rindex(")")], sec)
    return out


def thread_cpu_since(before: dict[int, tuple[str, float]], pid: int | str = "self") -> dict[str, float]:
    """CPU seconds per thread name since the `thread_cpu` snapshot `before` (threads of one name summed)."""
    out: dict[str, float] = {}
    for tid, (name, sec) in thread_cpu(pid).items():
        out[name] = out.get(name, 0.0) + sec - (before[tid][1] if tid in before else 0.0)
    return out


_PAGE = os.sysconf("SC_PAGE_SIZE")


def anon_bytes() -> int:
    """This process's anonymous resident memory, cheaply (/proc/self/statm: resident - shared;
    shared = file-backed + shmem pages), for sampling many times a second."""
    try:
        with open("/proc/self/statm") as fh:
            f = fh.read().split()
        return (int(f[1]) - int(f[2])) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


# =============================================================================== block devices
@dataclass(frozen=True)
class BlockDevice:
    """The whole disk a path lives on (blkio throttles and readahead are per disk)."""

    name: str  # e.g. "vda"
    major: int
    minor: int
    read_ahead: int  # bytes

    @property
    def devno(self) -> str:
        return f"{self.major}:{self.minor}"


def block_device_of(path: str | Path) -> BlockDevice | None:
    """The disk under `path` (the parent disk of a partition); None for virtual filesystems."""
    st = os.stat(path)
    sys_dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if not sys_dev.exists():
        return None
    real = sys_dev.resolve()
    if (real / "partition").exists():
        real = real.parent
    dev = read_text(real / "dev")
    if not dev or ":" not in dev:
        return None
    major, minor = (int(x) for x in dev.split(":"))
    ra = read_int(real / "queue" / "read_ahead_kb")
    return BlockDevice(real.name, major, minor, (ra or 128) * KiB)
