"""An emulated home cluster on one Linux host: every device is a worker process with real OS limits.

Per device (from `DeviceSpec.emulate`, an `EmulationSpec`), one cgroup ``primasim-e<rid>-<i>-<name>``
in whichever hierarchy offers the controllers (`primasim.core.cgroups.detect`: cgroup v2's unified
tree, or v1's per-controller mounts; neither = one clear error):

- **memory** (v1 ``memory.limit_in_bytes``, v2 ``memory.max``): bounds anonymous memory *and* the
  page cache the worker charges, so mmap'd weights beyond the limit are evicted and re-read for
  real. The limit is `memory_limit` on top of the worker's own footprint (Python, JAX, compiled
  code: the runtime is not part of a phone's memory budget either; its anonymous, kernel and
  mlocked memory, not the evictable page cache set-up read), measured after set-up, which
  compiles without reading weights, and applied before the worker maps any weight, allocates its
  KV caches or reads a page (`set_memory_budget`);
- **cpu** (v1 ``cpu.cfs_quota_us`` / ``cfs_period_us``, v2 ``cpu.max``) = cpu_quota x the period,
  plus a CPU affinity of `threads` cores so XLA sizes its thread pool to the device; with
  ``$PRIMASIM_EMULATE_CPU_SHARES`` set, that CPU weight (v1 ``cpu.shares``, v2 ``cpu.weight``) so a
  device still gets its quota on an oversubscribed host (measurements on a shared machine);
- **io** (v1 ``blkio.throttle.read_bps_device``, v2 ``io.max rbps=``) = disk_read_bw on the disk(s)
  that hold the checkpoint (page-fault reads are throttled too);
- its own **network namespace** ``primasim-e<rid>-<i>``, joined by a veth pair to a bridge
  ``primasim-e<rid>`` in the root namespace (where the driver lives). Egress from each device is
  shaped with ``tc tbf`` at the link bandwidth of `NetworkSpec`, one tbf per peer under an htb
  classifier (per-pair overrides; traffic to the driver is not shaped). Link latency and jitter are added in user space by the
  worker's sender thread (``netem`` is not available here).

Robust set-up and tear-down: `EmulatedCluster` is a context manager; before creating anything it
writes a state file (owner pid + start time) listing every resource it creates, so a run killed
with SIGKILL leaves a record and the next start (or `cleanup_stale()`, ``primasim run --cleanup``)
removes the leftovers. Workers die with their parent (PR_SET_PDEATHSIG) and also exit when the
driver's heartbeat stops. Without root the cluster runs plain processes on 127.0.0.1 and
`limitations` says what it could not emulate.

Longer than ~600 lines: the emulated cluster's whole life cycle (cgroups, namespaces, shaped links,
worker processes, clean-up after a crash, the `enter` launcher) under one lock file and one state
file; being reworked under issue 14 (residency, memory limits before set-up), split after that.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from primasim.core import cgroups
from primasim.core.cluster import ClusterSpec
from primasim.core.errors import EmulationError, WorkerError
from primasim.core.procfs import block_device_of
from primasim.core.runtime_facts import emulated_cpus
from primasim.core.units import MBPS, MiB

PREFIX = "primasim-e"
_RID = re.compile(r"^primasim-e([0-9a-f]{4})")
CPU_PERIOD_US = 100_000
CLONE_NEWNET = 0x40000000
WORKDIR_PREFIX = "primasim-run-"
PR_SET_PDEATHSIG = 1


def state_dir() -> Path:
    """Where running emulations record their resources (tmpfs: a reboot clears both)."""
    for cand in (Path("/run/primasim-emu"), Path(tempfile.gettempdir()) / "primasim-emu"):
        try:
            cand.mkdir(parents=True, exist_ok=True)
            if os.access(cand, os.W_OK):
                return cand
        except OSError:
            continue
    raise EmulationError("no writable state directory", where="/run/primasim-emu",
                         fix="run as root or make /tmp writable")


CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21


def is_root() -> bool:
    """Whether this process may emulate: root with CAP_SYS_ADMIN (namespaces, cgroups, setns)
    and CAP_NET_ADMIN (veth, tc) in its effective set."""
    if os.geteuid() != 0:
        return False
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
                return bool(caps >> CAP_SYS_ADMIN & 1 and caps >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return True


def _sh(*args: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    try:
        p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise EmulationError(f"command not found: {args[0]}", where="emulated cluster",
                             fix="install iproute2 (ip, tc)") from None
    except subprocess.TimeoutExpired:
        raise EmulationError(f"`{' '.join(args)}` timed out", where="emulated cluster", fix="check the host") from None
    if check and p.returncode != 0:
        raise EmulationError(f"`{' '.join(args)}` failed: {p.stderr.strip() or p.stdout.strip()}",
                             where="emulated cluster", fix="check that iproute2 works and you are root")
    return p


def _proc_start_time(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(raw[raw.rindex(")") + 2:].split()[19])


def _alive(pid: int, start: int | None) -> bool:
    st = _proc_start_time(pid)
    return st is not None and (start is None or st == start)


# ------------------------------------------------------------------------------------ clean-up
def _remove_cgroup(cg: Path) -> None:
    if cg.exists():
        cgroups.Group.at(cg).remove()


def _remove_netns(ns: str) -> None:
    if not Path(f"/run/netns/{ns}").exists():
        return
    # processes still inside would keep the namespace alive: kill them first
    p = _sh("ip", "netns", "pids", ns, check=False)
    for tok in p.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(tok), signal.SIGKILL)
    _sh("ip", "netns", "del", ns, check=False)


def _remove_link(name: str) -> None:
    if Path(f"/sys/class/net/{name}").exists():
        _sh("ip", "link", "del", name, check=False)


def _destroy(resources: dict[str, list[Any]]) -> list[str]:
    """Remove recorded resources in the safe order: processes, cgroups, namespaces, links."""
    done: list[str] = []
    for pid, start in resources.get("pids", []):
        if _alive(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            done.append(f"process {pid}")
    for cg in resources.get("cgroups", []):
        if Path(cg).exists():
            _remove_cgroup(Path(cg))
            done.append(f"cgroup {cg}")
    for ns in resources.get("netns", []):
        if Path(f"/run/netns/{ns}").exists():
            _remove_netns(ns)
            done.append(f"netns {ns}")
    for ln in resources.get("links", []):
        if Path(f"/sys/class/net/{ln}").exists():
            _remove_link(ln)
            done.append(f"link {ln}")
    for d in resources.get("dirs", []):
        p = Path(d)
        # only a run's own work folder (logs, ready files): never follow a state file elsewhere
        if p.name.startswith(WORKDIR_PREFIX) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"folder {d}")
    return done


def find_leftovers() -> dict[str, list[str]]:
    """Every primasim emulation resource on this host, by kind (whether in use or not)."""
    out: dict[str, list[str]] = {"cgroups": [str(p) for p in cgroups.group_dirs() if _RID.match(p.name)],
                                 "netns": [], "links": []}
    if Path("/run/netns").is_dir():
        out["netns"] = sorted(p.name for p in Path("/run/netns").iterdir() if _RID.match(p.name))
    if Path("/sys/class/net").is_dir():
        out["links"] = sorted(p.name for p in Path("/sys/class/net").iterdir() if _RID.match(p.name))
    return out


def cleanup_stale() -> list[str]:
    """Remove the resources of emulations whose owner process is gone (crashed or SIGKILLed
    drivers), and unrecorded primasim-e* resources. Live runs are left alone."""
    removed: list[str] = []
    live: set[str] = set()
    sd = state_dir()
    for f in sorted(sd.glob("*.json")):
        try:
            st = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            f.unlink(missing_ok=True)
            continue
        if _alive(int(st.get("pid", -1)), st.get("start")):
            live.add(st["rid"])
            continue
        res = st.get("resources", {})
        privileged = any(res.get(k) for k in ("cgroups", "netns", "links"))
        if is_root() or not privileged:
            removed += _destroy(res)  # without root: its worker processes and work folder
            f.unlink(missing_ok=True)
    if not is_root():
        return removed
    left = find_leftovers()
    orphan = {k: [x for x in v if (m := _RID.match(Path(x).name)) and m.group(1) not in live] for k, v in left.items()}
    removed += _destroy(orphan)
    return removed


# ------------------------------------------------------------------------------------ devices
@dataclass
class EmulatedDevice:
    """One device of the emulated cluster and the OS objects that emulate it."""

    name: str
    index: int
    host: str  # IP the worker listens on
    netns: str | None = None
    veth: str | None = None
    group: cgroups.Group | None = None  # memory, cpu and io limits (cgroup v1 or v2)
    cpus: list[int] = field(default_factory=list)
    memory_limit: float = 0.0  # bytes on top of the worker's own footprint (0 = no limit)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    ready_path: Path | None = None
    base_usage: int = 0
    applied: list[str] = field(default_factory=list)

    @property
    def cgroups(self) -> dict[str, Path]:
        """The group's dir per controller (memory, cpu, io); {} without one."""
        return dict(self.group.dirs) if self.group is not None else {}


