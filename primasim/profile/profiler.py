"""The device profiler: measures every DeviceSpec quantity the cost model and the simulator use.

What it measures, and how (prima.cpp's `llama_profile_device` is the model; see
../shared/reference/prima-cpp.md §4 for its choices and README "Device profiles" for ours):

- compute (`cpu_gflops`): the runtime's own kernel, JAX `lax.dot_general` with W stored (out, in)
  and contracted on its last axis, over the matrices of one block of a ModelSpec (Q, K, V, O,
  gate, up, down, chained as a block runs them). `cpu_gflops.f32` is the compute-bound rate of
  that block at a prefill batch of `prefill_tokens` rows (GEMM): the s^cpu of the cost model,
  whose memory term (bytes / ram_bw) is added separately. The batch-1 rates (GEMV, weights hot in
  cache and cold from DRAM) and prima.cpp's n x n matmul are recorded as second figures. Only f32
  is written: the runtime dequantises f16/q8_0/q4k weights to f32 before its matmuls (XLA:CPU's
  native f16 is ~20x slower), so `rate(cpu_flops, "q4k")` falls back to the f32 rate.
- memory (`ram_bw_gbs`): a STREAM-like read, numpy reductions over a buffer >> LLC split across
  the runtime's thread count (`cores`), summed bytes / wall time.
- disk (`disk_seq_gbs`, `disk_rnd_gbs`): prima.cpp's fio job in Python: O_DIRECT (page cache out
  of the way), time-based, one reader per thread, iodepth 1; sequential reads of the device's
  readahead size, random reads of one page; on a probe file in the directory where checkpoints
  live (the cache dir). Without O_DIRECT (tmpfs, macOS) it falls back to posix_fadvise/F_NOCACHE.
- memory available (`ram_avail_gib`): prima.cpp's formulas per OS: Linux MemAvailable x 0.8;
  inside a memory cgroup the lower of that and limit - usage + the cgroup's page cache (v1) or
  prima.cpp's cgroup v2 formula; macOS (free + inactive + purgeable) + a share of active pages.
- KV copy (`kv_copy_ms`): a jitted, donated `dynamic_update_slice` of one token's K and V into a
  preallocated cache, differenced over N layers so JAX's dispatch cost drops out.
- cores: CPU affinity, capped by a cgroup CPU quota (cfs_quota_us / cfs_period_us, or cpu.max).
- network (cluster `[network]` / per-pair links): the runtime's zmq wire format (primasim.runtime.wire)
  against an echo peer (`python -m primasim.profile.profiler --echo ADDR`): one-way latency = RTT / 2 of
  empty PINGs; bandwidth = slope of transfer time over payload size.

Every repeated measurement keeps its samples; the file records median and spread, and the device's
`[devices.sources]` records how each figure was obtained plus the provenance (library versions,
threads, limits seen, date, command). Full detail goes to a sidecar JSON next to the TOML.

Entry points: `profile_device(...) -> DeviceSpec`, `run_profile(ProfileConfig) -> Profile`, and
`python -m primasim.profile.profiler --out FILE --name NAME [--quick] [...]` (runnable inside a cgroup and a
network namespace by the emulation code), `python -m primasim.profile.profiler --echo ADDR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import json
import math
import mmap
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from primasim.core.cluster import ClusterSpec, LinkSpec, NetworkSpec
from primasim.core.device import DeviceSpec
from primasim.core.errors import PrimasimError, SpecError, WireError
from primasim.core.io import atomic_write_text
from primasim.core.paths import cache_dir
from primasim.core.units import GB, GFLOPS, MB, MS, GiB, KiB, MiB

PARTS = ("compute", "memory", "disk", "kv", "network")
DEFAULT_MODEL = "llama-mini-300m"
UNLIMITED = 1 << 60  # anything above this in a cgroup file means "no limit"

# Figures used for parts that were not measured (same as the nominal `local` cluster).
NOMINAL: dict[str, float] = {"ram_bw": 20 * GB, "cpu_f32": 50 * GFLOPS, "disk_seq": 1 * GB,
                             "disk_rnd": 0.3 * GB, "kv_copy": 0.002 * MS}

Progress = Callable[[str, float], None]  # (what is being measured, fraction of the profile done)


# =============================================================================== measurements
@dataclass(frozen=True)
class Measurement:
    """Repeated samples of one quantity (SI units), summarised by median and spread."""

    name: str
    samples: tuple[float, ...]
    unit: str  # display unit, e.g. "GB/s"
    scale: float  # SI value / scale = display value
    how: str = ""  # one line: method, sizes, threads

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError(f"measurement {self.name!r} has no samples")

    @property
    def value(self) -> float:
        return float(statistics.median(self.samples))

    def quantile(self, q: float) -> float:
        s = sorted(self.samples)
        if len(s) == 1:
            return s[0]
        pos = q * (len(s) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def spread(self) -> tuple[float, float]:
        """Inter-quartile range (p25, p75) of the samples."""
        return self.quantile(0.25), self.quantile(0.75)

    @property
    def rel_spread(self) -> float:
        """IQR / median: how noisy the figure is (0 = identical samples)."""
        lo, hi = self.spread
        return (hi - lo) / self.value if self.value else 0.0

    def describe(self) -> str:
        """'17.2 GB/s (IQR 16.9-17.5, min 16.1, max 17.8, n=5)'."""
        lo, hi = self.spread
        s = self.scale
        return (f"{_g(self.value / s)} {self.unit} (IQR {_g(lo / s)}-{_g(hi / s)}, min {_g(min(self.samples) / s)}, "
                f"max {_g(max(self.samples) / s)}, n={len(self.samples)})")

    def to_json(self) -> dict[str, Any]:
        lo, hi = self.spread
        return {"value": self.value, "unit_si": _si_unit(self.unit), "display_unit": self.unit,
                "display_value": self.value / self.scale, "p25": lo, "p75": hi, "min": min(self.samples),
                "max": max(self.samples), "n": len(self.samples), "samples": list(self.samples), "how": self.how}


def _g(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _si_unit(display: str) -> str:
    return {"GB/s": "B/s", "MB/s": "B/s", "GFLOPS": "FLOP/s", "ms": "s", "us": "s", "GiB": "B",
            "Mbps": "B/s"}.get(display, display)


def _measure(name: str, samples: Iterable[float], unit: str, scale: float, how: str) -> Measurement:
    return Measurement(name, tuple(float(x) for x in samples), unit, scale, how)


# =============================================================================== system facts
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


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    s = _read(path)
    if s is None:
        return None
    if s == "max":
        return UNLIMITED
    try:
        return int(s.split()[0])
    except (ValueError, IndexError):
        return None


def _kv_file(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    s = _read(path)
    for line in (s or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


@dataclass(frozen=True)
class CgroupDirs:
    """This process's cgroup directories: v1 per controller, and the v2 (unified) one."""

    v1: dict[str, Path] = field(default_factory=dict)
    v2: Path | None = None


