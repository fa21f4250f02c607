"""Linux control groups, v1 and v2: find the hierarchy, make a device's group, limit it, read it.

An emulated device (primasim.runtime.emulate) is one group with three limits -- memory (bounds
anonymous memory *and* the page cache it charges, so mmap'd weights beyond it are evicted and
re-read), CPU bandwidth and a disk read throttle -- and the worker inside reads its own group's
counters (primasim.runtime._measure). Both kernel interfaces are supported:

======================  ==========================================  ==========================================
                        v1 (one mount per controller)               v2 (the unified hierarchy)
======================  ==========================================  ==========================================
a device's group        memory/, cpu/, blkio/ <name> (three dirs)   <mount>/<name> (one dir; the parent's
                                                                    cgroup.subtree_control enables them)
memory limit            memory.limit_in_bytes                       memory.max
usage / peak            memory.usage_in_bytes / max_usage_in_bytes  memory.current / memory.peak
page cache              memory.stat total_cache                     memory.stat file
OOM kills               memory.oom_control oom_kill                 memory.events oom_kill
CPU quota               cpu.cfs_quota_us + cpu.cfs_period_us        cpu.max "quota period"
CPU throttled           cpu.stat throttled_time (ns)                cpu.stat throttled_usec
disk read throttle      blkio.throttle.read_bps_device "M:m bps"    io.max "M:m rbps=bps"
disk bytes read         blkio.throttle.io_service_bytes Read        io.stat rbytes
kill all                SIGKILL every pid in cgroup.procs           cgroup.kill (Linux 5.14+), else the same
======================  ==========================================  ==========================================

`detect()` picks the hierarchy that has all three controllers (v2 first, the kernel's future; a
"hybrid" machine binds them to v1 and mounts an empty unified tree) and otherwise raises one clear
`EmulationError` naming what it found. Everything takes a `root`, so the file logic also runs
against a fake hierarchy in a temporary folder (tests/test_cgroups.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EmulationError

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60  # anything above this in a cgroup file means "no limit"
NEEDED = ("memory", "cpu", "io")  # what an emulated device needs (v1 calls io "blkio")
V1_NAME = {"memory": "memory", "cpu": "cpu", "io": "blkio"}


# ------------------------------------------------------------------------------------ files
def read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def read_int(path: Path, default: int | None = None) -> int | None:
    """First integer of a cgroup file ("max" = UNLIMITED); `default` if unreadable."""
    s = read_text(path)
    if s is None:
        return default
    if s.split()[0:1] == ["max"]:
        return UNLIMITED
    try:
        return int(s.split()[0])
    except (ValueError, IndexError):
        return default


def kv_file(path: Path) -> dict[str, int]:
    """A "key value" per line file (memory.stat, cpu.stat, memory.events, oom_control)."""
    out: dict[str, int] = {}
    for line in (read_text(path) or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            with contextlib.suppress(ValueError):
                out[parts[0]] = int(parts[1])
    return out


# ------------------------------------------------------------------------------------ mounts
@dataclass(frozen=True)
class Mounts:
    """The cgroup file systems this process sees: v1 controller -> (mount root, mount point), and
    the unified (v2) mount, if any."""

    v1: dict[str, tuple[str, Path]] = field(default_factory=dict)
    v2: tuple[str, Path] | None = None

    @staticmethod
    def read(mountinfo: str | Path = "/proc/self/mountinfo") -> Mounts:
        try:
            lines = Path(mountinfo).read_text().splitlines()
        except OSError:
            return Mounts()
        v1: dict[str, tuple[str, Path]] = {}
        v2: tuple[str, Path] | None = None
        for m in lines:
            pre, sep, post = m.partition(" - ")
            if not sep:
                continue
            f, p = pre.split(), post.split()
            if len(f) < 5 or len(p) < 3:
                continue
            root, point = f[3], Path(f[4].replace("\\040", " "))
            if p[0] == "cgroup2":
                v2 = v2 or (root, point)
            elif p[0] == "cgroup":
                for opt in p[2].split(","):
                    if opt not in ("rw", "ro"):
                        v1.setdefault(opt, (root, point))
        return Mounts(v1, v2)

    def v2_controllers(self) -> set[str]:
        """Controllers the unified hierarchy can give its groups (those not bound to v1)."""
        if self.v2 is None:
            return set()
        return set((read_text(self.v2[1] / "cgroup.controllers") or "").split())


def _join(mount: tuple[str, Path], path: str) -> Path:
    root, point = mount
    rel = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
    return point / ("" if rel == "." else rel)


def own_dirs(proc_cgroup: str | Path = "/proc/self/cgroup", mounts: Mounts | None = None
             ) -> tuple[dict[str, Path], Path | None]:
    """(v1 controller -> this process's group dir, the v2 group dir) from /proc/<pid>/cgroup."""
    mounts = mounts or Mounts.read()
    v1: dict[str, Path] = {}
    v2: Path | None = None
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return v1, v2
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if not ctrls:  # "0::/path", the unified hierarchy
            if mounts.v2 is not None:
                d = _join(mounts.v2, path)
                v2 = d if d.is_dir() else mounts.v2[1]
            continue
        for c in ctrls.split(","):
            if c in mounts.v1:
                d = _join(mounts.v1[c], path)
                v1[c] = d if d.is_dir() else mounts.v1[c][1]
    return v1, v2


# ------------------------------------------------------------------------------------ a group
@dataclass
class Group:
    """One device's cgroup: v1 = one dir per controller (same name), v2 = one dir."""

    version: int
    dirs: dict[str, Path]  # controller (memory, cpu, io) -> its dir; v2: the same dir for all
    _peak_fd: int | None = field(default=None, repr=False, compare=False)

    @staticmethod
    def at(path: str | Path) -> Group:
        """The group whose dir is `path` (v2 if it is in a unified hierarchy), e.g. to remove it."""
        d = Path(path)
        return Group(2 if (d / "cgroup.controllers").exists() else 1, {"memory": d})

    @property
    def name(self) -> str:
        return next(iter(self.dirs.values())).name

    def paths(self) -> list[Path]:
        """Distinct dirs, for recording, joining (cgroup.procs) and removal."""
        return list(dict.fromkeys(self.dirs.values()))

    def _d(self, ctrl: str) -> Path | None:
        return self.dirs.get(ctrl)

    # -------------------------------------------------------------------- memory
    def set_memory_max(self, nbytes: int) -> None:
        d = self._d("memory")
        if d is not None:
            (d / ("memory.max" if self.version == 2 else "memory.limit_in_bytes")).write_text(str(int(nbytes)))

    def memory_max(self) -> int:
        d = self._d("memory")
        f = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        return UNLIMITED if d is None else int(read_int(d / f, UNLIMITED) or 0)

    def memory_current(self) -> int:
        d = self._d("memory")
        f = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        return 0 if d is None else int(read_int(d / f, 0) or 0)

    def memory_stat(self) -> dict[str, int]:
        d = self._d("memory")
        return {} if d is None else kv_file(d / "memory.stat")

    def page_cache(self) -> int:
        """File-backed pages charged to the group (reclaimable: mmap'd weights, read caches)."""
        st = self.memory_stat()
        if self.version == 2:
            return st.get("file", 0)
        return st.get("total_cache", st.get("cache", 0))

    def evictable_file(self) -> int:
        """File pages on the group's active and inactive lists: what reclaim can take from it
        (mlocked pages sit on the unevictable list and are not counted here)."""
        st = self.memory_stat()
        keys = ("active_file", "inactive_file") if self.version == 2 else ("total_active_file", "total_inactive_file")
        return sum(st.get(k, 0) for k in keys)

    def held(self) -> int:
        """What the group holds that reclaim cannot take: its usage less `evictable_file` (anonymous,
        kernel and mlocked memory) -- a worker's own footprint, whatever page cache it has read."""
        return max(0, self.memory_current() - self.evictable_file())

    def anon(self) -> int:
        st = self.memory_stat()
        return st.get("anon", 0) if self.version == 2 else st.get("total_rss", st.get("rss", 0))

    def major_faults(self) -> int:
        st = self.memory_stat()
        return st.get("pgmajfault", 0) if self.version == 2 else st.get("total_pgmajfault", 0)

    def reset_peak(self) -> bool:
        """Track the peak from now. v1: max_usage_in_bytes = 0. v2 (Linux 6.12+): writing to
        memory.peak resets the peak seen through that open file, which this object keeps open;
        on older kernels memory.peak is the peak since the group was made (returns False)."""
        d = self._d("memory")
        if d is None:
            return False
        if self.version == 1:
            (d / "memory.max_usage_in_bytes").write_text("0")
            return True
        self.close()
        try:
            fd = os.open(d / "memory.peak", os.O_RDWR)
        except OSError:
            return False
        try:
            os.write(fd, b"reset\n")
        except OSError:
            os.close(fd)
            return False
        self._peak_fd = fd
        return True

    def memory_peak(self) -> int:
        d = self._d("memory")
        if d is None:
            return 0
        if self._peak_fd is not None:
            with contextlib.suppress(OSError, ValueError):
                return int(os.pread(self._peak_fd, 64, 0).split()[0])
        f = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        return int(read_int(d / f, 0) or 0)

    def close(self) -> None:
        if self._peak_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._peak_fd)
            self._peak_fd = None

    def oom_kills(self) -> int:
        d = self._d("memory")
        if d is None:
            return 0
        return kv_file(d / ("memory.events" if self.version == 2 else "memory.oom_control")).get("oom_kill", 0)

    # -------------------------------------------------------------------- cpu
    def set_cpu_max(self, quota_us: int, period_us: int) -> None:
        """CFS bandwidth: `quota_us` of CPU time per `period_us` (both within the kernel's bounds)."""
        d = self._d("cpu")
        if d is None:
            return
        period = min(1_000_000, max(1000, int(period_us)))
        quota = max(1000, int(quota_us))
        if self.version == 2:
            (d / "cpu.max").write_text(f"{quota} {period}")
        else:
            (d / "cpu.cfs_period_us").write_text(str(period))
            (d / "cpu.cfs_quota_us").write_text(str(quota))

    def set_cpu_cores(self, cores: float, period_s: float) -> tuple[int, int]:
        """`cores` CPUs' worth of time per CFS period of `period_s`; returns (quota, period) in us."""
        period = min(1_000_000, max(1000, int(round(period_s * 1e6))))
        quota = max(1000, int(cores * period))
        self.set_cpu_max(quota, period)
        return quota, period

    def set_cpu_shares(self, shares: int) -> None:
        """The group's CPU weight against its siblings when the host is oversubscribed (v1 cpu.shares,
        default 1024; v2 cpu.weight, default 100, mapped as systemd maps shares)."""
        d = self._d("cpu")
        if d is None:
            return
        shares = min(262144, max(2, int(shares)))
        if self.version == 2:
            (d / "cpu.weight").write_text(str(1 + (shares - 2) * 9999 // 262142))
        else:
            (d / "cpu.shares").write_text(str(shares))

    def cpu_max(self) -> tuple[int, int] | None:
        """(quota, period) in microseconds, or None when unlimited."""
        d = self._d("cpu")
        if d is None:
            return None
        if self.version == 2:
            q, _, p = (read_text(d / "cpu.max") or "max").partition(" ")
            return None if q == "max" else (int(q), int(p or 100000))
        q = read_int(d / "cpu.cfs_quota_us", -1) or -1
        return None if q <= 0 else (q, int(read_int(d / "cpu.cfs_period_us", 100000) or 100000))

    def cpu_throttled_s(self) -> float:
        d = self._d("cpu")
        if d is None:
            return 0.0
        st = kv_file(d / "cpu.stat")
        return st.get("throttled_usec", 0) / 1e6 if self.version == 2 else st.get("throttled_time", 0) / 1e9

    # -------------------------------------------------------------------- disk
    def set_read_bps(self, devno: str, bps: int) -> None:
        """Throttle reads from block device `devno` ("major:minor") to `bps` bytes/s."""
        d = self._d("io")
        if d is None:
            return
        if self.version == 2:
            (d / "io.max").write_text(f"{devno} rbps={int(bps)}")
        else:
            (d / "blkio.throttle.read_bps_device").write_text(f"{devno} {int(bps)}")

    def read_bps(self) -> dict[str, int]:
        d = self._d("io")
        out: dict[str, int] = {}
        if d is None:
            return out
        if self.version == 2:
            for line in (read_text(d / "io.max") or "").splitlines():
                parts = line.split()
                for kv in parts[1:]:
                    k, _, v = kv.partition("=")
                    if k == "rbps" and v.isdigit():
                        out[parts[0]] = int(v)
        else:
            for line in (read_text(d / "blkio.throttle.read_bps_device") or "").splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1].isdigit():
                    out[parts[0]] = int(parts[1])
        return out

    def io_read_bytes(self) -> int:
        """Bytes the group read through the block layer (all devices)."""
        d = self._d("io")
        total = 0
        if d is None:
            return 0
        if self.version == 2:
            for line in (read_text(d / "io.stat") or "").splitlines():
                for kv in line.split()[1:]:
                    k, _, v = kv.partition("=")
                    if k == "rbytes" and v.isdigit():
                        total += int(v)
            return total
        for line in (read_text(d / "blkio.throttle.io_service_bytes") or "").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] == "Read" and parts[2].isdigit():
                total += int(parts[2])
        return total

    # -------------------------------------------------------------------- processes
    def procs_files(self) -> list[Path]:
        """The files a process writes its pid to, to join the group (every controller's)."""
        return [d / "cgroup.procs" for d in self.paths()]

    def add(self, pid: int) -> None:
        for f in self.procs_files():
            f.write_text(str(pid))

    def pids(self) -> list[int]:
        out: set[int] = set()
        for f in self.procs_files():
            out.update(int(x) for x in (read_text(f) or "").split() if x.isdigit())
        return sorted(out)

    def kill(self, timeout: float = 2.5) -> None:
        """SIGKILL every process in the group and wait until it is empty."""
        if self.version == 2:
            for d in self.paths():
                with contextlib.suppress(OSError):
                    (d / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def remove(self) -> None:
        """Kill what is left inside, then remove the dirs (tasks take a moment to leave)."""
        self.close()
        self.kill()
        for d in self.paths():
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                raise EmulationError(f"could not remove cgroup {d}", where="emulated cluster clean-up",
                                     fix=f"kill the processes in {d}/cgroup.procs and rmdir it")


# ------------------------------------------------------------------------------------ hierarchy
@dataclass(frozen=True)
class Hierarchy:
    """Where devices' groups are made: v1 (a mount per controller) or v2 (the unified mount)."""

    version: int
    mounts: dict[str, Path]  # controller -> mount point (v2: the same point for all)

    def describe(self) -> str:
        if self.version == 2:
            return f"cgroup v2 (unified hierarchy at {self.mounts['memory']})"
        return "cgroup v1 (" + ", ".join(f"{V1_NAME[c]} at {p}" for c, p in self.mounts.items()) + ")"

    def create(self, name: str) -> Group:
        """Make group `name` with the memory, cpu and io controllers (EmulationError if it cannot)."""
        if self.version == 2:
            root = self.mounts["memory"]
            self._enable(root)
            d = root / name
            d.mkdir()
            return Group(2, {c: d for c in NEEDED})
        dirs = {}
        for c, mount in self.mounts.items():
            d = mount / name
            d.mkdir()
            dirs[c] = d
        return Group(1, dirs)

    def group(self, name: str) -> Group:
        """An existing group by name (for removal after a crash)."""
        if self.version == 2:
            d = self.mounts["memory"] / name
            return Group(2, {c: d for c in NEEDED})
        return Group(1, {c: m / name for c, m in self.mounts.items()})


    @staticmethod
    def _enable(root: Path) -> None:
        """v2: let groups under `root` have memory, cpu and io (the parent's subtree_control)."""
        have = set((read_text(root / "cgroup.subtree_control") or "").split())
        missing = [c for c in NEEDED if c not in have]
        if not missing:
            return
        try:
            (root / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing))
        except OSError as exc:
            raise EmulationError(f"cannot enable the {', '.join(missing)} controller(s) for groups under {root} "
                                 f"({exc.strerror or exc})", where="cgroup v2",
                                 fix="run as root in the host's cgroup namespace, or with --no-emulate") from None


