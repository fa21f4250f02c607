"""In-device probes, run inside an emulated device's limits (`python -m primasim.loop.validate probe`):
the runtime's own kernels per call and per layer, page-fault streaming, disk bursts under a blkio
throttle, one idle hop over the wire format, and the memory a worker can give the model."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shlex
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from primasim.core.errors import EmulationError
from primasim.core.paths import cache_dir
from primasim.core.procfs import memory_info, read_limits
from primasim.core.runtime_facts import attention_span, kv_bytes
from primasim.core.units import GiB, MiB
from primasim.profile.disk import aligned_buffer, disk_probe_file, open_direct
from primasim.profile.link import measure_link
from primasim.profile.profiler import ProfileConfig, run_profile
from primasim.runtime import model as md, wire
from primasim.runtime._measure import device_cgroup
from primasim.runtime.checkpoint import evict, open_checkpoint, prefetch
from primasim.runtime.pages import drop_pages, mapped_spans, split_ranges, touch_pages

PROBE_LAYERS = 4  # layers the runtime probe maps (4 x 61 MB for llama-mini-300m: far past the LLC)


PROBE_ROWS = (1, 2, 4, 8)  # tokens per call the runtime probe times (decode; batched decode up to 8 rows)


# ============================================================================ in-device probes
def _mean_call(fn: Callable[[], Any], min_seconds: float, min_calls: int = 4) -> tuple[float, float]:
    """Mean wall time and mean CPU time (this process's, every thread's) of `fn` over at least
    `min_seconds` (and `min_calls` calls): a mean over several CFS periods, so a CPU quota shows
    as a slower CPU in the wall time, not as bursts and pauses."""
    n = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds and n >= min_calls:
            return dt / n, (time.process_time() - c0) / n


def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx > 0 else 0.0
    return my - slope * mx, slope


def cpu_time_basis(cpus: int, quota: float | None) -> float | None:
    """How CPU time converts to the profile's basis on this device, or None (time it by the wall).

    A device on one CPU runs the runtime's calls on that CPU alone, so a call's CPU time is its
    wall time at the CPU's full speed, whatever else shares the host and however the quota pauses
    it; the profile's figures are at the quota's *average* rate (`quota / cpus` of the CPU: the
    simulator's `CpuQuota` turns them back into full-speed time), i.e. CPU time / that share.
    The wall time of back-to-back calls measures the same only on a quiet host, and a short call's
    cost comes out as the small difference of two long, noisy means (observed: 0.0-2.8 ms per call
    between devices and runs). On several CPUs XLA may run a call's threads in parallel (CPU time
    > wall time): the wall clock stays the basis there."""
    if cpus != 1:
        return None
    return min(1.0, quota) if quota and quota > 0 else 1.0


def runtime_probe(checkpoint: str | Path, *, tokens: tuple[int, ...] = (1, 2, 16), max_seq: int = 1024,
                  pos: int = 16, layers: int = PROBE_LAYERS, rounds: int = 5, min_seconds: float = 0.15,
                  cpu_share: float | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time the runtime's own layer calls on this device (run it inside the device's limits).

    For each T in `tokens`: one call of a window of w layers for w = 1 .. `layers` (each cycling
    through the mapped layers, so no window's weights are hot in the caches), the sizes interleaved
    call by call; each size's median over the rounds of its mean per call. A straight line through the
    medians over w gives `layer_s` (slope: one layer) and `call_s` (intercept: the call's own cost
    -- dispatch, Python, argument handling, the result's copy to the host), in the profile's basis:
    `cpu_share` (`cpu_time_basis`) given, CPU time / cpu_share, else wall time. Every size's wall
    and CPU times are kept (`sizes`); `single_s` / `window_s` are sizes 1 and `layers`. Plus the
    head's per-token work (`head_s`: output layer + argmax to the host; `embed_s`: embedding one
    token) and the span attended."""

    ckpt = open_checkpoint(checkpoint)
    spec = ckpt.spec
    n = max(2, min(layers, spec.n_layers))
    ids = list(range(n))
    params = md.load_params(ckpt, ids, embed=True, head=True)
    kv: Any = md.init_kv(spec, ids, max_seq)
    basis = "cpu" if cpu_share else "wall"
    share = float(cpu_share) if cpu_share else 1.0
    out: dict[str, Any] = {"layers": n, "max_seq": max_seq, "pos": pos, "rounds": rounds,
                           "min_seconds": min_seconds, "basis": basis, "cpu_share": share, "tokens": {}}

    def call(x: Any, p: int, lay: list[int]) -> Any:
        nonlocal kv
        y, kv = md.run_layers(params, kv, x, p, lay)
        return np.asarray(y)  # the worker copies every result to the host (Stage.run)

    def timed(fn: Callable[[], Any], calls: int) -> float:
        wall, cpu = _mean_call(fn, min_seconds, min_calls=calls)
        return cpu / share if basis == "cpu" else wall

    sizes = list(range(1, n + 1))
    rng = random.Random(0)
    for T in tokens:
        if progress:
            progress(f"runtime kernels: {T} token(s) per call")
        x = np.zeros((1, T, spec.hidden), np.float32)
        p = max(0, min(pos, max_seq - T))
        for w in sizes:  # compile every window size + fault the weights in
            call(x, p, ids[:w])
        starts = itertools.count()

        def window(w: int, x: Any = x, p: int = p, starts: Any = starts) -> Any:
            s = next(starts)
            return call(x, p, [ids[(s + j) % n] for j in range(w)])

        walls: dict[int, list[float]] = {w: [] for w in sizes}
        cpus: dict[int, list[float]] = {w: [] for w in sizes}
        order = list(sizes)
        for _ in range(rounds):
            # sizes interleaved call by call, so the host's load slows them alike (a common
            # factor of the line, not noise in its intercept)
            wsum = dict.fromkeys(sizes, 0.0)
            csum = dict.fromkeys(sizes, 0.0)
            cycles = 0
            t_round = time.perf_counter()
            while cycles < 2 or time.perf_counter() - t_round < min_seconds * len(sizes):
                rng.shuffle(order)
                for w in order:
                    c0, t0 = time.process_time(), time.perf_counter()
                    window(w)
                    wsum[w] += time.perf_counter() - t0
                    csum[w] += time.process_time() - c0
                cycles += 1
            for w in sizes:
                walls[w].append(wsum[w] / cycles)
                cpus[w].append(csum[w] / cycles)
        per = {w: (statistics.median(cpus[w]) / share if basis == "cpu" else statistics.median(walls[w]))
               for w in sizes}
        a, b = line_fit([float(w) for w in sizes], [per[w] for w in sizes])
        layer_s = max(1e-6, b)
        out["tokens"][str(T)] = {"single_s": per[1], "window_s": per[n], "layer_s": layer_s,
                                 "call_s": max(0.0, a),
                                 "sizes": {str(w): {"wall_s": walls[w], "cpu_s": cpus[w]} for w in sizes},
                                 "span": attention_span(p + T, max_seq)}
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
    out["kv_alloc_bytes"] = float(kv_bytes(n, max_seq + 1, spec.n_kv_heads, spec.head_dim))  # init_kv keeps one spare position
    del keep
    # the head's work per token besides the blocks, as the worker does it: the output layer and the
    # argmax's copy to the host (Session._finish), and embedding the sampled token (Stage.embed)
    xe = np.zeros((1, 1, spec.hidden), np.float32)

    def head() -> None:
        _, top = md.head(params, xe)
        int(np.asarray(top).reshape(-1)[0])

    def embed() -> None:
        np.asarray(md.embed(params, [[1]]))

    head()
    embed()
    out["head_s"] = statistics.median(timed(head, 4) for _ in range(rounds))
    out["embed_s"] = statistics.median(timed(embed, 4) for _ in range(rounds))
    # streaming through the mapping: what a worker short of memory does for the part it evicts
    out["fault"] = fault_probe(ckpt, layer=n)
    return out


def fault_probe(ckpt: Any, *, layer: int, nbytes: int = 24 * MiB) -> dict[str, float]:
    """Read `nbytes` of a dropped layer by touching the mapped pages (demand faults), and the same
    after madvise(WILLNEED) (prefetch); bytes/s of each, under this process's blkio throttle."""

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

    path = disk_probe_file(cache_dir() / "profile", 256 * MiB)
    size = path.stat().st_size
    fd, direct = open_direct(str(path), os.O_RDONLY)
    buf = aligned_buffer(block)
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
    Python + JAX + the runtime's modules, like a worker after start-up; not the evictable page
    cache, as runtime/emulate.py's set_memory_budget) + `extra` bytes."""
    g = device_cgroup()  # an emulated device's own memory cgroup (v1 or v2), never a shared one
    if g is None or os.geteuid() != 0:
        return {}
    usage = g.held()
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
                       min_seconds=max(0.15, 3 * (lim.cpu_period or 0.0)),
                       cpu_share=cpu_time_basis(len(os.sched_getaffinity(0)), lim.cpu_quota))
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
