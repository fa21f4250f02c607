"""Profile an emulated cluster device by device (probes inside each device's cgroups and network
namespace, echo peers for the links) and turn the probes into the cluster the planner and the
simulator use: effective rates in the cost model's own basis, measured links."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from primasim.core.cluster import ClusterSpec, LinkSpec, NetworkSpec
from primasim.core.device import DeviceSpec, device_from_toml
from primasim.core.errors import EmulationError
from primasim.core.model import ModelSpec
from primasim.core.model_sources import catalogue
from primasim.core.procfs import block_device_of
from primasim.core.runtime_facts import runtime_model
from primasim.core.units import GB, MB, GiB, MiB
from primasim.runtime.emulate import EmulatedCluster, tbf_burst
from primasim.runtime.head import checkpoint_files, open_weights
from primasim.sim._timing import DeviceTiming

from .probes import PROBE_ROWS

Progress = Callable[[str, float], None]  # (what, fraction of the step done)


ECHO_PORT = 5599


# ============================================================================ profiling a cluster
def _enter_argv(emu: Any, name: str, cmd: list[str]) -> list[str]:
    """The command that runs `cmd` inside device `name`'s cgroups, namespace and CPUs (the same
    launcher the emulator starts workers with)."""
    ed = emu.devices[name]
    argv = [sys.executable, "-m", "primasim.runtime.emulate", "enter"]
    if ed.netns:
        argv += ["--netns", ed.netns]
    for cg in ed.cgroups.values():
        argv += ["--cgroup", str(cg)]
    argv += ["--cpus", ",".join(map(str, ed.cpus)), "--", *cmd]
    return argv


def _start_echo(emu: Any, name: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """An echo peer (primasim.profile.profiler --echo) inside device `name`; returns it and its address."""
    host = emu.devices[name].host
    cmd = [sys.executable, "-m", "primasim.profile.profiler", "--echo", f"tcp://{host}:*", "--echo-idle", "300"]
    fh = open(log, "wb")  # noqa: SIM115 - the child owns it
    try:
        proc = subprocess.Popen(_enter_argv(emu, name, cmd), stdout=subprocess.PIPE, stderr=fh,
                                stdin=subprocess.DEVNULL, env=_child_env(emu, name))
    finally:
        fh.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    line = b""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(b"primasim-echo listening on "):
            return proc, line.split()[-1].decode()
        if proc.poll() is not None or not line:
            break
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    raise EmulationError(f"the link probe's echo peer did not start in device {name}: "
                         f"{log.read_text(errors='replace')[-500:]}", where=f"device {name}",
                         fix="see the log above")


def _child_env(emu: Any, name: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PRIMASIM_THREADS"] = str(len(emu.devices[name].cpus))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class ClusterProfile:
    """What profiling an emulated cluster measured: the raw probe results per device, the
    cluster built from them, and how it was done."""

    cluster: ClusterSpec
    probes: dict[str, dict[str, Any]]
    emulated: bool
    limitations: list[str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"cluster": self.cluster.to_toml(), "probes": self.probes, "emulated": self.emulated,
                "limitations": self.limitations, "seconds": self.seconds}


def with_read_ahead(cluster: ClusterSpec, checkpoint: str | Path) -> ClusterSpec:
    """The cluster with every local device's readahead window: the disk the checkpoint lives on
    (emulated devices read through this host's disk; queue/read_ahead_kb)."""
    dev = block_device_of(checkpoint)
    if dev is None:
        return cluster
    src = f"queue/read_ahead_kb of {dev.name} ({dev.devno}), the disk holding the checkpoint"
    devs = tuple(d.replace(read_ahead=float(dev.read_ahead), sources={**d.sources, "read_ahead_kib": src})
                 if not d.address else d for d in cluster.devices)
    return dataclasses.replace(cluster, devices=devs)


def profile_cluster(cluster: ClusterSpec, checkpoint: str | Path, model: ModelSpec, *, emulate: bool = True,
                    prompt_tokens: int = 16, max_seq: int = 1024, workdir: Path | None = None,
                    progress: Progress | None = None, timeout: float = 240.0,
                    rows: tuple[int, ...] = ()) -> ClusterProfile:
    """Profile every device of `cluster` inside its emulated limits (one at a time, so they do not
    compete for the host's CPUs), and every pair of devices over the emulated network; return the
    measured cluster (`measured_cluster`). `rows`: the tokens per call the runs will compute
    (e.g. K + 1 for speculative verification), probed instead of PROBE_ROWS's 2-8 -- the rate at a
    shape between two probed ones is interpolated, and XLA's matrix-matrix kernels are not linear
    in the rows (llama-mini-300m's block on this host, 2026-12-07: 3 rows 7 % below the line
    between the 2- and 4-row times, 6 rows 5 % and 9 rows 8 % above the lines through 4-8, 8-16)."""

    t0 = time.perf_counter()
    ckpt = open_weights(checkpoint)
    names = cluster.names
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="primasim-probe-")) if own else Path(workdir)  # type: ignore[arg-type]
    wd.mkdir(parents=True, exist_ok=True)
    probes: dict[str, dict[str, Any]] = {}
    echoes: list[subprocess.Popen[bytes]] = []
    try:
        with EmulatedCluster(cluster, names, checkpoint_files=checkpoint_files(ckpt), emulate=emulate,
                             network=True) as emu:
            addrs: dict[str, str] = {}
            if len(names) > 1:
                for n in names:
                    proc, addr = _start_echo(emu, n, wd / f"echo-{n}.log")
                    echoes.append(proc)
                    addrs[n] = addr
            for i, n in enumerate(names):
                if progress:
                    progress(f"profiling {n} inside its limits", i / len(names))
                dev = cluster.device(n)
                budget = dev.emulate.memory_limit if (dev.emulate and emu.active) else 0.0
                # a model from a config.json is not in the catalogue: the probe reads its shapes from the weights
                model_ref = model.name if model.name in catalogue() else str(Path(ckpt.path).resolve())
                out = wd / f"probe-{n}.json"
                cmd = [sys.executable, "-m", "primasim.loop.validate", "probe", "--out", str(out), "--name", n,
                       "--checkpoint", str(Path(ckpt.path).resolve()), "--model", model_ref,
                       "--budget", str(budget), "--max-seq", str(max_seq),
                       "--tokens", ",".join(str(t) for t in sorted({1, *(rows or PROBE_ROWS), max(2, prompt_tokens)}))]
                for m in names[i + 1:]:
                    cmd += ["--peer", f"{m}={addrs[m]}"]
                log = wd / f"probe-{n}.log"
                with open(log, "wb") as fh:
                    try:
                        rc = subprocess.run(_enter_argv(emu, n, cmd), stdout=fh, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=_child_env(emu, n),
                                            timeout=timeout).returncode
                    except subprocess.TimeoutExpired:
                        rc = -1
                if rc != 0 or not out.exists():
                    tail = log.read_text(errors="replace")[-1500:]
                    raise EmulationError(f"profiling device {n} failed (exit {rc}):\n{tail}", where=f"device {n}",
                                         fix="see the probe's log above")
                probes[n] = json.loads(out.read_text())
            limitations = list(emu.limitations)
            active = emu.active
    finally:
        for proc in echoes:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
                if proc.stdout is not None:
                    proc.stdout.close()
        if own:

            shutil.rmtree(wd, ignore_errors=True)
    measured = with_read_ahead(measured_cluster(cluster, model, probes, emulated=active), checkpoint)
    return ClusterProfile(measured, probes, active, limitations, time.perf_counter() - t0)