def detect(mounts: Mounts | None = None, prefer: str | None = None) -> Hierarchy:
    """The hierarchy that gives a device's group memory, cpu and io limits: v2 when its root offers
    all three, else v1 when all three are mounted; otherwise one EmulationError saying what there is.
    `prefer` ("v1", "v2", or $PRIMASIM_CGROUP) picks one where both are usable."""
    mounts = mounts if mounts is not None else Mounts.read()
    prefer = prefer or os.environ.get("PRIMASIM_CGROUP", "")
    v2_ok = mounts.v2 is not None and set(NEEDED) <= mounts.v2_controllers()
    v1_ok = all(V1_NAME[c] in mounts.v1 for c in NEEDED)
    v2 = Hierarchy(2, {c: mounts.v2[1] for c in NEEDED}) if v2_ok and mounts.v2 else None
    v1 = Hierarchy(1, {c: mounts.v1[V1_NAME[c]][1] for c in NEEDED}) if v1_ok else None
    order = [v1, v2] if prefer == "v1" else [v2, v1]
    for h in order:
        if h is not None:
            return h
    seen = []
    if mounts.v1:
        seen.append("v1 mounts: " + ", ".join(sorted(c for c in mounts.v1 if not c.startswith("name="))))
    if mounts.v2 is not None:
        seen.append(f"unified at {mounts.v2[1]} offers: {' '.join(sorted(mounts.v2_controllers())) or 'no controllers'}")
    raise EmulationError("no cgroup hierarchy offers the memory, cpu and io controllers an emulated device needs ("
                         + ("; ".join(seen) or "no cgroup file system mounted") + ")",
                         where="emulated cluster",
                         fix="mount cgroup v1 memory, cpu and blkio, or cgroup2 with those controllers free, or run "
                             "with --no-emulate (plain processes, no limits)")


