"""`primasim validate`: the loop the toolkit exists for, on one host.

    profile each emulated device inside its limits -> plan (Halda) -> simulate -> run -> compare

1. **Profile** (`profile_cluster`): every device of an emulated cluster gets its cgroups and network
   namespace (primasim.runtime.emulate), and `python -m primasim.loop.validate probe` runs inside them:
   - prima.cpp's figures with `primasim.profile.profiler.run_profile` (disk under the blkio throttle, RAM
     bandwidth and GEMM under the CPU quota, KV-copy time);
   - available memory with the runtime's semantics: the device's memory cgroup limited to the
     probe's own footprint (Python + JAX, like a worker's) + `memory_mib`, then read with the
     profiler's prima.cpp formula (limit - usage + page cache) -- what a worker can give the model;
   - the runtime's own kernels (`runtime_probe`): `primasim.runtime.model.run_layers` on the checkpoint's
     memory-mapped layers, one-layer calls and a four-layer window, at one token (decode) and at the
     prompt's length (prefill), cycling through layers that do not fit the LLC. That gives the
     per-call cost (dispatch + Python + result copy) and the per-layer time of each shape;
     effective RAM bandwidth and FLOPS are solved from them in the cost model's own basis
     (`t_layer(T) = T f / s_cpu + T kv_copy + (b + kv) / T_cpu`), so the simulator reproduces the
     probe exactly at both shapes;
   - page-fault streaming: reading a dropped part of the checkpoint through the mapping, as a
     worker short of memory streams its layers;
   - links: the runtime's wire format over zmq to an echo peer in every other device's namespace
     (through the tbf shaping): bandwidth, and one-way latency with an *idle* receiver (the peer
     sleeps between messages, as a ring device does while the others compute).
2. **Plan** with Halda (`make_plan("prima")`) on the profiled cluster, with the runtime's memory
   accounting (`runtime_model`: f32 KV cache, the worker's small activation reserve).
3. **Simulate** with `SimConfig(runtime=True)`: the simulator's model of primasim's runtime
   (primasim/sim/_runtime.py: per-layer streaming of what does not fit, prefetch of the next
   layer's streamed part, per-call costs), cold start as the runtime does.
4. **Run** the same plan with the runtime (`primasim.runtime.head.run_plan`) on the emulated cluster.
5. **Compare**: TPOT, TTFT, throughput, disk bytes and memory per device, errors in %, a figure,
   both timelines as Chrome traces, a JSON summary.

Without root the devices are plain processes (no limits): it still profiles, plans, simulates,
runs and compares, and says that it ran degraded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from primasim.core.cluster import ClusterSpec, LinkSpec, NetworkSpec
from primasim.core.device import DeviceSpec
from primasim.core.errors import CheckpointError, EmulationError, PrimasimError, SpecError
from primasim.core.io import atomic_open, atomic_savefig, atomic_write_text
from primasim.core.model import ModelSpec
from primasim.core.runtime_facts import residency_mode
from primasim.core.units import GB, MB, MS, GiB, MiB

Progress = Callable[[str, float], None]  # (what, fraction of the step done)

# The worker's own reserve for activations and the allocator (runtime/worker/session.py _anon_reserve):
# what the runtime allocates besides weights and KV cache, in place of llama.cpp's compute buffer.
RUNTIME_BUFFER_BYTES = 8 * MiB
PROBE_LAYERS = 4  # layers the runtime probe maps (4 x 61 MB for llama-mini-300m: far past the LLC)
PROBE_ROWS = (1, 2, 4, 8)  # tokens per call the runtime probe times (decode; batched decode up to 8 rows)
ECHO_PORT = 5599


def runtime_model(model: ModelSpec) -> ModelSpec:
    """`model` as primasim's runtime holds it: the KV cache in f32 and, instead of llama.cpp's
    compute buffer, the worker's activation reserve. Plans and simulations that are compared with
    the runtime account memory with this spec."""
    return dataclasses.replace(model, kv_dtype="f32", buffer_bytes=float(RUNTIME_BUFFER_BYTES))


# ============================================================================ in-device probes
def _mean_call(fn: Callable[[], Any], min_seconds: float, min_calls: int = 4) -> float:
    """Mean wall time of `fn` over at least `min_seconds` (and `min_calls` calls): a mean over
    several CFS periods, so a CPU quota shows as a slower CPU, not as bursts and pauses."""
    n = 0
    t0 = time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds and n >= min_calls:
            return dt / n


def runtime_probe(checkpoint: str | Path, *, tokens: tuple[int, ...] = (1, 2, 16), max_seq: int = 1024,
                  pos: int = 16, layers: int = PROBE_LAYERS, rounds: int = 3, min_seconds: float = 0.15,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time the runtime's own layer calls on this device (run it inside the device's limits).

    For each T in `tokens`: one-layer calls cycling through `layers` mapped layers, and a window of
    all of them in one call; rounds alternate the two and keep the median of the round means.
    Returns per T: `single_s` (one call of one layer), `window_s` (one call of `layers` layers),
    `layer_s` = (window - single) / (layers - 1) and `call_s` = single - layer_s; plus the head's
    per-token work (`head_s`: embed + output layer + argmax, three calls) and the span attended."""
    import jax.numpy as jnp
    import numpy as np

    from primasim.runtime import model as md
    from primasim.runtime.checkpoint import open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    spec = ckpt.spec
    n = max(2, min(layers, spec.n_layers))
    ids = list(range(n))
    params = md.load_params(ckpt, ids, embed=True, head=True)
    kv: Any = md.init_kv(spec, ids, max_seq)
    out: dict[str, Any] = {"layers": n, "max_seq": max_seq, "pos": pos, "rounds": rounds,
                           "min_seconds": min_seconds, "tokens": {}}

    def call(x: Any, p: int, lay: list[int]) -> Any:
        nonlocal kv
        y, kv = md.run_layers(params, kv, x, p, lay)
        return np.asarray(y)  # the worker copies every result to the host (Stage.run)

    for T in tokens:
        if progress:
            progress(f"runtime kernels: {T} token(s) per call")
        x = np.zeros((1, T, spec.hidden), np.float32)
        p = max(0, min(pos, max_seq - T))
        for i in ids:  # compile + fault the weights in
            call(x, p, [i])
        call(x, p, ids)
        cyc = itertools.cycle([[i] for i in ids])
        single = functools.partial(lambda x, p, it: call(x, p, next(it)), x, p, cyc)
        window = functools.partial(call, x, p, ids)
        singles, windows = [], []
        for _ in range(rounds):
            singles.append(_mean_call(single, min_seconds, min_calls=2 * n))
            windows.append(_mean_call(window, min_seconds))
        s1, sw = statistics.median(singles), statistics.median(windows)
        layer_s = max(1e-6, (sw - s1) / (n - 1))
        out["tokens"][str(T)] = {"single_s": s1, "window_s": sw, "layer_s": layer_s, "call_s": max(0.0, s1 - layer_s),
                                 "singles": singles, "windows": windows,
                                 "span": md.attention_span(p + T, max_seq, 1)}
    # a sequence's KV cache is allocated on its first token, in memory the process has not used
    # yet (page faults + zero-fill), with a shape the warm-up compiled: every round allocates the
    # run's shape and keeps it, so the allocator cannot hand back freed (already touched) memory
    keep = [md.init_kv(spec, [ids[0]], max_seq)]  # compiles the shape
    allocs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fresh = md.init_kv(spec, ids, max_seq)
        for kc, vc in fresh.layers.values():
            kc.block_until_ready()
            vc.block_until_ready()
        allocs.append(time.perf_counter() - t0)
        keep.append(fresh)
    out["kv_alloc_s"] = statistics.median(allocs)
    out["kv_alloc_bytes"] = float(2 * n * (max_seq + 1) * spec.n_kv_heads * spec.head_dim * 4)
    del keep
    # the head's work per token besides the blocks: embed the sampled token, output layer, argmax
    xe = np.zeros((1, 1, spec.hidden), np.float32)

    def head() -> None:
        md.embed(params, [[1]]).block_until_ready()
        lg = np.asarray(md.logits(params, jnp.asarray(xe)))
        int(lg.argmax())

    head()
    out["head_s"] = statistics.median(_mean_call(head, min_seconds) for _ in range(rounds))
    # streaming through the mapping: what a worker short of memory does for the part it evicts
    out["fault"] = fault_probe(ckpt, layer=n)
    return out