def effective_rates(model: ModelSpec, rt: dict[str, Any], kv_copy: float, gemm_flops: float) -> dict[str, float]:
    """Effective rates of the runtime's kernels on one device, solved from the runtime probe in
    the cost model's basis, t(T) = T f / s_cpu + T kv_copy + (b + kv) / bw, at the probed shapes:
    XLA runs one token as a matrix-vector product (`ram_bw`) and several as a matrix-matrix one
    (`gemm_bw`, with the FLOPS `cpu_flops` from the slope between its two probed shapes), so the
    simulator reproduces every probed shape."""

    rm = runtime_model(model)
    toks = sorted(int(t) for t in rt["tokens"])
    unit = DeviceSpec(name="unit", os="linux", cores=1, ram_total=GiB, ram_avail=GiB, ram_bw=1.0,
                      cpu_flops={"f32": 1.0}, disk_seq=1.0, kv_copy=0.0)
    tm = DeviceTiming(unit, rm)

    def flops(t: int) -> float:  # FLOPs of one layer for t tokens (unit rate: seconds = FLOPs)
        return tm._flop_time({"f32": 1.0}, min(int(rt["tokens"][str(t)]["span"]), 256), t)

    def layer(t: int) -> float:
        return float(rt["tokens"][str(t)]["layer_s"])

    span = int(rt["tokens"][str(toks[0])]["span"])
    byt = rm.layer_bytes + rm.kv_bytes_per_token() * span
    multi = [t for t in toks if t > 1]
    s = gemm_flops
    if len(multi) >= 2:
        a, b = multi[0], multi[-1]
        slope = (layer(b) - layer(a) - (b - a) * kv_copy) / max(flops(b) - flops(a), 1e-30)
        if slope > 0:
            s = 1.0 / slope  # FLOP/s of the matrix-matrix kernel

    def bw(t: int) -> float:
        mem_t = layer(t) - flops(t) / s - t * kv_copy
        return byt / max(mem_t, 0.05 * layer(t))  # compute-bound (tiny models): floor the memory share

    t1 = toks[0]
    alloc = float(rt["kv_alloc_bytes"]) / rt["kv_alloc_s"] if rt.get("kv_alloc_s") else 0.0
    return {"cpu_flops": s, "ram_bw": bw(t1), "gemm_bw": bw(multi[0]) if multi else 0.0,
            "gemm_bw_rows": {str(t): bw(t) for t in multi},
            "call_overhead": float(rt["tokens"][str(t1)]["call_s"]), "alloc_bw": alloc}


