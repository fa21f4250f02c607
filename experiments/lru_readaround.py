"""What Linux reads when lru residency faults a window of mmap'd layers in (issue 15 part 6).

The runtime's lru mode (runtime/worker/residency.py) maps the weight file with the kernel's default
advice and lets the page cache decide: each window's compute faults its layers in. The fidelity
study measured such devices reading 7-40 % more bytes than their weights (2-device k = 2 without
prefetch: the laptop 101 MB a token for 74 MB of layers). This probe replays one device's access
pattern -- its windows' layers read front to back, lap after lap, in a memory cgroup holding the
device's budget -- with the file's own layout and the host's disk, and reads, per window, the bytes
the process caused the block layer to read (/proc/self/io read_bytes) and which file pages are in
memory afterwards (mincore(2)): the bytes read that lie outside the device's own layers are the
kernel's mmap read-around (mm/filemap.c do_sync_mmap_readahead: ra_pages around the faulting page,
half of them behind it) and sequential readahead past the window's end (page_cache_async_ra).

    sudo .venv/bin/python experiments/lru_readaround.py [--model llama-mini-300m] [--quant q4k]

Writes experiments/results/lru_readaround.md. Not timing-sensitive (bytes and pages only): run
it niced, outside the measurement lock. Needs root (a memory cgroup).
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from primasim.core.cgroups import own_group  # noqa: F401  (the package's cgroup conventions)
from primasim.core.gguf import read_header
from primasim.core.model_sources import load_model

PAGE = mmap.PAGESIZE
RESULTS = Path(__file__).resolve().parent / "results"
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def read_bytes() -> int:
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def majflt() -> int:
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[9])


def layer_spans(path: str) -> tuple[dict[int, tuple[int, int]], tuple[int, int], tuple[int, int]]:
    """File byte span of each block, of the embedding and of the output layer (norm + matrix)."""
    h = read_header(path)
    spans: dict[int, list[int]] = {}
    emb = out = (0, 0)
    lo_out, hi_out = 1 << 62, 0
    for t in h.tensors:
        a = h.data_offset + t.offset if t.offset < h.data_offset else t.offset
        b = a + t.n_bytes
        if t.name.startswith("blk."):
            i = int(t.name.split(".")[1])
            s = spans.setdefault(i, [a, b])
            s[0], s[1] = min(s[0], a), max(s[1], b)
        elif t.name.startswith("token_embd"):
            emb = (a, b)
        elif t.name.startswith("output"):
            lo_out, hi_out = min(lo_out, a), max(hi_out, b)
    out = (lo_out, hi_out)
    return {i: (s[0], s[1]) for i, s in spans.items()}, emb, out


def resident(base: int, a: int, b: int) -> int:
    a -= a % PAGE
    n = -(-(b - a) // PAGE)
    vec = np.zeros(n, dtype=np.uint8)
    if _libc.mincore(ctypes.c_void_p(base + a), ctypes.c_size_t(n * PAGE), vec.ctypes.data_as(ctypes.c_void_p)):
        raise OSError(ctypes.get_errno(), "mincore")
    return int(np.count_nonzero(vec & 1)) * PAGE


def kernel_access(path: str, buf: np.ndarray, layers: list[int]) -> Any:
    """The runtime's own reads of a layer: its Q4_K kernels (runtime/kernels) computing q/k/v, the
    attention output, gate/up and down from the mapping, rows shared between the calling thread and
    the library's workers as in a run (attention itself reads no weights). Returns run(i), which
    computes layer i and waits for it. Set up (jax, the kernels) before the cgroup is joined."""
    import jax
    import jax.numpy as jnp

    from primasim.runtime import kernels as K
    from primasim.runtime.kernels.reference import TYPE_NAMES

    h = read_header(path)
    info = {t.name: t for t in h.tensors}
    files = (K.file_array(buf),)

    def qw(names: list[str]) -> Any:
        ts = [info[n] for n in names]
        return K.qweight([(t.offset if t.offset >= h.data_offset else h.data_offset + t.offset, 0,
                           TYPE_NAMES[t.ggml_type], t.shape[1], t.shape[0]) for t in ts])

    groups = {i: [qw([f"blk.{i}.attn_{p}.weight" for p in ("q", "k", "v")]), qw([f"blk.{i}.attn_output.weight"]),
                  qw([f"blk.{i}.ffn_{p}.weight" for p in ("gate", "up")]), qw([f"blk.{i}.ffn_down.weight"])]
              for i in layers}
    e = info[f"blk.{layers[0]}.attn_q.weight"].shape[0]
    x = jnp.full((1, e), 0.01, jnp.float32)

    def run(i: int) -> None:
        qkv, o, gu, down = groups[i]
        q = K.matmul(files, x, qkv)[0]
        y = K.matmul(files, q, o, residual=x)[0]
        gate, up = K.matmul(files, y, gu)
        jax.block_until_ready(K.matmul(files, gate, down, up=up, residual=y)[0])

    return run


def child(path: str, windows: list[list[int]], budget: int, advice: str, willneed: bool, laps: int,
          cg: Path, layer_ms: float = 0.0, blkio: Path | None = None,
          per_window: bool = False, gap_ms: float = 0.0, kernels: bool = False) -> list[dict[str, float]]:
    spans, emb, outp = layer_spans(path)
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    buf = np.frombuffer(m, dtype=np.uint8)
    base = buf.ctypes.data
    run = None
    if kernels:  # compile on every layer once, before the cold start and the cgroup
        run = kernel_access(path, buf, sorted({i for w in windows for i in w}))
        for i in sorted({i for w in windows for i in w}):
            run(i)
        _libc.madvise(base, size, mmap.MADV_DONTNEED)  # unmapped, so the cold start can drop them
    os.fdatasync(fd)  # dirty pages (a file just written) are not dropped until written back
    os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)  # cold start
    if advice == "random":
        _libc.madvise(base, size, mmap.MADV_RANDOM)
    # join the cgroup, limited to what the process holds now + the weights' budget
    (cg / "cgroup.procs").write_text(str(os.getpid()))
    if blkio is not None:
        (blkio / "cgroup.procs").write_text(str(os.getpid()))
    # (the page cache the process charged so far is evictable: not part of its footprint, as
    # runtime/emulate.py's set_memory_budget counts it)
    st = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines())
    usage = int((cg / "memory.usage_in_bytes").read_text()) - int(st["total_active_file"]) - int(st["total_inactive_file"])
    (cg / "memory.limit_in_bytes").write_text(str(usage + budget))
    own = [spans[i] for w in windows for i in w]
    rows = []
    for lap in range(laps):
        for wi, w in enumerate(windows):
            r0, f0 = read_bytes(), majflt()
            a, b = spans[w[0]][0], spans[w[-1]][1]
            if run is not None:  # the runtime's kernels compute the window's layers
                for i in w:
                    run(i)
            elif layer_ms > 0:  # each layer's compute takes its time, page by page
                for i in w:
                    la, lb = spans[i]
                    step = max(PAGE, (lb - la) // 64)
                    for x in range(la, lb, step):
                        int(buf[x:min(lb, x + step):PAGE].sum())
                        time.sleep(layer_ms / 1e3 / 64)
            else:
                int(buf[a:b:PAGE].sum())  # the window's compute reads its layers front to back
            if willneed:  # lru prefetch: the next window, madvise(WILLNEED), as the worker's thread does
                nw = windows[(wi + 1) % len(windows)]
                na, nb = spans[nw[0]][0], spans[nw[-1]][1]
                _libc.madvise(base + na - na % PAGE, nb - na + na % PAGE, mmap.MADV_WILLNEED)
                time.sleep(0.05)
            if gap_ms > 0:  # the rest of the ring computes before this device's next window
                time.sleep(gap_ms / 1e3)
            rd, mf = read_bytes() - r0, majflt() - f0
            in_own = sum(resident(base, x, y) for x, y in own)
            total = resident(base, 0, size)
            if per_window:  # every layer's bytes in memory after this window (MB, file order)
                per_layer = [round(resident(base, *spans[i]) / 1e6, 1) for i in sorted(spans)]
                print(f"lap {lap} window {wi}: read {rd / 1e6:.1f} MB, major faults {mf}, layers in memory "
                      f"{per_layer}", flush=True)
            rows.append({"lap": lap, "window": wi, "bytes": b - a, "read": rd, "majflt": mf,
                         "resident_own": in_own, "resident_other": total - in_own})
    if run is None:  # (the kernels' jax arrays alias the mapping until the child exits)
        del buf
        m.close()
    os.close(fd)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-mini-300m")
    ap.add_argument("--quant", default="q4k")
    ap.add_argument("--laps", type=int, default=4)
    ap.add_argument("--case", action="append", default=[], help="label:windows:room_mb, windows as 4-7/12-15 "
                    "(layer ranges of one device's windows), e.g. laptop-k2:4-7/12-15:26.4 (default: the study's)")
    ap.add_argument("--advice", default="normal,random")
    ap.add_argument("--willneed", default="off,on")
    ap.add_argument("--file", default="", help="the GGUF file (default: the study's cached random weights)")
    ap.add_argument("--read-mbs", type=float, default=0.0, help="throttle the probe's disk reads (blkio, MB/s) "
                    "as the emulated devices' are (default: none)")
    ap.add_argument("--per-window", action="store_true", help="print every layer's resident MB after each window")
    ap.add_argument("--access", default="scan", choices=("scan", "kernels"), help="scan: one thread touches "
                    "each page front to back; kernels: the runtime's Q4_K kernels compute the layers")
    ap.add_argument("--gap-ms", type=float, default=0.0, help="idle time after each window (the rest of the "
                    "ring computing; the readahead in flight completes)")
    ap.add_argument("--layer-ms", type=float, default=0.0, help="compute time per layer between its pages' "
                    "touches (default: none, a scan at memory speed)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("lru_readaround: needs root (a memory cgroup); run with sudo", file=sys.stderr)
        return 2
    path = a.file
    if not path:
        from primasim.runtime.head import cached_random_weights

        w = cached_random_weights(load_model(a.model, a.quant), fmt="gguf")
        path = str(w)
    # the fidelity study's laptop of a 2-device even split (budget as it measured: 16.3 MB) and
    # desktop (22.8 MB); windows k = 1 and k = 2
    # devices of the fidelity study's lru configurations, each with the room its memory limit left
    # the page cache there (cg_mem_limit - anon_peak in fidelity_stream_q4k/run1)
    cases = [("stream-2 k=2 laptop", [[4, 5, 6, 7], [12, 13, 14, 15]], int(26.4e6)),
             ("stream-2 k=1 laptop", [[8, 9, 10, 11, 12, 13, 14, 15]], int(26.4e6)),
             ("stream-2 k=2 desktop (no output)", [[0, 1, 2, 3], [8, 9, 10, 11]], int(37.0e6)),
             ("stream-3 k=4 laptop", [[2], [6], [10], [14]], int(35.0e6)),
             # a 36.5 MB window around the room it needs: the knife edge
             ("stream-4 k=1 laptop, room 31 MB", [[4, 5, 6, 7]], int(31e6)),
             ("stream-4 k=1 laptop, room 35 MB", [[4, 5, 6, 7]], int(35e6)),
             ("stream-4 k=1 laptop, room 37 MB", [[4, 5, 6, 7]], int(37e6)),
             ("stream-4 k=1 laptop, room 38 MB", [[4, 5, 6, 7]], int(38e6))]
    lines = ["# lru residency: what the kernel reads around a faulting window", "",
             f"`sudo .venv/bin/python experiments/lru_readaround.py` on {time.strftime('%Y-%m-%d %H:%M')}, "
             f"{a.model} {a.quant} ({path}), disk read_ahead_kb "
             f"{Path('/sys/block/vda/queue/read_ahead_kb').read_text().strip() if Path('/sys/block/vda').exists() else '?'}, "
             f"kernel {os.uname().release}. Per window, laps after the first (steady state): bytes read "
             "(/proc/self/io), major faults, and after it the file bytes in memory inside the device's layers "
             "and outside them (mincore).", "",
             "| device | advice | prefetch (WILLNEED next window) | window MB | read MB / window | read / window bytes "
             "| major faults | resident own MB | resident outside MB |", "|---|---|---|---|---|---|---|---|---|"]
    if a.case:
        cases = []
        for spec in a.case:
            lab, wins, room = spec.split(":")
            ws = [list(range(int(x.split("-")[0]), int(x.split("-")[-1]) + 1)) for x in wins.split("/")]
            cases.append((lab, ws, int(float(room) * 1e6)))
    for label, windows, budget in cases:
        for advice in a.advice.split(","):
            for willneed in (x == "on" for x in a.willneed.split(",")):
                cg = Path(f"/sys/fs/cgroup/memory/primasim-stream2-probe-{os.getpid()}")
                cg.mkdir()
                bio = None
                if a.read_mbs > 0:
                    bio = Path(f"/sys/fs/cgroup/blkio/primasim-stream2-probe-{os.getpid()}")
                    bio.mkdir()
                    dev = os.stat(path).st_dev
                    (bio / "blkio.throttle.read_bps_device").write_text(
                        f"{os.major(dev)}:{os.minor(dev)} {int(a.read_mbs * 1e6)}")
                try:
                    r, wfd = os.pipe()
                    pid = os.fork()
                    if pid == 0:
                        os.close(r)
                        try:
                            rows = child(path, windows, budget, advice, willneed, a.laps, cg, a.layer_ms, bio,
                                         a.per_window, a.gap_ms, a.access == "kernels")
                            os.write(wfd, repr(rows).encode())
                        except BaseException:  # (a child's failure is printed, the case reported empty)
                            import traceback

                            traceback.print_exc()
                        finally:
                            os._exit(0)
                    os.close(wfd)
                    data = b""
                    while chunk := os.read(r, 1 << 16):
                        data += chunk
                    os.close(r)
                    os.waitpid(pid, 0)
                    rows = eval(data.decode()) if data else []  # noqa: S307 (our own child's repr)
                finally:
                    cg.rmdir()
                    if bio is not None:
                        bio.rmdir()
                steady = [x for x in rows if x["lap"] >= 1]
                if not steady:
                    continue
                wb = np.mean([x["bytes"] for x in steady])
                rd = np.mean([x["read"] for x in steady])
                lines.append(f"| {label} | {advice} | {'on' if willneed else 'off'} | {wb / 1e6:.1f} | {rd / 1e6:.1f} | "
                             f"{rd / wb:.2f} | {np.mean([x['majflt'] for x in steady]):.0f} | "
                             f"{np.mean([x['resident_own'] for x in steady]) / 1e6:.1f} | "
                             f"{np.mean([x['resident_other'] for x in steady]) / 1e6:.1f} |")
                print(lines[-1], flush=True)
    out = RESULTS / ("lru_readaround_cases.md" if a.case else "lru_readaround.md")  # (--case: not the committed table)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