def cgroup_dirs(proc_cgroup: str = "/proc/self/cgroup", mountinfo: str = "/proc/self/mountinfo") -> CgroupDirs:
    """Resolve /proc/self/cgroup against the cgroup mounts in /proc/self/mountinfo."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
        mounts = Path(mountinfo).read_text().splitlines()
    except OSError:
        return CgroupDirs()
    v1_mounts: dict[str, tuple[str, str]] = {}  # controller -> (mount root, mount point)
    v2_mount: tuple[str, str] | None = None
    for m in mounts:
        pre, sep, post = m.partition(" - ")
        if not sep:
            continue
        f, p = pre.split(), post.split()
        if len(f) < 5 or len(p) < 3:
            continue
        root, point = f[3], f[4].replace("\\040", " ")
        if p[0] == "cgroup2":
            v2_mount = v2_mount or (root, point)
        elif p[0] == "cgroup":
            for opt in p[2].split(","):
                v1_mounts.setdefault(opt, (root, point))
    out = CgroupDirs()
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if not ctrls:  # the v2 line "0::/path"
            if v2_mount:
                out = dataclasses.replace(out, v2=_join_cgroup(v2_mount, path))
            continue
        for c in ctrls.split(","):
            if c in v1_mounts:
                out.v1[c] = _join_cgroup(v1_mounts[c], path)
    return out


def _join_cgroup(mount: tuple[str, str], path: str) -> Path:
    root, point = mount
    rel = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
    d = Path(point) / ("" if rel == "." else rel)
    return d if d.is_dir() else Path(point)


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
        lim = _read_int(d / "memory.limit_in_bytes")
        st = _kv_file(d / "memory.stat")
        hier = st.get("hierarchical_memory_limit")
        cands = [x for x in (lim, hier) if x is not None and x < UNLIMITED]
        if cands:
            mem_limit = min(cands)
            version = 1
            usage = _read_int(d / "memory.usage_in_bytes") or 0
            file_ = st.get("total_inactive_file", st.get("inactive_file", 0)) + \
                st.get("total_active_file", st.get("active_file", 0))
            sw = _read_int(d / "memory.memsw.limit_in_bytes")
            hsw = st.get("hierarchical_memsw_limit")
            swc = [x for x in (sw, hsw) if x is not None and x < UNLIMITED]
            memsw = min(swc) if swc else None
    if "blkio" in dirs.v1:
        d = dirs.v1["blkio"]
        cg["blkio"] = str(d)
        for line in (_read(d / "blkio.throttle.read_bps_device") or "").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                blk[parts[0]] = int(parts[1])
    if dirs.v2 is not None:
        d = dirs.v2
        cg.setdefault("unified", str(d))
        if quota is None:
            quota, period = _v2_cpu_quota(d)
        if mem_limit is None:
            lim = _read_int(d / "memory.max")
            if lim is not None and lim < UNLIMITED:
                mem_limit, version = lim, 2
                usage = _read_int(d / "memory.current") or 0
                st = _kv_file(d / "memory.stat")
                file_ = st.get("file", 0)
                slab = st.get("slab_reclaimable", 0)
        if not blk:
            for line in (_read(d / "io.max") or "").splitlines():
                m = re.match(r"(\d+:\d+)\s.*\brbps=(\d+)", line)
                if m:
                    blk[m.group(1)] = int(m.group(2))
    return Limits(affinity, quota, period, mem_limit, usage, file_, slab, version, memsw, blk, cg)


def _v1_cpu_quota(d: Path) -> tuple[float | None, float | None]:
    """Lowest cfs quota (cores) of this cgroup and its ancestors (v1 quotas nest), and its period (s)."""
    best: tuple[float | None, float | None] = (None, None)
    while True:
        q = _read_int(d / "cpu.cfs_quota_us")
        p = _read_int(d / "cpu.cfs_period_us")
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
        q, _, p = (_read(d / "cpu.max") or "max").partition(" ")
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
    for line in (_read(Path("/proc/cpuinfo")) or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return _sysctl("machdep.cpu.brand_string") or platform.processor() or platform.machine()


def llc_bytes() -> int:
    """Size of the last-level cache as the OS reports it (0 if unknown)."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        s = _read(idx / "size")
        if s and (_read(idx / "type") or "") != "Instruction":
            m = re.match(r"(\d+)([KMG]?)", s)
            if m:
                best = max(best, int(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": GiB}[m.group(2)])
    return best


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "numpy", "pyzmq"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def profile_key() -> dict[str, Any]:
    """What a cached profile must match to describe this machine as it is now."""
    lim = read_limits()
    return {"host": platform.node(), "cpu": cpu_model(), "cores": effective_cores(lim),
            "mem_total": meminfo().get("MemTotal", 0), "mem_limit": lim.mem_limit or 0,
            "jax": library_versions().get("jax", "")}


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
    dev = _read(real / "dev")
    if not dev or ":" not in dev:
        return None
    major, minor = (int(x) for x in dev.split(":"))
    ra = _read_int(real / "queue" / "read_ahead_kb")
    return BlockDevice(real.name, major, minor, (ra or 128) * KiB)


# =============================================================================== memory bandwidth
class RamReader:
    """A STREAM-like read probe: `threads` threads run numpy reductions (bitwise-or over uint64,
    > 50 GB/s per core from cache, so DRAM is the bottleneck) over a buffer of `nbytes`. Threads
    take `chunk`-sized pieces from a shared counter, as XLA's thread pool does, so one thread that
    the OS descheduled on a shared machine does not stall the whole pass. Use as a context manager."""

    def __init__(self, nbytes: int, threads: int, chunk: int = 4 * MiB) -> None:
        import numpy as np

        per = max(1, chunk // 8)
        n = max(threads * per, nbytes // 8 // per * per)
        self.buf = np.empty(n, dtype=np.uint64)
        self.buf.fill(0x0101010101010101)  # touch every page: untouched pages all map the zero page
        self.pieces = [self.buf[i:i + per] for i in range(0, n, per)]
        self.threads, self.chunk = threads, chunk
        self._barrier = threading.Barrier(threads + 1)
        self._stop = threading.Event()
        self._todo: Iterator[int] = iter(())
        self._limit = 0
        self._pool = [threading.Thread(target=self._reader, daemon=True) for _ in range(threads)]
        for t in self._pool:
            t.start()
        self._pass_s = 0.0  # seconds per pass over the buffer, from the last sample
        self.sample()  # warm-up: TLB, threads; and the first estimate of a pass's time

    def _reader(self) -> None:
        import numpy as np

        while True:
            self._barrier.wait()
            if self._stop.is_set():
                return
            for i in self._todo:  # next() on a shared iterator is atomic under the GIL
                if i >= self._limit:
                    break
                np.bitwise_or.reduce(self.pieces[i % len(self.pieces)])  # releases the GIL while it reads
            self._barrier.wait()

    def sample(self, min_seconds: float = 0.0) -> float:
        """One sample of bytes/s: as many passes over the buffer as it takes to last `min_seconds`."""
        import itertools

        k = max(1, math.ceil(min_seconds / self._pass_s)) if self._pass_s > 0 else 1
        self._todo, self._limit = itertools.count(), len(self.pieces) * k
        t0 = time.perf_counter()
        self._barrier.wait()  # go
        self._barrier.wait()  # all pieces read
        dt = time.perf_counter() - t0
        self._pass_s = dt / k
        return self.buf.nbytes * k / dt

    def close(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._barrier.wait()
            for t in self._pool:
                t.join()

    def __enter__(self) -> RamReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure_ram_bw(nbytes: int, threads: int, repeats: int = 5, chunk: int = 4 * MiB,
                   min_seconds: float = 0.05) -> Measurement:
    """STREAM-like read bandwidth (see RamReader); each sample lasts at least `min_seconds`."""
    with RamReader(nbytes, threads, chunk) as r:
        samples = [r.sample(min_seconds) for _ in range(repeats)]
        return _measure("ram_bw", samples, "GB/s", GB,
                        f"numpy bitwise_or.reduce over {r.buf.nbytes / MiB:.0f} MiB in {chunk // MiB} MiB pieces, "
                        f"{threads} thread(s), samples of >= {min_seconds * 1000:.0f} ms")


# =============================================================================== compute (JAX)
@dataclass(frozen=True)
class LayerShapes:
    """The weight matrices (out, in) of one block, in the order a block multiplies them."""

    q: tuple[int, int]
    k: tuple[int, int]
    v: tuple[int, int]
    o: tuple[int, int]
    gate: tuple[int, int]
    up: tuple[int, int]
    down: tuple[int, int]
    rows_capped: int = 0  # > 0: rows of every matrix were capped at this to fit the memory budget

    @classmethod
    def of(cls, model: Any) -> LayerShapes:
        e, f, qd, kv = model.hidden, model.ffn, model.q_dim, model.n_kv_embd
        return cls((qd, e), (kv, e), (kv, e), (e, qd), (f, e), (f, e), (e, f))

    def all(self) -> list[tuple[int, int]]:
        return [self.q, self.k, self.v, self.o, self.gate, self.up, self.down]

    @property
    def params(self) -> int:
        return sum(o * i for o, i in self.all())

    def capped(self, max_params: int) -> LayerShapes:
        """Fewer output rows per matrix (same contraction sizes) so the block fits a budget."""
        if self.params <= max_params:
            return self
        def params(rows: int) -> int:
            return sum(min(o, rows) * i for o, i in self.all())

        lo, hi = 64, max(o for o, _ in self.all())  # largest row cap that fits (params grow with it)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if params(mid) <= max_params else (lo, mid - 1)
        return LayerShapes(*[(min(o, lo), i) for o, i in self.all()], rows_capped=lo)

    def describe(self) -> str:
        s = ", ".join(f"{n} {o}x{i}" for n, (o, i) in zip(("q", "k", "v", "o", "gate", "up", "down"), self.all()))
        return s + (f" (rows capped at {self.rows_capped})" if self.rows_capped else "")


def _block_fn() -> Callable[..., Any]:
    """One block's matmuls as the runtime runs them: x (T, in) . W (out, in) contracted on W's
    last axis (never `x @ W.T`, which XLA:CPU turns into a transpose copy), chained q -> o -> gate,
    up -> down, with K and V from the block input."""
    import jax
    from jax import lax

    dn = (((1,), (1,)), ((), ()))

    def mm(x: Any, w: Any) -> Any:
        return lax.dot_general(x, w, dn, preferred_element_type=x.dtype)

    def block(x: Any, wq: Any, wk: Any, wv: Any, wo: Any, wg: Any, wu: Any, wd: Any) -> Any:
        q = mm(x, wq)
        k = mm(x, wk)
        v = mm(x, wv)
        h = mm(q, wo)
        g = mm(h, wg)
        u = mm(h, wu)
        d = mm(g * u, wd)
        return d, k, v

    return jax.jit(block)


def _block_weights(shapes: LayerShapes, dtype: Any, value: float) -> list[Any]:
    import jax.numpy as jnp

    # Small constants: the timing of f32 FMAs does not depend on the values, and x stays finite.
    return [jnp.full(s, value, dtype=dtype) for s in shapes.all()]


def _rate_samples(call: Callable[[], Any], work: float, repeats: int, min_seconds: float) -> list[float]:
    """`repeats` samples of work per second. After a warm-up (compiles), each sample times as many
    back-to-back calls as it takes to last `min_seconds`: short samples are all noise on a shared
    machine, and under a CPU quota they would see full speed or a throttled pause, not the average."""
    _block_until_ready(call())
    t0 = time.perf_counter()
    _block_until_ready(call())
    k = max(1, math.ceil(min_seconds / max(time.perf_counter() - t0, 1e-7)))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _block_until_ready([call() for _ in range(k)])  # async dispatch: the calls queue back to back
        out.append(work * k / (time.perf_counter() - t0))
    return out


def _block_until_ready(x: Any) -> None:
    import jax

    jax.block_until_ready(x)


class ColdGemv:
    """Batch-1 block GEMV with weights streamed from DRAM: cycles through copies of one block of
    `model` that together fill `ws_bytes` (choose >> LLC)."""

    def __init__(self, model: Any, ws_bytes: int,
                 _reuse: tuple[Any, LayerShapes, list[Any]] | None = None) -> None:
        import jax.numpy as jnp

        if _reuse is None:
            shapes = LayerShapes.of(model).capped(max(1, ws_bytes // 4 // 2))
            block, first = _block_fn(), _block_weights(shapes, jnp.float32, 1e-3)
        else:
            block, shapes, first = _reuse
        self.block, self.shapes = block, shapes
        self.flops1, self.wbytes = 2.0 * shapes.params, 4 * shapes.params
        self.n_copies = max(2, math.ceil(ws_bytes / self.wbytes))
        self.copies = [first] + [_block_weights(shapes, jnp.float32, 1e-3 * (1 + c / 1000))
                                 for c in range(1, self.n_copies)]
        self.x1 = jnp.full((1, shapes.q[1]), 1e-2, dtype=jnp.float32)
        self.how = (f"batch 1, cycling through {self.n_copies} copies of one block of {model.name} "
                    f"({self.n_copies * self.wbytes / MiB:.0f} MiB f32, LLC {llc_bytes() / MiB:.0f} MiB reported): "
                    "decode streaming weights from DRAM")

    def one_pass(self) -> Any:
        return [self.block(self.x1, *w) for w in self.copies]

    def rates(self, repeats: int, min_seconds: float) -> list[float]:
        """FLOP/s samples (weight bytes/s = FLOP/s x 2: f32 weights, 2 FLOPs per weight)."""
        return _rate_samples(self.one_pass, self.flops1 * self.n_copies, repeats, min_seconds)

    def close(self) -> None:
        self.copies.clear()


def measure_gemv_cold(model: Any, *, ws_bytes: int, repeats: int = 5, min_seconds: float = 0.05,
                      _reuse: tuple[Any, LayerShapes, list[Any]] | None = None) -> dict[str, Measurement]:
    """gemv_cold (FLOP/s) and gemv_cold_bw (weight bytes/s) of ColdGemv: what decode achieves,
    to compare with ram_bw."""
    g = ColdGemv(model, ws_bytes, _reuse)
    try:
        rates = g.rates(repeats, min_seconds)
    finally:
        g.close()  # free the working set before the next probe
    return {"gemv_cold": _measure("gemv_cold", rates, "GFLOPS", GFLOPS, g.how),
            "gemv_cold_bw": _measure("gemv_cold_bw", (r * g.wbytes / g.flops1 for r in rates), "GB/s", GB,
                                     "weight bytes / time of the cold GEMV: " + g.how)}


def measure_compute(model: Any, *, ws_bytes: int, repeats: int = 5, prefill_tokens: int = 128,
                    native_f16: bool = True, min_seconds: float = 0.05,
                    progress: Callable[[str], None] | None = None) -> dict[str, Measurement]:
    """JAX matmul throughput at the block shapes of `model` (see the module docstring).

    Returns gemm (-> cpu_gflops.f32), gemv_hot, gemv_cold (+ its bytes/s), nxn (prima.cpp's
    n x n with n = min(e, 4096) / 8) and, if asked, gemm_f16_native (XLA:CPU's own f16 path)."""
    import jax
    import jax.numpy as jnp

    say = progress or (lambda _s: None)
    f32 = jnp.float32
    shapes = LayerShapes.of(model).capped(max(1, ws_bytes // 4 // 2))
    flops1 = 2.0 * shapes.params
    wbytes = 4 * shapes.params
    block = _block_fn()
    e_in = shapes.q[1]
    out: dict[str, Measurement] = {}
    per = f"samples of >= {min_seconds * 1000:.0f} ms"

    # GEMM (prefill): compute bound -> the s^cpu of the cost model.
    say("compute: block GEMM (prefill)")
    w0 = _block_weights(shapes, f32, 1e-3)
    xt = jnp.full((prefill_tokens, e_in), 1e-2, dtype=f32)
    rates = _rate_samples(lambda: block(xt, *w0), flops1 * prefill_tokens, repeats, min_seconds)
    out["gemm"] = _measure("gemm", rates, "GFLOPS", GFLOPS, f"JAX lax.dot_general, one block of {model.name} "
                           f"({shapes.describe()}), {prefill_tokens} tokens, f32, {per}")

    # GEMV hot: batch 1, the same block again and again (weights in cache when they fit).
    say("compute: block GEMV (hot)")
    x1 = jnp.full((1, e_in), 1e-2, dtype=f32)
    rates = _rate_samples(lambda: block(x1, *w0), flops1, repeats, min_seconds)
    out["gemv_hot"] = _measure("gemv_hot", rates, "GFLOPS", GFLOPS,
                               f"batch 1, one block ({wbytes / MiB:.1f} MiB f32) re-used: weights hot in cache "
                               f"as far as the LLC ({llc_bytes() / MiB:.0f} MiB reported) holds them, {per}")

    # GEMV cold: cycle through copies of the block filling `ws_bytes` >> LLC, so weights come from DRAM.
    say("compute: block GEMV (cold, from DRAM)")
    out.update(measure_gemv_cold(model, ws_bytes=ws_bytes, repeats=repeats, min_seconds=min_seconds,
                                 _reuse=(block, shapes, w0)))

    # prima.cpp's figure: n x n f32 matmul, n = min(e, 4096) / 8 on CPU.
    say("compute: n x n matmul (prima.cpp)")
    n = max(32, min(model.hidden, 4096) // 8)
    a = jnp.full((n, n), 1e-2, dtype=f32)
    mmul = jax.jit(lambda p, q: p @ q)
    rates = _rate_samples(lambda: mmul(a, a), 2.0 * n**3, repeats, min_seconds)
    out["nxn"] = _measure("nxn", rates, "GFLOPS", GFLOPS, f"prima.cpp's CPU probe: {n}x{n} f32 matmul "
                          f"(n = min(e, 4096)/8), JAX dispatch included, {per}")

    if native_f16:
        say("compute: native f16 GEMM (for the record)")
        w16 = _block_weights(shapes, jnp.float16, 1e-3)
        t16 = max(1, min(8, prefill_tokens))
        x16 = jnp.full((t16, e_in), 1e-2, dtype=jnp.float16)
        rates = _rate_samples(lambda: block(x16, *w16), flops1 * t16, max(2, repeats // 2), min_seconds)
        out["gemm_f16_native"] = _measure(
            "gemm_f16_native", rates, "GFLOPS", GFLOPS,
            f"XLA:CPU native f16 block, {t16} tokens: not used (the runtime dequantises to f32)")
    return out


def measure_kv_copy(model: Any, *, n_ctx: int = 1024, layers: int = 32, repeats: int = 7,
                    min_seconds: float = 0.05, dtype: str = "float32") -> Measurement:
    """Time to write one token's K and V of one layer into a preallocated cache: one jitted,
    donated loop of N dynamic_update_slice pairs over a (layers, n_ctx, kv_heads, head_dim)
    cache (N a traced argument: one compile), N sized so a call lasts `min_seconds`, minus the
    time of a call with N = 0, so JAX's per-call dispatch cost (which the runtime pays once per
    block, not per cache write) drops out."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    dt = jnp.dtype(dtype)
    hk, d = model.n_kv_heads, model.head_dim
    n_ctx = max(1, n_ctx)

    def upd(kc: Any, vc: Any, k: Any, v: Any, p0: Any, count: Any) -> Any:
        def body(i: Any, c: Any) -> Any:
            layer, pos = i % layers, (p0 + i // layers) % n_ctx
            return (lax.dynamic_update_slice(c[0], k[None, None], (layer, pos, 0, 0)),
                    lax.dynamic_update_slice(c[1], v[None, None], (layer, pos, 0, 0)))
        return lax.fori_loop(0, count, body, (kc, vc))

    f = jax.jit(upd, donate_argnums=(0, 1))
    shape = (layers, n_ctx, hk, d)
    state = [jnp.zeros(shape, dt), jnp.zeros(shape, dt)]
    k = jnp.ones((hk, d), dt)
    v = jnp.ones((hk, d), dt)

    def call(count: int, pos: int = 0) -> float:
        t0 = time.perf_counter()
        state[0], state[1] = f(state[0], state[1], k, v, jnp.int32(pos), jnp.int32(count))
        jax.block_until_ready(state)
        return time.perf_counter() - t0

    call(1024)  # compile
    t0 = min(call(0) for _ in range(5))  # dispatch + sync, no copies
    t = min(call(1024) for _ in range(3))
    n = 1024 * max(1, math.ceil(min_seconds / max(t, 1e-7)))
    samples = [max(call(n, r) - t0, 1e-12) / n for r in range(repeats)]
    nb = 2 * hk * d * dt.itemsize
    return _measure("kv_copy", samples, "us", 1e-6,
                    f"jitted donated dynamic_update_slice of one token's K and V ({nb} B, {dtype}) into a "
                    f"{shape} cache; (t(N) - t(0)) / N, N = {n}")


# =============================================================================== disk
@dataclass(frozen=True)
class DiskResult:
    seq: Measurement
    rnd: Measurement
    direct: bool  # O_DIRECT used (else: fadvise / F_NOCACHE, best effort)
    file: str
    device: BlockDevice | None


def _aligned(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n)  # anonymous mmaps are page-aligned: what O_DIRECT needs


def _open_direct(path: str, flags: int) -> tuple[int, bool]:
    """Open with O_DIRECT when the filesystem allows it; report whether it did."""
    od = getattr(os, "O_DIRECT", 0)
    if od:
        try:
            return os.open(path, flags | od), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    fd = os.open(path, flags)
    if sys.platform == "darwin":
        import fcntl

        fcntl.fcntl(fd, 48, 1)  # F_NOCACHE
    return fd, False


def disk_probe_file(directory: str | Path, size: int) -> Path:
    """A file of >= `size` incompressible bytes in `directory` (kept for the next profile: a
    sparse or zero file would be read without touching the disk). Written with O_DIRECT, atomically."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpecError(f"cannot create the disk-probe directory ({exc.strerror})", where=str(d),
                        fix="pass --disk-dir with a writable directory on the disk that holds the checkpoints") from None
    for p in sorted(d.glob("primasim-disk-probe-*.bin")):
        try:
            if p.stat().st_size >= size:
                return p
        except OSError:
            pass
    free = os.statvfs(d).f_bavail * os.statvfs(d).f_frsize
    if free < size + 256 * MiB:
        size = max(64 * MiB, (free - 256 * MiB) // (8 * MiB) * 8 * MiB)
        if free < size + 256 * MiB:
            raise SpecError(f"only {free / MiB:.0f} MiB free for the disk probe", where=str(d),
                            fix="free some space or pass --disk-dir on another filesystem")
    path = d / f"primasim-disk-probe-{size // MiB}m.bin"
    tmp = d / f".{path.name}.{os.getpid()}.tmp"
    chunk = 8 * MiB
    buf = _aligned(chunk)
    buf.write(os.urandom(chunk))
    try:
        fd, direct = _open_direct(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for i in range(math.ceil(size / chunk)):
                buf[:8] = i.to_bytes(8, "little")  # every chunk differs: no dedup shortcut
                os.pwrite(fd, buf, i * chunk)
            os.fsync(fd)
            if not direct and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SpecError(f"cannot write the disk probe ({exc.strerror})", where=str(tmp),
                        fix="pass --disk-dir with a writable directory") from None
    return path


def _timed_reads(path: Path, *, block: int, jobs: int, seconds: float, sequential: bool,
                 seed: int, min_reads: int = 3) -> tuple[float, bool]:
    """prima.cpp's fio job: `jobs` readers at iodepth 1 for `seconds` (and at least `min_reads`
    reads each); returns (bytes/s, O_DIRECT used). Each reader's first read is a warm-up, not
    counted: it would include the burst a blkio throttle lets through at the start of a slice."""
    import numpy as np

    size = path.stat().st_size
    nblocks = size // block
    if nblocks < jobs:
        raise SpecError(f"disk probe {path} is too small for {jobs} readers of {block} B", where=str(path),
                        fix="delete it; the next profile writes a new one")
    rates = [0.0] * jobs
    errors: list[BaseException] = []
    fds = []
    direct = True
    for _ in range(jobs):
        fd, dr = _open_direct(str(path), os.O_RDONLY)
        direct = direct and dr
        if not dr and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        fds.append(fd)
    start = threading.Barrier(jobs + 1)
    t0_box = [0.0]

    def reader(j: int) -> None:
        try:
            buf = _aligned(block)
            rng = np.random.default_rng(seed + j)
            offs = rng.integers(0, nblocks, size=65536) * block
            pos = (j * nblocks // jobs) * block
            i = 0
            nbytes = 0
            start.wait()
            deadline = t0_box[0] + seconds
            t_first = 0.0
            while True:
                if sequential:
                    off = pos
                    pos = pos + block if pos + 2 * block <= size else 0
                else:
                    off = int(offs[i % offs.size])
                n = os.preadv(fds[j], [buf], off)
                now = time.perf_counter()
                if i == 0:
                    t_first = now
                else:
                    nbytes += n
                i += 1
                if now >= deadline and i > min_reads:
                    rates[j] = nbytes / (now - t_first)
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    pool = [threading.Thread(target=reader, args=(j,), daemon=True) for j in range(jobs)]
    for t in pool:
        t.start()
    t0_box[0] = time.perf_counter()
    start.wait()
    for t in pool:
        t.join(timeout=seconds + 120)
    for fd in fds:
        os.close(fd)
    if errors:
        raise SpecError(f"disk read failed ({errors[0]})", where=str(path), fix="check the disk or --disk-dir") from None
    if any(t.is_alive() for t in pool):
        raise SpecError("disk reads did not finish within two minutes", where=str(path),
                        fix="the disk is stalled or extremely slow; check it")
    return sum(rates), direct


def measure_disk(directory: str | Path, *, file_size: int = GiB, seconds: float = 1.0, repeats: int = 3,
                 jobs: int = 1, seq_block: int | None = None, rnd_block: int | None = None,
                 progress: Callable[[str], None] | None = None) -> DiskResult:
    """Sequential and random read throughput of the disk under `directory`, page cache bypassed."""
    say = progress or (lambda _s: None)
    say("disk: probe file")
    path = disk_probe_file(directory, file_size)
    dev = block_device_of(path)
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    if seq_block is None:
        # fio bs = the device's readahead (prima.cpp), kept within what one read can sensibly move
        seq_block = min(max(dev.read_ahead if dev else 128 * KiB, 128 * KiB), 8 * MiB)
    rnd_block = rnd_block or page
    seq, rnd = [], []
    direct = True
    for r in range(repeats):
        say(f"disk: sequential reads {r + 1}/{repeats}")
        bw, d1 = _timed_reads(path, block=seq_block, jobs=jobs, seconds=seconds, sequential=True, seed=r)
        seq.append(bw)
        say(f"disk: random reads {r + 1}/{repeats}")
        bw, d2 = _timed_reads(path, block=rnd_block, jobs=jobs, seconds=seconds, sequential=False, seed=100 + r)
        rnd.append(bw)
        direct = direct and d1 and d2
    mode = "O_DIRECT" if direct else ("F_NOCACHE" if sys.platform == "darwin" else
                                      "posix_fadvise DONTNEED (no O_DIRECT here: page cache may serve some reads)")
    where = f"{path} on {dev.name} ({dev.devno})" if dev else str(path)
    common = f"{mode}, {jobs} reader(s) x iodepth 1, {seconds:g} s time-based, {path.stat().st_size / MiB:.0f} MiB file {where}"
    return DiskResult(
        _measure("disk_seq", seq, "GB/s", GB, f"sequential {seq_block // KiB} KiB reads (device readahead), {common}"),
        _measure("disk_rnd", rnd, "GB/s", GB, f"random {rnd_block // KiB} KiB reads (page size), {common}"),
        direct, str(path), dev)


# =============================================================================== network (zmq)
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


def _check_addr(addr: str, *, bind: bool) -> None:
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

    _check_addr(addr, bind=True)
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
    import numpy as np
    import zmq

    from primasim.runtime import wire

    _check_addr(addr, bind=False)
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
    lat = _measure("latency", (s / 2 for s in small), "ms", MS,
                   f"RTT / 2 of {pings} empty PING/PONG messages (primasim.runtime.wire over zmq DEALER -> ROUTER, no CRC)")
    bw = _measure("bandwidth", (size / max(t - rtt_med, 1e-9) for t in big), "MB/s", MB,
                  f"{size / KiB:.0f} KiB PING payload, (size) / (t - median RTT of empty PINGs), {reps} repeats")
    return LinkMeasurement(addr, lat, bw, size)


# =============================================================================== the profile
@dataclass(frozen=True)
class ProfileConfig:
    """What `primasim profile` measures and how hard it tries."""

    name: str = field(default="", metadata={"help": "device name (default: host name)"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "ModelSpec whose block shapes the matmuls use"})
    quick: bool = field(default=False, metadata={"help": "a few seconds instead of ~15 (tests, validate)"})
    parts: tuple[str, ...] = field(default=PARTS, metadata={"help": "what to measure (others: nominal figures)"})
    peer: str | None = field(default=None, metadata={"help": "tcp://HOST:PORT of an echo peer for the network"})
    peer_timeout: float = field(default=3.0, metadata={"help": "seconds to wait for the peer"})
    disk_dir: str | None = field(default=None, metadata={"help": "directory on the checkpoints' disk (default: cache dir)"})
    threads: int = field(default=0, metadata={"help": "threads for the memory/disk probes (0 = cores)"})
    ws_bytes: int = field(default=0, metadata={"help": "working set for the DRAM probes (0 = auto: >> LLC)"})
    disk_file: int = field(default=0, metadata={"help": "disk probe file size (0 = 1 GiB, quick 256 MiB)"})
    disk_seconds: float = field(default=0.0, metadata={"help": "seconds per disk run (0 = 1.0, quick 0.25)"})
    prefill_tokens: int = field(default=128, metadata={"help": "rows of the GEMM (prefill) probe"})
    kv_ctx: int = field(default=0, metadata={"help": "context length of the KV-copy probe (0 = model's, <= 2048)"})
    command: str = field(default="", metadata={"help": "command line recorded in the provenance"})

    def __post_init__(self) -> None:
        bad = [p for p in self.parts if p not in PARTS]
        if bad:
            raise SpecError(f"unknown part(s) {bad}", where="--only", fix=f"use a comma list of {', '.join(PARTS)}")


@dataclass
class Profile:
    """A profile: the DeviceSpec, the link (if measured), every measurement with its samples."""

    device: DeviceSpec
    measurements: dict[str, Measurement]
    provenance: dict[str, Any]
    link: LinkMeasurement | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def cluster(self, name: str | None = None) -> ClusterSpec:
        net = self.link.network_spec() if self.link else NetworkSpec(
            kind="switched", sources={"*": "not measured: run `primasim profile --peer tcp://HOST:PORT`"})
        return ClusterSpec(name or self.device.name, (self.device,), net,
                           description=f"measured by `primasim profile` on {self.provenance['date']}")

    def to_json(self) -> dict[str, Any]:
        from primasim.core.device import device_to_toml

        return {"device": device_to_toml(self.device),
                "network": self.cluster().to_toml()["network"],
                "measurements": {k: m.to_json() for k, m in self.measurements.items()},
                "link": ({"peer": self.link.peer, "payload": self.link.payload, "jitter": self.link.jitter}
                         if self.link else None),
                "provenance": self.provenance, "info": self.info}

    def save(self, path: str | Path, cluster_name: str | None = None) -> Path:
        """Write the cluster TOML (one device) and its sidecar JSON; return the sidecar path."""
        p = Path(path)
        side = sidecar_path(p)
        dev = self.device.replace(sources={**self.device.sources, "profile.sidecar": side.name})
        prof = dataclasses.replace(self, device=dev)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        try:
            prof.cluster(cluster_name).save(tmp)
            atomic_write_text(side, json.dumps(prof.to_json(), indent=2) + "\n")
            os.replace(tmp, p)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SpecError(f"cannot write the profile ({exc.strerror})", where=str(p),
                            fix="choose a writable --out path") from None
        self.device = dev
        return side


def sidecar_path(toml_path: str | Path) -> Path:
    p = Path(toml_path)
    return p.with_name((p.name[:-5] if p.name.endswith(".toml") else p.name) + ".profile.json")


def check_writable(path: str | Path) -> Path:
    """Fail fast (before measuring for 20 s) if `path` cannot be written."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise SpecError("is a directory", where=str(p), fix="give a file name, e.g. --out my-device.toml")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        probe = p.with_name(f".{p.name}.{os.getpid()}.probe")
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SpecError(f"cannot write here ({exc.strerror})", where=str(p),
                        fix="choose a writable --out path") from None
    return p


def _auto_ws(ram_avail: float, quick: bool) -> int:
    """Working set for the DRAM probes: well past the LLC, within a quarter of free memory."""
    llc = llc_bytes()
    want = 256 * MiB if quick else min(max(512 * MiB, 2 * llc), GiB)
    return int(max(64 * MiB, min(want, 0.25 * ram_avail)))


def run_profile(config: ProfileConfig | None = None, progress: Progress | None = None) -> Profile:
    """Measure this device (or the emulated device whose limits this process runs under)."""
    from primasim.core.model import load_model

    cfg = config or ProfileConfig()
    t_start = time.perf_counter()
    steps = ["system"] + [p for p in cfg.parts if p != "network" or cfg.peer]
    done = [0]
    timings: dict[str, float] = {}  # seconds per measurement step (in the provenance)
    last = [time.perf_counter(), ""]

    def stage(msg: str) -> None:
        now = time.perf_counter()
        if last[1]:
            timings[str(last[1])] = timings.get(str(last[1]), 0.0) + now - float(last[0])
        last[0], last[1] = now, msg.split(":")[0]
        if progress:
            progress(msg, done[0] / len(steps))

    def finished() -> None:
        stage("")
        done[0] += 1
        if progress:
            progress("", done[0] / len(steps))

    model = load_model(cfg.model)
    if cfg.peer and "network" in cfg.parts:
        _check_addr(cfg.peer, bind=False)

    stage("system: cores, memory, limits")
    limits = read_limits()
    cores = effective_cores(limits)
    threads = cfg.threads or cores
    mem = memory_info(limits)
    osname = device_os()
    finished()

    meas: dict[str, Measurement] = {}
    sources: dict[str, str] = {}
    info: dict[str, Any] = {"model": model.name, "limits": dataclasses.asdict(limits), "llc_bytes": llc_bytes(),
                            "memory": dataclasses.asdict(mem), "threads": threads}
    ws = cfg.ws_bytes or _auto_ws(mem.available, cfg.quick)
    repeats = 3 if cfg.quick else 5
    # Samples long enough to average out a shared machine and, under a CPU quota, several CFS
    # periods (a short sample sees either full speed or a throttled pause, never the average).
    min_s = 0.02 if cfg.quick else 0.05
    if limits.cpu_quota:
        min_s = max(min_s, 2.0 * (limits.cpu_period or 0.1))
    info["min_sample_seconds"] = min_s
    link: LinkMeasurement | None = None

    if "network" in cfg.parts and cfg.peer:  # first: an unreachable peer fails in seconds, not after 20 s
        stage(f"network: latency and bandwidth to {cfg.peer}")
        link = measure_link(cfg.peer, timeout=cfg.peer_timeout, quick=cfg.quick)
        meas["net_latency"] = link.latency
        meas["net_bandwidth"] = link.bandwidth
        finished()
    if "memory" in cfg.parts:
        stage("memory: read bandwidth")
        meas["ram_bw"] = measure_ram_bw(ws, threads, repeats=repeats + 2, min_seconds=min_s)
        finished()
    if "compute" in cfg.parts:
        meas.update(measure_compute(model, ws_bytes=ws, repeats=repeats, prefill_tokens=cfg.prefill_tokens,
                                    native_f16=not cfg.quick, min_seconds=min_s, progress=stage))
        finished()
        if "gemv_cold" in meas:  # per-block times of this model: what a per-device calibration needs
            flops = 2.0 * LayerShapes.of(model).params
            info["block"] = {"model": model.name, "params": LayerShapes.of(model).params,
                             "decode_s": flops / meas["gemv_cold"].value,
                             "decode_hot_s": flops / meas["gemv_hot"].value,
                             "prefill_s_per_token": flops / meas["gemm"].value}
    if "kv" in cfg.parts:
        stage("kv: KV-cache append")
        n_ctx = cfg.kv_ctx or min(model.max_context, 2048)
        meas["kv_copy"] = measure_kv_copy(model, n_ctx=n_ctx, repeats=repeats, min_seconds=min_s)
        finished()
    if "disk" in cfg.parts:
        res = measure_disk(cfg.disk_dir or (cache_dir() / "profile"),
                           file_size=cfg.disk_file or ((256 if cfg.quick else 1024) * MiB),
                           seconds=cfg.disk_seconds or (0.25 if cfg.quick else 1.0),
                           repeats=2 if cfg.quick else 3, jobs=threads, progress=stage)
        meas["disk_seq"], meas["disk_rnd"] = res.seq, res.rnd
        info["disk"] = {"file": res.file, "direct": res.direct,
                        "device": dataclasses.asdict(res.device) if res.device else None}
        finished()

    def pick(key: str, nominal: str, field_key: str) -> float:
        if key in meas:
            sources[field_key] = f"measured: {meas[key].describe()}; {meas[key].how}"
            return meas[key].value
        sources[field_key] = "not measured (nominal figure): run `primasim profile` with this part"
        return NOMINAL[nominal]

    ram_bw = pick("ram_bw", "ram_bw", "ram_bw_gbs")
    f32 = pick("gemm", "cpu_f32", "cpu_gflops")
    if "gemm" in meas:
        sources["cpu_gflops"] += ("; only f32 is listed: the runtime dequantises f16/q8_0/q4k weights to f32, "
                                  "so every dtype falls back to this rate")
        for k in ("gemv_hot", "gemv_cold", "gemv_cold_bw", "nxn", "gemm_f16_native"):
            if k in meas:
                sources[f"cpu_gflops.{k}"] = f"{meas[k].describe()}; {meas[k].how}"
    disk_seq = pick("disk_seq", "disk_seq", "disk_seq_gbs")
    disk_rnd = pick("disk_rnd", "disk_rnd", "disk_rnd_gbs")
    kv = pick("kv_copy", "kv_copy", "kv_copy_ms")
    sources["cores"] = (f"{cores}: CPU affinity {limits.cpu_affinity}"
                        + (f", cgroup CPU quota {limits.cpu_quota:.2f} cores" if limits.cpu_quota else ""))
    sources["ram_avail_gib"] = mem.how
    sources["ram_total_gib"] = ("memory cgroup limit" if limits.mem_limit and mem.total == limits.mem_limit
                                else "MemTotal (/proc/meminfo)" if osname != "macos" else "sysctl hw.memsize")
    sources["swap_total_gib"] = "SwapTotal/SwapFree" + (" capped by memory.memsw limit" if limits.memsw_limit else "")

    versions = library_versions()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    prov = {"date": date, "command": cfg.command or "primasim.profile.profiler.run_profile()", "versions": versions,
            "threads": threads, "cores": cores, "limits": limits.describe(), "host": platform.node(),
            "cpu": cpu_model(), "os": f"{platform.system()} {platform.release()}",
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "quick": cfg.quick, "parts": list(cfg.parts),
            "model": model.name, "working_set_bytes": ws, "key": profile_key(),
            "seconds": round(time.perf_counter() - t_start, 2),
            "stage_seconds": {k: round(v, 2) for k, v in timings.items() if k}}
    sources["profile"] = (f"`{prov['command']}` on {date}; " + ", ".join(f"{k} {v}" for k, v in versions.items())
                          + f"; {threads} thread(s); XLA_FLAGS={prov['xla_flags'] or '(unset)'}")
    sources["profile.limits"] = limits.describe()

    hw = f"{cpu_model()}, {cores} core(s), {mem.total / GiB:.1f} GiB"
    if limits.mem_limit or limits.cpu_quota or limits.blkio_read_bps:
        hw += f" (limits: {limits.describe()})"
    dev = DeviceSpec(
        name=cfg.name or platform.node() or "local", os=osname, cores=cores,  # type: ignore[arg-type]
        ram_total=mem.total, ram_avail=min(mem.available, mem.total), ram_bw=ram_bw, cpu_flops={"f32": f32},
        disk_seq=disk_seq, disk_rnd=disk_rnd, hardware=hw,
        uma=osname == "macos" and platform.machine() == "arm64",
        swap_total=mem.swap_total, swap_avail=min(mem.swap_available, mem.swap_total), kv_copy=kv,
        sources=sources)
    if progress:
        progress("done", 1.0)
    return Profile(dev, meas, prov, link, info)


def profile_device(name: str = "", *, model: str = DEFAULT_MODEL, quick: bool = False,
                   progress: Progress | None = None, **options: Any) -> DeviceSpec:
    """Measure this device and return its DeviceSpec (see ProfileConfig for the options)."""
    return run_profile(ProfileConfig(name=name, model=model, quick=quick, **options), progress).device


# =============================================================================== entry points
def add_arguments(p: argparse.ArgumentParser, *, default_out: str | None) -> None:
    """Options shared by `primasim profile` and `python -m primasim.profile.profiler`."""
    p.add_argument("--out", default=default_out, metavar="FILE",
                   help="cluster TOML to write (one device) + FILE.profile.json with every sample"
                   + (f" (default: {default_out}, what the `local` cluster reads)" if default_out else ""))
    p.add_argument("--name", default="", help="device name (default: host name)")
    p.add_argument("--quick", action="store_true", help="a few seconds instead of ~15: fewer, shorter repeats")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model whose block shapes the matmuls use "
                   f"(default {DEFAULT_MODEL})")
    p.add_argument("--peer", metavar="ADDR", help="tcp://HOST:PORT of a peer running "
                   "`python -m primasim.profile.profiler --echo tcp://*:PORT`: measure latency and bandwidth to it")
    p.add_argument("--peer-timeout", type=float, default=3.0, metavar="S", help="seconds to wait for the peer")
    p.add_argument("--only", default=",".join(PARTS), metavar="PARTS",
                   help=f"comma list of parts to measure ({','.join(PARTS)}), or none (cores and memory only, "
                   "always measured); the others get nominal figures")
    p.add_argument("--disk-dir", metavar="DIR", help="directory on the disk that holds the checkpoints "
                   "(default: the primasim cache dir)")
    p.add_argument("--threads", type=int, default=0, help="threads for the memory and disk probes (default: cores)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")


def config_from_args(args: argparse.Namespace, command: str) -> ProfileConfig:
    parts = tuple(s.strip() for s in args.only.split(",") if s.strip() and s.strip() != "none")
    if args.threads < 0:
        raise SpecError(f"--threads must be >= 0, got {args.threads}", where="--threads", fix="give 0 (auto) or more")
    return ProfileConfig(name=args.name, model=args.model, quick=args.quick, parts=parts, peer=args.peer,
                         peer_timeout=args.peer_timeout, disk_dir=args.disk_dir, threads=args.threads,
                         command=command)


def main(argv: list[str] | None = None) -> int:
    """`python -m primasim.profile.profiler --out FILE --name NAME [...]` or `--echo ADDR`."""
    p = argparse.ArgumentParser(prog="python -m primasim.profile.profiler",
                                description="Profile this device (inside whatever cgroup / netns it runs in) "
                                "and write a one-device cluster TOML; or serve as an echo peer.")
    add_arguments(p, default_out=None)
    p.add_argument("--echo", metavar="ADDR", help="serve as the network peer on ADDR (e.g. tcp://*:5599) instead")
    p.add_argument("--echo-idle", type=float, metavar="S", help="with --echo: exit after S seconds without messages")
    args = p.parse_args(argv)
    argv_s = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        if args.echo:
            serve_echo(args.echo, idle_timeout=args.echo_idle)
            return 0
        if not args.out:
            p.error("--out FILE is required (or --echo ADDR)")
        out = check_writable(args.out)
        cfg = config_from_args(args, f"python -m primasim.profile.profiler {argv_s}")

        def progress(msg: str, frac: float) -> None:
            if msg:
                print(f"[{frac * 100:3.0f}%] {msg}", file=sys.stderr, flush=True)

        prof = run_profile(cfg, progress)
        prof.save(out)
        if args.json:
            print(json.dumps(prof.to_json(), indent=2))
        else:
            print(f"wrote {out}", flush=True)
        return 0
    except PrimasimError as exc:
        print(f"primasim profile: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("primasim profile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