def fault_probe(ckpt: Any, *, layer: int, nbytes: int = 24 * MiB) -> dict[str, float]:
    """Read `nbytes` of a dropped layer by touching the mapped pages (demand faults), and the same
    after madvise(WILLNEED) (prefetch); bytes/s of each, under this process's blkio throttle."""
    import numpy as np

    from primasim.runtime.checkpoint import evict, prefetch
    from primasim.runtime.pages import drop_pages, mapped_spans, split_ranges, touch_pages

    layer = min(layer, ckpt.spec.n_layers - 1)
    ranges, _ = split_ranges(ckpt.layer_ranges([layer]), nbytes)
    with contextlib.suppress(Exception):
        ckpt.tensor(ckpt.layer_names(layer)[0])  # make sure the file is mapped in this process
    drop_pages(ranges)
    evict(ranges)
    t0 = time.perf_counter()
    got = touch_pages(ranges)
    fault_s = time.perf_counter() - t0
    drop_pages(ranges, mapped_spans(ranges))
    evict(ranges)
    t0 = time.perf_counter()
    prefetch(ranges)
    touch_pages(ranges)
    pre_s = time.perf_counter() - t0
    drop_pages(ranges)
    del np
    return {"bytes": float(got), "fault_bps": got / fault_s if fault_s > 0 else 0.0,
            "prefetch_bps": got / pre_s if pre_s > 0 else 0.0}