class EmulatedCluster:
    """Context manager: set up the emulated devices of `cluster`, spawn a worker in each, and
    tear everything down on exit, on error, on SIGTERM/SIGHUP and at interpreter exit."""

    def __init__(self, cluster: ClusterSpec, devices: list[str] | None = None, *,
                 checkpoint_files: list[str] | None = None, emulate: bool = True,
                 workdir: str | Path | None = None, heartbeat_timeout: float = 10.0, network: bool = True,
                 listen_host: str = "127.0.0.1", hierarchy: cgroups.Hierarchy | None = None) -> None:
        self.cluster = cluster
        self.names = list(devices) if devices else cluster.names
        self.checkpoint_files = [str(p) for p in (checkpoint_files or [])]
        self.want = emulate
        self.root = is_root()
        self.active = emulate and self.root
        self.heartbeat_timeout = heartbeat_timeout
        self.network = network
        self.listen_host = listen_host
        self.limitations: list[str] = []
        self.hierarchy = hierarchy  # where the devices' cgroups live (as root; detected unless given)
        self.devices: dict[str, EmulatedDevice] = {}
        self.rid = ""
        self.bridge: str | None = None
        self._state_file: Path | None = None
        self._resources: dict[str, list[Any]] = {"pids": [], "cgroups": [], "netns": [], "links": [], "dirs": []}
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        self._closed = False
        self._old_handlers: dict[int, Any] = {}
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------------- set-up
    def __enter__(self) -> EmulatedCluster:
        try:
            self._install_handlers()
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup(self) -> None:
        if self.want and not self.root:
            self.limitations.append("not root (or no CAP_SYS_ADMIN/CAP_NET_ADMIN): devices run as plain "
                                    "processes on 127.0.0.1 without memory limits, CPU quotas, disk throttles "
                                    "or link bandwidth shaping (link latency is still added in user space)")
        # a crashed (SIGKILLed) earlier run left processes, a work folder and, as root, cgroups,
        # namespaces and links: remove them, then record ours before creating anything
        removed = cleanup_stale()
        if removed:
            self.limitations.append(f"removed {len(removed)} stale resource(s) of a crashed run")
        if self.active:
            self.hierarchy = self.hierarchy or cgroups.detect()  # v2 or v1, or one clear EmulationError
        self.rid = self._new_rid()
        try:
            self._state_file = state_dir() / f"{self.rid}.json"
        except EmulationError:
            if self.active:
                raise
        self._save_state()
        if self._own_workdir:
            self._record("dirs", str(self.workdir))
        if self.active:
            if self.network:
                self._setup_network()
                if self.cluster.network.kind == "wifi" and len(self.names) > 2:
                    self.limitations.append("Wi-Fi is emulated as one shaped link per device pair (each "
                                            "device's egress), not as one shared medium: concurrent "
                                            "transfers do not contend for airtime")
            else:
                self.limitations.append("no network namespaces (the cluster has devices on other machines, "
                                        "which namespaced devices could not reach): links are not shaped")
        for i, name in enumerate(self.names):
            dev = self.cluster.device(name)
            host = self.devices[name].host if name in self.devices else self.listen_host
            ed = self.devices.setdefault(name, EmulatedDevice(name, i, host))
            if self.active:
                self._setup_cgroups(ed, dev.emulate)
            ed.cpus = self._cpus_for(i, dev.emulate.threads if dev.emulate else 0,
                                     dev.emulate.cpu_quota if dev.emulate else 0.0)
            if dev.emulate is None and self.active:
                self.limitations.append(f"{name}: no [devices.emulate] table, runs without limits")

    def _new_rid(self) -> str:
        taken = {m.group(1) for v in find_leftovers().values() for x in v if (m := _RID.match(Path(x).name))}
        taken |= {p.stem for p in state_dir().glob("*.json")}
        for _ in range(100):
            rid = secrets.token_hex(2)
            if rid not in taken:
                return rid
        raise EmulationError("no free run id", where="emulated cluster", fix="run `primasim run --cleanup`")

    def _save_state(self) -> None:
        if self._state_file is None:
            return
        st = {"rid": self.rid, "pid": os.getpid(), "start": _proc_start_time(os.getpid()),
              "cluster": self.cluster.name, "resources": self._resources}
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(st))
        tmp.replace(self._state_file)

    def _record(self, kind: str, item: Any) -> None:
        with self._lock:
            self._resources[kind].append(item)
            self._save_state()

    def _subnet(self) -> int:
        used = _sh("ip", "-o", "-4", "addr", check=False).stdout
        for x in range(256):
            if f"10.213.{x}." not in used:
                return x
        raise EmulationError("no free 10.213.x.0/24 subnet", where="emulated cluster",
                             fix="run `primasim run --cleanup`")

    def _setup_network(self) -> None:
        x = self._subnet()
        self.bridge = f"{PREFIX}{self.rid}"
        self._record("links", self.bridge)
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"10.213.{x}.1/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        ips = {n: f"10.213.{x}.{10 + i}" for i, n in enumerate(self.names)}
        for i, name in enumerate(self.names):
            ns = f"{PREFIX}{self.rid}-{i}"
            veth = f"{PREFIX}{self.rid}{_b36(i)}"
            self._record("netns", ns)
            _sh("ip", "netns", "add", ns)
            self._record("links", veth)
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "link", "set", veth, "master", self.bridge, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{ips[name]}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            ed = EmulatedDevice(name, i, ips[name], netns=ns, veth=veth)
            self.devices[name] = ed
            self._shape(ed, ips)

    def _shape(self, ed: EmulatedDevice, ips: dict[str, str]) -> None:
        """tbf on the device's egress at its link bandwidth(s)."""
        net = self.cluster.network
        peers = [n for n in self.names if n != ed.name]
        if not peers:
            return
        rates = {p: net.link(ed.name, p)[0] for p in peers}
        ns = ed.netns
        assert ns is not None
        # htb only classifies by destination (its classes are not the bottleneck); each leaf tbf
        # shapes one link. Traffic to the driver (the bridge) is not a device link: unshaped.
        _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb",
            "default", "999", "r2q", "1000")
        _sh("ip", "netns", "exec", ns, "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:999",
            "htb", "rate", "10gbit")
        for j, p in enumerate(peers, start=10):
            _sh("ip", "netns", "exec", ns, "tc", "class", "add", "dev", "eth0", "parent", "1:",
                "classid", f"1:{j}", "htb", "rate", "10gbit")
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "parent", f"1:{j}",
                "handle", f"{j}:", *_tbf_args(rates[p]))
            _sh("ip", "netns", "exec", ns, "tc", "filter", "add", "dev", "eth0", "parent", "1:", "protocol",
                "ip", "prio", "1", "u32", "match", "ip", "dst", f"{ips[p]}/32", "flowid", f"1:{j}")
        ed.applied.append("egress " + ", ".join(f"to {p} {r / MBPS:.0f} Mbit/s" for p, r in rates.items()) + " (tbf)")

    def _setup_cgroups(self, ed: EmulatedDevice, em: Any) -> None:
        if em is None:
            return
        assert self.hierarchy is not None
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", ed.name)[:40]
        name = f"{PREFIX}{self.rid}-{ed.index}-{safe}"
        for d in self.hierarchy.group(name).paths():
            self._record("cgroups", str(d))  # before creating: a crash in between leaves a record
        g = ed.group = self.hierarchy.create(name)
        if em.cpu_quota > 0:
            # the device's CFS period (cpu_period_ms, default 100 ms): a short one spreads the quota
            # evenly, so the device is a slower CPU rather than a fast one that pauses
            g.set_cpu_cores(em.cpu_quota, getattr(em, "cpu_period", CPU_PERIOD_US / 1e6))
            ed.applied.append(f"cpu quota {em.cpu_quota:g} cores")
            if shares := int(os.environ.get("PRIMASIM_EMULATE_CPU_SHARES", "0") or 0):
                # on a shared, oversubscribed host a group competes as one task: a high weight gives the
                # device its quota (still capped by it), as a real device has its CPUs to itself
                g.set_cpu_shares(shares)
                ed.applied.append(f"cpu shares {shares}")
        if em.disk_read_bw > 0:
            devs = sorted({d for f in self.checkpoint_files if (d := _block_device(f))})
            if not devs:
                self.limitations.append(f"{ed.name}: checkpoint is not on a block device; disk not throttled")
            for d in devs:
                g.set_read_bps(d, int(em.disk_read_bw))
            if devs:
                ed.applied.append(f"disk read {em.disk_read_bw / 1e6:g} MB/s on {', '.join(devs)}")
        ed.memory_limit = float(em.memory_limit)

    def _cpus_for(self, i: int, threads: int, quota: float) -> list[int]:
        return emulated_cpus(i, threads, quota, sorted(os.sched_getaffinity(0)))  # the simulator's rule too

    # -------------------------------------------------------------------------------- workers
    def spawn(self, name: str, extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> EmulatedDevice:
        """Start `primasim worker` for device `name` inside its cgroups and namespace."""
        ed = self.devices[name]
        ed.log_path = self.workdir / f"worker-{ed.index}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.log"
        ed.ready_path = self.workdir / f"worker-{ed.index}.ready"
        ed.ready_path.unlink(missing_ok=True)
        port = "5555" if ed.netns else "0"
        extra = list(extra_args or [])
        if "--keys" not in extra and ed.host not in ("127.0.0.1", "localhost"):
            # a namespaced device listens on its bridge address (reachable from this host only); with
            # remote devices, on every interface, as the head's user asked by running without --keys
            extra.append("--insecure")
        worker = [sys.executable, "-m", "primasim", "worker", "--listen", f"tcp://{ed.host}:{port}",
                  "--once", "--ready-file", str(ed.ready_path), "--name", name,
                  "--heartbeat-timeout", str(self.heartbeat_timeout), "--parent-pid", str(os.getpid()),
                  *extra]
        enter = [sys.executable, "-m", "primasim.runtime.emulate", "enter"]
        if ed.netns:
            enter += ["--netns", ed.netns]
        for cg in ed.group.paths() if ed.group is not None else []:
            enter += ["--cgroup", str(cg)]
        enter += ["--cpus", ",".join(map(str, ed.cpus)), "--", *worker]
        penv = dict(os.environ)
        penv.update(env or {})
        penv["PRIMASIM_THREADS"] = str(len(ed.cpus))
        penv["PYTHONUNBUFFERED"] = "1"
        log = open(ed.log_path, "wb")  # noqa: SIM115 - the child owns it
        try:
            ed.process = subprocess.Popen(enter, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=penv, start_new_session=True)
        finally:
            log.close()
        self._record("pids", [ed.process.pid, _proc_start_time(ed.process.pid)])
        return ed

    def wait_ready(self, name: str, timeout: float) -> dict[str, Any]:
        """The endpoints a spawned worker bound, once it is listening (or WorkerError)."""

        ed = self.devices[name]
        assert ed.process is not None and ed.ready_path is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ed.ready_path.exists():
                try:
                    return json.loads(ed.ready_path.read_text())
                except json.JSONDecodeError:
                    pass  # being written
            rc = ed.process.poll()
            if rc is not None:
                raise WorkerError(f"worker exited with code {rc} before listening:\n{self.log_tail(name)}",
                                  where=f"device {name}", fix="see the worker log above")
            time.sleep(0.02)
        raise WorkerError(f"worker did not start listening within {timeout:.0f} s:\n{self.log_tail(name)}",
                          where=f"device {name}", fix="the host may be overloaded; raise --timeout")

    def log_tail(self, name: str, lines: int = 15) -> str:
        ed = self.devices.get(name)
        if ed is None or ed.log_path is None or not ed.log_path.exists():
            return "(no log)"
        text = ed.log_path.read_text(errors="replace").splitlines()
        return "\n".join("    " + ln for ln in text[-lines:])

    def process_state(self, name: str) -> str:
        """The worker process's scheduler state, if unusual: "stopped (SIGSTOP)", "in uninterruptible
        sleep (disk?)", ...; "" when running or sleeping normally."""
        ed = self.devices.get(name)
        if ed is None or ed.process is None:
            return ""
        try:
            st = Path(f"/proc/{ed.process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return ""
        return {"T": "stopped (SIGSTOP/SIGTSTP)", "t": "stopped by a debugger", "D": "in uninterruptible sleep (disk?)",
                "Z": "a zombie (exited)"}.get(st, "")

    def set_link_rate(self, name: str, bits_per_s: float) -> list[str]:
        """Re-shape every link out of device `name` to `bits_per_s` (a fault: ~0 stalls the ring
        without touching the heartbeats, whose traffic to the driver is not shaped). Returns the
        tbf qdiscs changed."""
        ed = self.devices[name]
        if ed.netns is None:
            raise EmulationError(f"device {name} has no network namespace", where="set_link_rate",
                                 fix="run as root with the emulated network")
        return set_egress_rate(ed.netns, bits_per_s)

    def exit_reason(self, name: str) -> str:
        """Why a worker process ended: exit code, signal, OOM kill in its memory cgroup."""
        ed = self.devices[name]
        rc = ed.process.poll() if ed.process else None
        parts = []
        if rc is not None:
            parts.append(f"exit code {rc}" if rc >= 0 else f"killed by {signal.Signals(-rc).name}")
        g = ed.group
        if g is not None and g.oom_kills() > 0:
            parts.append(f"OOM-killed in its memory cgroup (limit {g.memory_max() / MiB:.0f} MiB)")
        return ", ".join(parts) or "still running"

    # -------------------------------------------------------------------------------- memory
    def set_memory_budget(self, name: str) -> int | None:
        """Limit the device's memory to the runtime's own footprint (Python, JAX, compiled code; no
        weights, no KV caches yet) plus `memory_limit`, before the worker maps its weights. Returns
        the limit.

        The footprint is what the group holds that reclaim cannot take: its usage less the file
        pages on its LRU lists (files set-up read: the checkpoint's header and checks, Python
        sources). Those pages are evicted as soon as the weights need the room, so counting them
        gave the device's page cache their bytes on top of its memory (2-4 MB per device, up to 14
        in the Q4_K_M streaming study's run4). Mlocked code stays (the unevictable list)."""
        ed = self.devices[name]
        g = ed.group
        if g is None or ed.memory_limit <= 0:
            return None
        usage = g.held()
        ed.base_usage = usage
        limit = int(usage + ed.memory_limit)
        try:
            g.set_memory_max(limit)
            g.reset_peak()  # the peak from here on
        except OSError as exc:
            raise EmulationError(f"could not set memory limit {limit} ({exc})", where=f"device {name}",
                                 fix="raise memory_mib in [devices.emulate]") from None
        ed.applied.append(f"memory {ed.memory_limit / MiB:.0f} MiB (+ {usage / MiB:.0f} MiB runtime footprint)")
        return limit

    def cgroup_stats(self, name: str) -> dict[str, float]:
        """Counters of the device's cgroup: memory usage/peak/limit, page cache, major faults,
        disk bytes read, CPU throttled time."""
        g = self.devices[name].group
        if g is None:
            return {}
        return {"cg_mem_usage": float(g.memory_current()), "cg_mem_max_usage": float(g.memory_peak()),
                "cg_mem_limit": float(g.memory_max()), "cg_pgmajfault": float(g.major_faults()),
                "cg_cache": float(g.page_cache()), "cg_blkio_read_bytes": float(g.io_read_bytes()),
                "cg_cpu_throttled_s": g.cpu_throttled_s(), "cg_version": float(g.version)}

    def describe(self) -> dict[str, Any]:
        return {"emulated": self.active, "run_id": self.rid, "limitations": list(self.limitations),
                "cgroups": self.hierarchy.describe() if self.hierarchy is not None else None,
                "devices": {n: {"host": d.host, "netns": d.netns, "cpus": d.cpus, "applied": list(d.applied)}
                            for n, d in self.devices.items()}}

    # -------------------------------------------------------------------------------- tear-down
    def stop_workers(self, grace: float = 3.0) -> None:
        procs = [d.process for d in self.devices.values() if d.process is not None and d.process.poll() is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
                p.send_signal(signal.SIGCONT)  # a stopped worker (SIGSTOP) takes its SIGTERM now
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(timeout=5)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.stop_workers()
            if self.active or self._state_file is not None:
                _destroy(self._resources)
                left = [x for v in find_leftovers().values() for x in v if f"{PREFIX}{self.rid}" in x] if self.rid else []
                if left:
                    # veth peers vanish asynchronously after their namespace: give them a moment
                    time.sleep(0.3)
                    _destroy({"links": [x for x in left if "/" not in x]})
            if self._state_file is not None:
                self._state_file.unlink(missing_ok=True)
        finally:
            self._restore_handlers()
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _install_handlers(self) -> None:
        atexit.register(self.close)
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.close()
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, on_signal)

    def _restore_handlers(self) -> None:
        atexit.unregister(self.close)
        if threading.current_thread() is threading.main_thread():
            for sig, h in self._old_handlers.items():
                signal.signal(sig, h)
        self._old_handlers.clear()


def _b36(i: int) -> str:
    if not 0 <= i < 36:
        raise EmulationError(f"at most 36 emulated devices, got index {i}", where="emulated cluster",
                             fix="use fewer devices")
    return "0123456789abcdefghijklmnopqrstuvwxyz"[i]


def tbf_burst(rate: float) -> int:
    """Bytes of the tbf bucket on a link of `rate` bytes/s: ~1 ms of traffic, at least 2 MTU."""
    return max(3028, int(rate * 1e-3))


def _tbf_args(rate: float) -> list[str]:
    """tbf at `rate` bytes/s: a burst of ~1 ms of traffic (>= 2 MTU) keeps small activations
    within 1 ms of their exact serialisation time; the queue holds 0.5 s before dropping."""
    burst = tbf_burst(rate)
    limit = max(1 << 20, int(rate * 0.5))
    return ["tbf", "rate", f"{int(rate * 8)}bit", "burst", str(burst), "limit", str(limit)]


def set_egress_rate(netns: str, bits_per_s: float) -> list[str]:
    """Change the rate of every tbf leaf (one per device link) on eth0 of `netns`."""
    out = _sh("ip", "netns", "exec", netns, "tc", "qdisc", "show", "dev", "eth0").stdout
    changed = []
    for m in re.finditer(r"qdisc tbf (\d+): parent (\S+)", out):
        handle, parent = m.group(1), m.group(2)
        rate = max(8.0, float(bits_per_s))
        burst = max(3028, int(rate / 8 * 1e-3))
        _sh("ip", "netns", "exec", netns, "tc", "qdisc", "change", "dev", "eth0", "parent", parent, "handle",
            f"{handle}:", "tbf", "rate", f"{int(rate)}bit", "burst", str(burst), "limit", str(max(1 << 20, burst)))
        changed.append(f"{netns} eth0 {handle}: {int(rate)}bit")
    return changed


def set_cpu_quota(pid: int, quota_us: int, period_us: int = 1_000_000) -> Path:
    """Re-set the CPU quota of the emulated device running `pid` (a fault: 1000 us a second starves
    its compute ~1000x while a heartbeat still fits). Returns the cpu cgroup changed."""
    g = cgroups.own_group("cpu", proc_cgroup=f"/proc/{pid}/cgroup")
    if g is None or not g.name.startswith(PREFIX):
        raise EmulationError(f"process {pid} is not in an emulated device's cpu cgroup "
                             f"({g.paths()[0] if g else 'none'})", where="set_cpu_quota",
                             fix="run as root with emulated devices")
    g.set_cpu_max(quota_us, period_us)
    return g.paths()[0]


def _block_device(path: str) -> str | None:
    try:
        dev = block_device_of(path)
    except OSError:
        return None
    return dev.devno if dev is not None else None


# ------------------------------------------------------------------------------------ launcher
def _enter(argv: list[str]) -> None:
    """`python -m primasim.runtime.emulate enter [--netns NS] [--cgroup DIR]... [--cpus 0,1] -- CMD...`:
    join cgroups and a network namespace (setns, without remounting /sys as `ip netns exec`
    would, so the worker can read its own cgroup), die with the parent, then exec CMD."""
    if "--" not in argv:
        sys.exit("usage: python -m primasim.runtime.emulate enter [--netns NS] [--cgroup DIR]... [--cpus LIST] -- CMD")
    sep = argv.index("--")
    opts, cmd = argv[:sep], argv[sep + 1:]
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getppid()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)
    i = 0
    while i < len(opts):
        flag, val = opts[i], opts[i + 1]
        if flag == "--cgroup":
            with open(os.path.join(val, "cgroup.procs"), "w") as fh:
                fh.write(str(os.getpid()))
        elif flag == "--netns":
            fd = os.open(f"/run/netns/{val}", os.O_RDONLY)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                sys.exit(f"setns({val}) failed: {os.strerror(err)}")
            os.close(fd)
        elif flag == "--cpus" and val:
            os.sched_setaffinity(0, {int(c) for c in val.split(",")})
        i += 2
    os.execvp(cmd[0], cmd)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "enter":
        _enter(args[1:])
        return 0
    if args and args[0] == "cleanup":
        removed = cleanup_stale()
        print("\n".join(removed) if removed else "nothing to clean up")
        return 0
    print("usage: python -m primasim.runtime.emulate {enter ... -- CMD | cleanup}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