def group_dirs(mounts: Mounts | None = None) -> list[Path]:
    """Every dir directly under the mounts a device's group can live in (the v1 memory, cpu and
    blkio mounts and the unified one): where leftovers of a crashed run are looked for."""
    mounts = mounts if mounts is not None else Mounts.read()
    roots = [mounts.v1[V1_NAME[c]][1] for c in NEEDED if V1_NAME[c] in mounts.v1]
    if mounts.v2 is not None:
        roots.append(mounts.v2[1])
    out: list[Path] = []
    for r in dict.fromkeys(roots):
        with contextlib.suppress(OSError):
            out += sorted(p for p in r.iterdir() if p.is_dir())
    return out


def own_group(controller: str = "memory", proc_cgroup: str | Path = "/proc/self/cgroup",
              mounts: Mounts | None = None) -> Group | None:
    """This process's group for `controller` (memory, cpu, io): in v1 if the controller is mounted
    there, else in v2 if the unified hierarchy has it at our group; None otherwise."""
    mounts = mounts or Mounts.read()
    v1, v2 = own_dirs(proc_cgroup, mounts)
    name = V1_NAME.get(controller, controller)
    if name in v1:
        return Group(1, {controller: v1[name]})
    if v2 is not None and controller in mounts.v2_controllers():
        probe = {"memory": "memory.max", "cpu": "cpu.max", "io": "io.max"}[controller]
        if (v2 / probe).exists() or v2 == (mounts.v2[1] if mounts.v2 else None):
            return Group(2, {controller: v2})
    return None