def _basis(rt: dict[str, Any]) -> str:
    if rt.get("basis") == "cpu":
        return (f"the process's CPU time / its CPU share {float(rt.get('cpu_share', 1.0)):.2f}: the device's time at "
                f"the quota's average rate, unaffected by the host's other work")
    return "wall time of back-to-back calls"


def measured_cluster(cluster: ClusterSpec, model: ModelSpec, probes: dict[str, dict[str, Any]], *,
                     emulated: bool) -> ClusterSpec:
    """The cluster as profiled: each device's figures from its probe (with provenance in
    `sources`), the network from the link probes (switched: the emulation shapes every pair on
    its own), the emulation limits kept so the run applies the same ones."""

    devs = []
    for d in cluster.devices:
        pr = probes[d.name]
        prof = pr["profile"]
        base = device_from_toml(prof["device"], f"probe of {d.name}")
        meas = prof["measurements"]
        gemm = meas["gemm"]["value"] if "gemm" in meas else base.cpu_flops["f32"]
        rates = effective_rates(model, pr["runtime"], base.kv_copy, gemm)
        mem = pr["memory"]
        ram_total = float(mem.get("limit", mem["ram_total"]))
        ram_avail = min(float(mem["ram_avail"]), ram_total)
        src = dict(base.sources)
        disk_seq = base.disk_seq
        if "disk" in pr:  # the sustained rate (the quick profile's short reads include the burst)
            dk = pr["disk"]
            disk_seq = float(dk["rate"])
            src["disk_seq_gbs"] = (f"sustained: slope of 1.2 s of back-to-back 1 MiB O_DIRECT reads after their "
                                   f"first 0.4 s ({', '.join(f'{x / MB:.0f}' for x in dk['rates'])} MB/s); the "
                                   f"quick profile's {base.disk_seq / MB:.0f} MB/s includes a slice's allowance")
            src["disk_burst_mib"] = (f"a rate limiter's slice allowance: bytes read at the disk's own speed after an "
                                     f"idle spell before the first stall (slice {dk['expiry'] * 1e3:.0f} ms); 0 = none")
            src["disk_peak_gbs"] = "rate of the reads within the slice allowance (the disk's own speed)"
        rt1 = pr["runtime"]["tokens"]
        probed = ", ".join(f"T={t}: {v['layer_s'] * 1e3:.2f} ms/layer" for t, v in rt1.items())
        src.update({
            "ram_avail_gib": (f"measured inside the device: its memory cgroup limited to the probe's footprint "
                              f"({mem.get('footprint', 0) / MiB:.0f} MiB: Python + JAX, as a worker) + memory_mib, "
                              f"then {mem['how']}") if "footprint" in mem else mem["how"],
            "ram_bw_gbs": (f"effective for the runtime's kernels: solved from primasim.runtime.model.run_layers timings inside "
                           f"the device ({probed}; {_basis(pr['runtime'])}); "
                           f"STREAM-like read {base.ram_bw / GB:.2f} GB/s"),
            "gemm_bw_gbs": "effective for the runtime's matrix-matrix kernel (several tokens per call), same solve",
            "gemm_bw_rows_gbs": "the same per probed number of rows (tokens per call; batched decode runs 2-8)",
            "cpu_gflops": (f"effective for the runtime's kernels (same solve); block GEMM at 128 tokens "
                           f"{gemm / 1e9:.1f} GFLOPS"),
            "call_overhead_ms": (f"runtime probe: intercept of a line through one call's time over windows of "
                                 f"1-{pr['runtime'].get('layers', 4)} layers ({_basis(pr['runtime'])})"),
            "alloc_gbs": "runtime probe: primasim.runtime.model.init_kv of the probe's layers (first-touch of fresh memory)",
        })
        devs.append(dataclasses.replace(
            d, cores=base.cores, ram_total=ram_total, ram_avail=ram_avail, ram_bw=rates["ram_bw"],
            cpu_flops={"f32": rates["cpu_flops"]}, disk_seq=disk_seq, disk_rnd=base.disk_rnd,
            disk_burst=float(pr["disk"]["burst"]) if "disk" in pr else 0.0,
            disk_peak=float(pr["disk"]["peak"]) if "disk" in pr else 0.0,
            kv_copy=base.kv_copy, call_overhead=rates["call_overhead"], alloc_bw=rates["alloc_bw"],
            gemm_bw=rates["gemm_bw"], gemm_bw_rows=rates["gemm_bw_rows"],
            swap_total=base.swap_total,
            swap_avail=base.swap_avail, hardware=f"emulated{'' if emulated else ' (degraded: no limits)'}: "
            f"{d.hardware or d.name}", sources=src))
    links = []
    bws = []
    for a in cluster.names:
        for b, lk in probes[a].get("links", {}).items():
            emu_bw, emu_lat = cluster.network.link(a, b)
            # the emulation's shaper (tc tbf) lets a bucket through at once after an idle spell:
            # a configured figure, not a measured one (the probe measures the sustained rate)
            burst = float(tbf_burst(emu_bw)) if emulated else 0.0
            links.append(LinkSpec(a, b, float(lk["bandwidth"]), emu_lat + float(lk["latency_idle"]), burst))
            bws.append(float(lk["bandwidth"]))
    net = cluster.network
    src = {"bandwidth_mbps": "measured per pair: primasim.runtime.wire over zmq through the emulated link (tbf)",
           "latency_ms": "per pair: the latency the runtime adds in user space (the cluster file's) + the "
                         "measured one-way time of an empty message to an idle peer",
           "kind": "switched: the emulation shapes every device pair on its own link",
           "burst_kb": "emulation: the tc tbf bucket of each link (primasim.runtime.emulate.tbf_burst), not measured"}
    network = NetworkSpec(kind="switched", bandwidth=statistics.median(bws) if bws else net.bandwidth,
                          latency=net.latency, jitter=net.jitter, links=tuple(links), sources=src, contention="pair")
    return ClusterSpec(f"{cluster.name}-profiled", tuple(devs), network, cluster.head,
                       f"{cluster.description} (profiled by primasim validate)", cluster.path)