def burst_probe(*, block: int = MiB, seconds: float = 1.2, idle: float = 0.3, repeats: int = 2) -> dict[str, Any]:
    """The disk's sustained read rate and a rate limiter's slice allowance, with O_DIRECT reads of
    `block` bytes (the page cache out of the way).

    A blkio throttle (block/blk-throttle.c) grants `rate x slice` bytes per slice (100 ms) and
    rounds the elapsed time *up* to whole slices: after an idle spell, a slice's worth of reads
    goes at the disk's own speed, then the reader waits for the next slice. Short probes therefore
    see a fast disk; only a reader that keeps going for many slices sees the throttle. Measured:
    after `idle` s, `seconds` of back-to-back reads with a timestamp per read; the sustained rate
    is the slope after the first 0.4 s, the allowance (`burst`) the bytes read before the first
    stall (a read slower than 8x the median of the first ones), `peak` their rate and `expiry`
    (the slice) = burst / rate. An unthrottled disk never stalls: burst 0, peak = rate."""
    import numpy as np

    from primasim.core.paths import cache_dir
    from primasim.profile.profiler import _aligned, _open_direct, disk_probe_file

    path = disk_probe_file(cache_dir() / "profile", 256 * MiB)
    size = path.stat().st_size
    fd, direct = _open_direct(str(path), os.O_RDONLY)
    buf = _aligned(block)
    off = 0
    runs: list[dict[str, float]] = []
    try:
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for _ in range(repeats):
            time.sleep(idle)  # let the limiter's slice expire
            stamps = []
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                os.preadv(fd, [buf], off)
                off = off + block if off + 2 * block <= size else 0
                stamps.append(time.perf_counter() - t0)
            t = np.asarray(stamps)
            dt = np.diff(np.concatenate([[0.0], t]))
            tail = t > 0.4
            rate = block * (tail.sum() - 1) / (t[tail][-1] - t[tail][0]) if tail.sum() > 2 else block * len(t) / t[-1]
            ref = float(np.median(dt[: max(3, min(8, len(dt) // 4))]))
            slow = np.nonzero(dt > max(8 * ref, 2e-3))[0]
            n_fast = int(slow[0]) if len(slow) else len(dt)
            fast_bytes = n_fast * block
            if n_fast >= len(dt) or fast_bytes < 0.02 * rate:  # no stall: no limiter (or too small to matter)
                runs.append({"rate": float(rate), "burst": 0.0, "peak": float(rate)})
            else:
                runs.append({"rate": float(rate), "burst": float(fast_bytes),
                             "peak": float(max(rate, fast_bytes / max(t[n_fast - 1], 1e-6)))})
    finally:
        os.close(fd)
    rate = float(np.median([r["rate"] for r in runs]))
    burst = float(np.median([r["burst"] for r in runs]))
    peak = float(np.median([r["peak"] for r in runs])) if burst > 0 else rate
    return {"rate": rate, "expiry": burst / rate if rate > 0 else 0.0, "burst": burst, "peak": max(peak, rate),
            "rates": [r["rate"] for r in runs], "runs": runs, "direct": direct}


def idle_hop(addr: str, *, idle: float = 0.01, pings: int = 12, timeout: float = 3.0) -> list[float]:
    """One-way times (RTT / 2) of empty messages to an echo peer that sleeps `idle` s between
    them: the hop of a ring device that waited while the others computed (the wake-up included)."""
    import zmq

    from primasim.runtime import wire

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    out = []
    try:
        sock.connect(addr)
        for i in range(pings + 1):
            time.sleep(idle)
            t0 = time.perf_counter()
            wire.send(sock, wire.MsgType.PING, crc=False)
            if wire.recv(sock, timeout, peer=addr) is None:
                raise EmulationError(f"no answer from the echo peer {addr}", where="link probe",
                                     fix="check the emulated network")
            if i:
                out.append((time.perf_counter() - t0) / 2)
    finally:
        sock.close(0)
        ctx.term()
    return out


def _set_own_memory_limit(extra: float) -> dict[str, float]:
    """Inside an emulated device: limit our memory cgroup to what it holds now (this process:
    Python + JAX + the runtime's modules, like a worker after start-up) + `extra` bytes."""
    from primasim.runtime._measure import device_cgroup

    g = device_cgroup()  # an emulated device's own memory cgroup (v1 or v2), never a shared one
    if g is None or os.geteuid() != 0:
        return {}
    usage = g.memory_current()
    limit = int(usage + extra)
    try:
        g.set_memory_max(limit)
    except OSError:
        return {}
    return {"footprint": float(usage), "limit": float(limit)}


def probe_main(argv: list[str]) -> int:
    """`python -m primasim.loop.validate probe ...`: profile the device this process runs in."""
    p = argparse.ArgumentParser(prog="python -m primasim.loop.validate probe")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--name", required=True)
    p.add_argument("--checkpoint", required=True, help="weights (the runtime probe maps them)")
    p.add_argument("--model", default="", help="catalogue name whose block shapes the profiler uses")
    p.add_argument("--budget", type=float, default=0.0, help="bytes on top of the footprint (memory_mib)")
    p.add_argument("--max-seq", type=int, default=1024)
    p.add_argument("--tokens", default="1,2,16", help="tokens per call to probe (decode; the matrix-matrix "
                   "kernel at 2 and at the prompt's length)")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=ADDR", help="echo peers to measure")
    p.add_argument("--full", action="store_true", help="the full profile instead of --quick")
    a = p.parse_args(argv)
    import jax  # noqa: F401 - the footprint a worker has before its limit is set

    import primasim.runtime.model  # noqa: F401
    import primasim.runtime.worker  # noqa: F401
    from primasim.profile.profiler import (
        ProfileConfig,
        measure_link,
        memory_info,
        read_limits,
        run_profile,
    )

    t_start = time.perf_counter()
    mem_probe: dict[str, Any] = {}
    if a.budget > 0:
        mem_probe = _set_own_memory_limit(a.budget)
    lim = read_limits()
    mem = memory_info(lim)
    mem_probe.update({"ram_avail": mem.available, "ram_total": mem.total, "how": mem.how,
                      "limits": lim.describe()})
    if "footprint" in mem_probe:
        # the probes below need more room than a phone-sized budget: the limit bounded the
        # available-memory reading only (rates come from the CPU quota and the disk throttle)
        _set_own_memory_limit(max(a.budget, 1.5 * GiB))
    # the disk probe's file lives in the cache directory, on the disk that holds the checkpoints
    cfg = ProfileConfig(name=a.name, model=a.model or "llama-mini-300m", quick=not a.full,
                        parts=("compute", "memory", "disk", "kv"),
                        command=f"python -m primasim.loop.validate probe {' '.join(shlex.quote(x) for x in argv)}")
    prof = run_profile(cfg)
    tokens = tuple(int(t) for t in a.tokens.split(",") if t.strip())
    burst = burst_probe()
    rt = runtime_probe(a.checkpoint, tokens=tokens, max_seq=a.max_seq,
                       min_seconds=max(0.15, 3 * (lim.cpu_period or 0.0)))
    links: dict[str, Any] = {}
    for item in a.peer:
        peer, _, addr = item.partition("=")
        lk = measure_link(addr, quick=True)
        hops = idle_hop(addr)
        links[peer] = {"addr": addr, "bandwidth": lk.bandwidth.value, "latency_busy": lk.latency.value,
                       "latency_idle": statistics.median(hops), "idle_samples": hops,
                       "payload": lk.payload, "bandwidth_samples": list(lk.bandwidth.samples)}
    res = {"name": a.name, "profile": prof.to_json(), "memory": mem_probe, "runtime": rt, "disk": burst,
           "links": links,
           "seconds": time.perf_counter() - t_start}
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, a.out)
    return 0


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


def profile_cluster(cluster: ClusterSpec, checkpoint: str | Path, model: ModelSpec, *, emulate: bool = True,
                    prompt_tokens: int = 16, max_seq: int = 1024, workdir: Path | None = None,
                    progress: Progress | None = None, timeout: float = 240.0) -> ClusterProfile:
    """Profile every device of `cluster` inside its emulated limits (one at a time, so they do not
    compete for the host's CPUs), and every pair of devices over the emulated network; return the
    measured cluster (`measured_cluster`)."""
    import tempfile

    from primasim.runtime.emulate import EmulatedCluster
    from primasim.runtime.head import checkpoint_files, open_weights

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
                out = wd / f"probe-{n}.json"
                cmd = [sys.executable, "-m", "primasim.loop.validate", "probe", "--out", str(out), "--name", n,
                       "--checkpoint", str(Path(ckpt.path).resolve()), "--model", model.name,
                       "--budget", str(budget), "--max-seq", str(max_seq),
                       "--tokens", ",".join(str(t) for t in sorted({*PROBE_ROWS, max(2, prompt_tokens)}))]
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
            import shutil

            shutil.rmtree(wd, ignore_errors=True)
    measured = measured_cluster(cluster, model, probes, emulated=active)
    return ClusterProfile(measured, probes, active, limitations, time.perf_counter() - t0)


def effective_rates(model: ModelSpec, rt: dict[str, Any], kv_copy: float, gemm_flops: float) -> dict[str, float]:
    """Effective rates of the runtime's kernels on one device, solved from the runtime probe in
    the cost model's basis, t(T) = T f / s_cpu + T kv_copy + (b + kv) / bw, at the probed shapes:
    XLA runs one token as a matrix-vector product (`ram_bw`) and several as a matrix-matrix one
    (`gemm_bw`, with the FLOPS `cpu_flops` from the slope between its two probed shapes), so the
    simulator reproduces every probed shape."""
    from primasim.sim._timing import DeviceTiming

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


def measured_cluster(cluster: ClusterSpec, model: ModelSpec, probes: dict[str, dict[str, Any]], *,
                     emulated: bool) -> ClusterSpec:
    """The cluster as profiled: each device's figures from its probe (with provenance in
    `sources`), the network from the link probes (switched: the emulation shapes every pair on
    its own), the emulation limits kept so the run applies the same ones."""
    from primasim.core.device import device_from_toml
    from primasim.runtime.emulate import tbf_burst

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
                           f"the device ({probed}); "
                           f"STREAM-like read {base.ram_bw / GB:.2f} GB/s"),
            "gemm_bw_gbs": "effective for the runtime's matrix-matrix kernel (several tokens per call), same solve",
            "gemm_bw_rows_gbs": "the same per probed number of rows (tokens per call; batched decode runs 2-8)",
            "cpu_gflops": (f"effective for the runtime's kernels (same solve); block GEMM at 128 tokens "
                           f"{gemm / 1e9:.1f} GFLOPS"),
            "call_overhead_ms": "runtime probe: one-layer call minus the per-layer slope of a 4-layer window",
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



# ============================================================================ host load
def _proc_cpu(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds) of a process from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    f = raw[raw.rindex(")") + 2:].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(f[1]), (int(f[11]) + int(f[12])) / tick


def _host_busy() -> float:
    """CPU seconds all CPUs of the host spent busy since boot (/proc/stat)."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    v = [int(x) for x in f]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    steal = v[7] if len(v) > 7 else 0
    return (sum(v[:8]) - idle - steal) / os.sysconf("SC_CLK_TCK")


def _tree_cpu(root: int) -> float:
    """CPU seconds used so far by `root` and all its descendants (alive ones)."""
    info: dict[int, tuple[int, float]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                info[int(d.name)] = _proc_cpu(int(d.name))
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in info.items():
        kids.setdefault(ppid, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        p = stack.pop()
        if p in info:
            total += info[p][1]
        stack.extend(kids.get(p, []))
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


# ============================================================================ predict, run, compare
def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    """A deterministic prompt of n token ids (random weights have no tokenizer worth using)."""
    import numpy as np

    return [int(x) for x in np.random.default_rng(seed).integers(1, vocab, size=n)]


def predict(plan: Any, model: ModelSpec, cluster: ClusterSpec, *, tokens: int, prompt_tokens: int,
            seed: int = 0, requests: int | None = None, batch: int | None = None, **fidelity: Any) -> Any:
    """The simulator's prediction of `plan` as primasim's runtime executes it (`fidelity`: SimConfig
    switches such as cpu_quota_bursts=False, for ablations)."""
    from primasim.sim import SimConfig, simulate

    cfg = SimConfig(runtime=True, tokens=tokens, prompt_tokens=prompt_tokens, seed=seed, warmup=False,
                    requests=requests or 100, batch=batch, **fidelity)
    return simulate(plan.system, runtime_model(model), cluster, plan=plan, config=cfg)


def measure(plan: Any, weights: Any, cluster: ClusterSpec, *, tokens: int, prompt: list[int], seed: int = 0,
            emulate: bool = True, requests: int | None = None, timeout: float = 300.0,
            residency: str = "planned") -> tuple[Any, HostLoad]:
    """Run `plan` with the runtime on the (emulated) cluster; the result and the host's load."""
    from primasim.runtime.head import RunOptions, run_plan

    opts = RunOptions(max_new_tokens=tokens, seed=seed, emulate=emulate, n_requests=requests,
                      token_timeout=timeout, residency=residency)
    load = HostLoad().start()
    res = run_plan(plan, weights, cluster, [prompt], opts)
    load.stop()
    return res, load


@dataclass
class Row:
    """One compared quantity: predicted vs measured (SI units; `unit` for display)."""

    metric: str
    device: str
    predicted: float
    measured: float
    unit: str
    scale: float = 1.0  # SI value / scale = display value

    @property
    def error_pct(self) -> float:
        """(predicted - measured) / measured in %; NaN for quantities that are themselves shares
        (memory pressure: a relative error of a few-percent share says little), see `error_pp`."""
        if (self.unit == "%" or not (math.isfinite(self.predicted) and math.isfinite(self.measured))
                or self.measured == 0):
            return float("nan")
        return 100.0 * (self.predicted - self.measured) / abs(self.measured)

    @property
    def error_pp(self) -> float:
        """predicted - measured in percentage points (shares only)."""
        return (self.predicted - self.measured) / self.scale if self.unit == "%" else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "device": self.device, "unit": self.unit,
                "predicted": self.predicted / self.scale, "measured": self.measured / self.scale,
                "error_pct": self.error_pct, "error_pp": self.error_pp}


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


def compare(sim: Any, run: Any, plan: Any, cluster: ClusterSpec) -> list[Row]:
    """Predicted vs measured: TPOT (mean, P50, P90), TTFT, throughput, and per device the disk bytes
    read per token, the weights kept resident, the peak memory the run added and memory pressure."""
    from primasim.core.trace import metrics

    ps, ms = sim.metrics, metrics(run.trace)
    rows = [Row("TPOT", "", ps.tpot_ms * MS, ms.tpot_ms * MS, "ms", MS),
            Row("TPOT P50", "", ps.tpot_p50_ms * MS, ms.tpot_p50_ms * MS, "ms", MS),
            Row("TPOT P90", "", ps.tpot_p90_ms * MS, ms.tpot_p90_ms * MS, "ms", MS),
            Row("TTFT", "", ps.ttft_ms * MS, ms.ttft_ms * MS, "ms", MS),
            Row("throughput", "", ps.throughput_tok_s, ms.throughput_tok_s, "tok/s")]
    n_tok = max(1, ms.n_tokens)
    p_tok = max(1, ps.n_tokens)
    res = sim.extra.get("residency", {})
    for d in plan.devices:
        if d.layers == 0 and d.name != plan.devices[0].name:
            continue
        n = d.name
        pst = sim.trace.device_stats.get(n, {})
        mst = run.trace.device_stats.get(n, {})
        rows.append(Row("disk read per token", n, pst.get("disk_read_bytes", 0.0) / p_tok,
                        mst.get("disk_read_bytes", 0.0) / n_tok, "MB", MB))
        if n in res:
            rows.append(Row("resident weights", n, float(res[n]["resident_bytes"]),
                            _nan(mst.get("load_resident_bytes", mst.get("resident_weight_bytes"))), "MB", MB))
        if "cg_mem_max_usage" in mst and "cg_mem_limit" in mst and cluster.device(n).emulate:
            # the run's peak in the device's memory cgroup, above the worker's own footprint
            foot = mst["cg_mem_limit"] - cluster.device(n).emulate.memory_limit  # type: ignore[union-attr]
            pred_peak = float(res.get(n, {}).get("resident_bytes", 0.0)) + float(pst.get("anon_bytes", 0.0))
            if res.get(n, {}).get("mode") == "planned":
                lb = sim.plan.n_layers and float(sim.trace.device_stats.get(n, {}).get("streamed_bytes_per_pass", 0.0))
                lay = [s for s in plan.segments() if s.device == n]
                per_layer = lb / max(1, sum(s.n for s in lay))
                pred_peak += (2 if res[n].get("stream_prefetch") else 1) * per_layer
            rows.append(Row("peak memory", n, pred_peak, mst["cg_mem_max_usage"] - foot, "MB", MB))
        pp, mp = ps.memory_pressure.get(n), ms.memory_pressure.get(n)
        if pp is not None and mp is not None:
            rows.append(Row("memory pressure", n, 100 * pp, 100 * mp, "%"))
    return rows


# ============================================================================ the whole loop
@dataclass(frozen=True)
class ValidateConfig:
    """What `primasim validate` runs (embedded defaults: the README's first command)."""

    cluster: str = field(default="home-emu", metadata={"help": "emulated cluster (name or TOML path)"})
    model: str = field(default="llama-mini-300m", metadata={"help": "catalogue model; random weights cached"})
    quant: str = field(default="f32", metadata={"help": "random weights: f32, f16 (safetensors) or a GGUF "
                                                    "quantisation the writer has (q8_0, q4k = Q4_K_M)"})
    memory_scale: float = field(default=0.0, metadata={
        "help": "multiply every emulated device's memory by this (0 = the weight file's size over the f32 "
                "model's: a quantised model keeps the regime -- which devices stream -- of the f32 one)"})
    residency: str = field(default="planned", metadata={
        "help": "how a device short of memory holds its weights, run and simulated alike: planned (the worker "
                "keeps part of every layer, streams the rest) or lru (mmap + prefetch, the kernel's LRU decides)"})
    system: str = field(default="prima", metadata={"help": "planner: prima (Halda) or another system"})
    tokens: int = field(default=32, metadata={"help": "tokens generated"})
    prompt_tokens: int = field(default=16, metadata={"help": "prompt length"})
    n_ctx: int = field(default=1024, metadata={"help": "KV cache length the plan accounts for"})
    seed: int = field(default=0, metadata={"help": "prompt, sampling and jitter seed"})
    emulate: bool = field(default=True, metadata={"help": "emulate the devices' limits (root); else plain processes"})
    plan_options: tuple[tuple[str, Any], ...] = field(default=(), metadata={"help": "planner options"})
    out: str = field(default="", metadata={"help": "output directory (default runs/validate-<time>)"})
    timeout: float = field(default=300.0, metadata={"help": "s without progress before a run gives up"})


@dataclass
class ValidateResult:
    config: ValidateConfig
    profile: ClusterProfile
    plan: Any
    predicted: Any
    measured: Any
    rows: list[Row]
    out: Path
    host: HostLoad
    seconds: dict[str, float]
    notes: list[str]

    @property
    def degraded(self) -> bool:
        return not self.profile.emulated

    def row(self, metric: str, device: str = "") -> Row:
        return next(r for r in self.rows if r.metric == metric and r.device == device)

    def summary(self) -> dict[str, Any]:
        pj = self.predicted.to_json()
        mj = self.measured.to_json()
        return {
            "command": "primasim validate", "config": dataclasses.asdict(self.config),
            "degraded": self.degraded, "limitations": self.profile.limitations, "notes": self.notes,
            "model": self.config.model, "cluster": self.profile.cluster.to_toml(),
            "plan": self.plan.to_json(),
            "comparison": [r.to_json() for r in self.rows],
            "predicted": {k: pj.get(k) for k in ("tpot_ms", "tpot_p50_ms", "tpot_p90_ms", "ttft_ms",
                                                 "throughput_tok_s", "memory_pressure", "disk_read_bytes")},
            "measured": {k: mj.get(k) for k in ("tpot_ms", "tpot_p50_ms", "tpot_p90_ms", "ttft_ms",
                                                "throughput_tok_s", "memory_pressure", "disk_read_bytes",
                                                "token_ids", "emulation")},
            "host": {"other_processes_cpu_share": self.host.foreign_share, "load1": self.host.load1,
                     "cpus": len(os.sched_getaffinity(0))},
            "seconds": self.seconds,
            "files": {k: str(v) for k, v in self.files().items()},
        }

    def files(self) -> dict[str, Path]:
        return {"summary": self.out / "summary.json", "comparison": self.out / "comparison.csv",
                "figure": self.out / "validate.png", "predicted_trace": self.out / "predicted.trace.json",
                "measured_trace": self.out / "measured.trace.json", "cluster": self.out / "cluster-profiled.toml",
                "probes": self.out / "probes.json", "plan": self.out / "plan.json"}


def scale_memory(cluster: ClusterSpec, factor: float) -> ClusterSpec:
    """`cluster` with every emulated device's memory for the model (and its ram_avail) x `factor`."""
    devs = []
    for d in cluster.devices:
        if d.emulate is None:
            devs.append(d)
            continue
        em = dataclasses.replace(d.emulate, memory_limit=d.emulate.memory_limit * factor)
        devs.append(d.replace(emulate=em, ram_avail=d.ram_avail * factor))
    return dataclasses.replace(cluster, devices=tuple(devs), name=f"{cluster.name}-x{factor:.3g}")


def default_out() -> Path:
    return Path("runs") / f"validate-{time.strftime('%Y%m%d-%H%M%S')}"


def validate(cfg: ValidateConfig = ValidateConfig(), progress: Progress | None = None) -> ValidateResult:
    """Profile -> plan -> simulate -> run -> compare, writing everything into `cfg.out`."""
    from primasim.core.cluster import load_cluster
    from primasim.core.errors import PlanError
    from primasim.core.model import load_model
    from primasim.plan.planners import make_plan
    from primasim.runtime.head import cached_random_weights

    say = progress or (lambda _m, _f: None)
    secs: dict[str, float] = {}
    notes: list[str] = []
    out = Path(cfg.out) if cfg.out else default_out()
    _check_out(out)
    if cfg.tokens < 2 or cfg.prompt_tokens < 1:
        raise SpecError("validate needs at least 2 tokens and a prompt of at least 1", where="--tokens",
                        fix="e.g. --tokens 32 --prompt-tokens 16")
    cluster = load_cluster(cfg.cluster)
    if not any(d.emulate for d in cluster.devices):
        raise SpecError(f"cluster {cluster.name} has no emulated devices", where="--cluster",
                        fix="give a cluster whose devices have [devices.emulate] tables (e.g. home-emu)")
    if any(d.address for d in cluster.devices):
        raise SpecError(f"cluster {cluster.name} has remote devices", where="--cluster",
                        fix="validate emulates every device on this host; profile real devices with `primasim profile`")
    model = load_model(cfg.model, cfg.quant)
    try:
        residency_mode(cfg.residency)
    except ValueError as exc:
        raise SpecError(str(exc), where="--residency", fix="use --residency lru or --residency planned") from None
    scale = cfg.memory_scale or model.total_bytes / load_model(cfg.model, "f32").total_bytes
    if not 0 < scale <= 64:
        raise SpecError(f"memory scale {scale:g} out of range", where="--memory-scale", fix="use e.g. 0.2 or 1")
    if scale != 1.0:
        cluster = scale_memory(cluster, scale)
        notes.append(f"every device's memory scaled by {scale:.3g} (the {model.quant} file over the f32 model), so "
                     "each keeps the share of the model it has at f32")

    t = time.perf_counter()
    say("weights: random checkpoint (generated once, then cached)", 0.0)
    try:  # quantised random weights are GGUF files, as the papers' checkpoints
        weights = cached_random_weights(model, fmt="safetensors" if model.quant in ("f32", "f16") else "gguf")
    except CheckpointError as exc:
        raise SpecError(f"cannot write {model.quant} random weights: {exc.what}", where="--quant",
                        fix="use --quant f32, f16 or q8_0") from None
    secs["weights"] = time.perf_counter() - t

    t = time.perf_counter()
    prof = profile_cluster(cluster, weights, model, emulate=cfg.emulate, prompt_tokens=cfg.prompt_tokens,
                           max_seq=cfg.n_ctx, progress=lambda m, f: say(m, 0.05 + 0.55 * f))
    secs["profile"] = time.perf_counter() - t

    t = time.perf_counter()
    say("plan: Halda on the profiled cluster", 0.62)
    rmodel = runtime_model(model)
    outcome = make_plan(cfg.system, rmodel, prof.cluster, n_ctx=cfg.n_ctx, prompt_tokens=cfg.prompt_tokens,
                        **dict(cfg.plan_options))
    if not outcome.feasible or outcome.plan is None:
        raise PlanError(f"{cfg.system} cannot run {model.name} on the profiled {cluster.name}: {outcome.reason}",
                        where="validate", fix="give the emulated devices more memory or use a smaller model")
    plan = outcome.plan
    secs["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    say("simulate: the plan as the runtime executes it", 0.64)
    sim = predict(plan, model, prof.cluster, tokens=cfg.tokens, prompt_tokens=cfg.prompt_tokens, seed=cfg.seed,
                  residency=cfg.residency)
    if not sim.feasible:
        raise PlanError(f"the simulator cannot run the plan: {sim.reason}", where="validate", fix="see the reason")
    secs["simulate"] = time.perf_counter() - t

    t = time.perf_counter()
    say(f"run: {cfg.tokens} tokens on the emulated {cluster.name}", 0.66)
    run, host = measure(plan, weights, cluster, tokens=cfg.tokens,
                        prompt=prompt_ids(cfg.prompt_tokens, model.vocab, cfg.seed), seed=cfg.seed,
                        emulate=cfg.emulate, timeout=cfg.timeout, residency=cfg.residency)
    secs["run"] = time.perf_counter() - t
    if not prof.emulated:
        notes.append("degraded: not root, so the devices ran as plain processes without memory, CPU, disk or "
                     "link limits (profiled the same way); the comparison still holds for what ran")
    if host.foreign_share > 0.15:
        notes.append(f"other processes used {100 * host.foreign_share:.0f} % of the host's CPUs during the run; "
                     "the emulated devices share those CPUs, so measured times are slower than on a quiet host")

    t = time.perf_counter()
    say("compare: tables, figure, timelines", 0.95)
    rows = compare(sim, run, plan, cluster)
    res = ValidateResult(cfg, prof, plan, sim, run, rows, out, host, secs, notes)
    write_outputs(res)
    secs["compare"] = time.perf_counter() - t
    atomic_write_text(res.files()["summary"], json.dumps(res.summary(), indent=1, default=str) + "\n")
    say("done", 1.0)
    return res


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SpecError(f"cannot write there ({exc.strerror})", where=str(out), fix="give a writable --out DIR") from None


def write_outputs(res: ValidateResult) -> None:
    """CSV, figure, both timelines, the profiled cluster and the plan."""
    import csv

    f = res.files()
    with atomic_open(f["comparison"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["metric", "device", "unit", "predicted", "measured", "error_pct", "error_pp"])
        for r in res.rows:
            j = r.to_json()
            w.writerow([j["metric"], j["device"], j["unit"], f"{j['predicted']:.6g}", f"{j['measured']:.6g}",
                        f"{j['error_pct']:.2f}", f"{j['error_pp']:.2f}"])
    res.predicted.trace.save_chrome(f["predicted_trace"])
    res.measured.trace.save_chrome(f["measured_trace"])
    res.profile.cluster.save(f["cluster"])
    atomic_write_text(f["probes"], json.dumps(res.profile.probes, indent=1) + "\n")
    res.plan.save(f["plan"])
    plot(res, f["figure"])


def plot(res: ValidateResult, path: Path) -> None:
    """Four panels: headline metrics, per-token latency, per-device disk bytes and memory, and the
    timelines of one decode token, predicted above measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    # (a) headline metrics, normalised to the measurement
    heads = [r for r in res.rows if r.device == "" and math.isfinite(r.measured) and r.measured > 0]
    x = np.arange(len(heads))
    a = ax[0, 0]
    a.bar(x - 0.2, [r.predicted / r.measured for r in heads], 0.4, label="predicted / measured")
    a.axhline(1.0, color="k", lw=1)
    a.axhspan(0.95, 1.05, color="green", alpha=0.15, label="+/-5 %")
    for i, r in enumerate(heads):
        a.text(i - 0.2, r.predicted / r.measured + 0.02, f"{r.predicted / r.scale:.3g}\n{r.measured / r.scale:.3g}",
               ha="center", fontsize=7)
    a.set_xticks(x, [f"{r.metric}\n({r.unit})" for r in heads], fontsize=8)
    a.set_ylabel("predicted / measured")
    a.set_ylim(0, max(1.3, max((r.predicted / r.measured for r in heads), default=1) + 0.2))
    a.legend(fontsize=8)
    a.set_title("headline (labels: predicted over measured)")
    # (b) token times
    a = ax[0, 1]
    for tr, lab, st in ((res.predicted.trace, "predicted", "-"), (res.measured.trace, "measured", "--")):
        toks = sorted((t for t in tr.tokens if t.seq == 0), key=lambda t: t.index)
        if len(toks) > 1:
            gaps = np.diff([t.time for t in toks]) * 1e3
            a.plot(range(1, len(toks)), gaps, st, marker=".", label=f"{lab} (mean {gaps.mean():.1f} ms)")
    a.set_xlabel("token index")
    a.set_ylabel("time between tokens (ms)")
    a.legend(fontsize=8)
    a.set_title("per-token latency")
    # (c) per-device disk bytes per token and peak memory
    a = ax[1, 0]
    devs = [r.device for r in res.rows if r.metric == "disk read per token"]
    x = np.arange(len(devs))
    disk = {r.device: r for r in res.rows if r.metric == "disk read per token"}
    peak = {r.device: r for r in res.rows if r.metric == "peak memory"}
    a.bar(x - 0.3, [disk[d].predicted / MB for d in devs], 0.2, label="disk/token predicted", color="C0")
    a.bar(x - 0.1, [disk[d].measured / MB for d in devs], 0.2, label="disk/token measured", color="C0", alpha=0.5)
    if peak:
        a.bar(x + 0.1, [peak[d].predicted / MB if d in peak else 0 for d in devs], 0.2, label="peak mem predicted",
              color="C1")
        a.bar(x + 0.3, [peak[d].measured / MB if d in peak else 0 for d in devs], 0.2, label="peak mem measured",
              color="C1", alpha=0.5)
    a.set_xticks(x, devs)
    a.set_ylabel("MB")
    a.legend(fontsize=7)
    a.set_title("per device: disk read per token, peak memory above the footprint")
    # (d) timelines of the middle decode token
    a = ax[1, 1]
    names = [d.name for d in res.plan.devices if d.layers > 0 or d.name == res.plan.devices[0].name]
    colors = {"cpu": "C0", "disk": "C3", "prefetch": "C1", "send": "C2", "net": "C2", "wait": "0.85"}
    for k, tr in enumerate((res.predicted.trace, res.measured.trace)):
        toks = sorted((t for t in tr.tokens if t.seq == 0), key=lambda t: t.index)
        if len(toks) < 4:
            continue
        mid = len(toks) // 2
        t0, t1 = toks[mid - 1].time, toks[mid + 1].time
        for i, n in enumerate(names):
            y = i * 2.5 + k
            for sp in tr.spans:
                if sp.device == n and sp.end > t0 and sp.start < t1 and sp.resource in colors and sp.resource != "wait":
                    a.barh(y, (min(sp.end, t1) - max(sp.start, t0)) * 1e3, left=(max(sp.start, t0) - t0) * 1e3,
                           height=0.8, color=colors[sp.resource], alpha=0.9 if k == 0 else 0.55)
    a.set_yticks([i * 2.5 + k for i in range(len(names)) for k in (0, 1)],
                 [f"{n} {lab}" for n in names for lab in ("pred", "meas")], fontsize=7)
    a.set_xlabel("ms (two decode tokens)")
    handles = [matplotlib.patches.Patch(color=c, label=r) for r, c in colors.items() if r not in ("wait", "net")]
    a.legend(handles=handles, fontsize=7, loc="lower right")
    a.set_title("timeline: two decode tokens (Chrome traces have all)")
    cl = res.profile.cluster
    fig.suptitle(f"primasim validate: {res.config.model} on {cl.name}, {res.plan.describe()}"
                 + (" (degraded: no limits)" if res.degraded else ""), fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)

def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "probe":
        try:
            return probe_main(args[1:])
        except PrimasimError as exc:
            print(f"primasim validate probe: error: {exc.message}", file=sys.stderr)
            return 2
    print("usage: python -m primasim.loop.validate probe ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
