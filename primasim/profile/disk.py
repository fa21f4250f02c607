"""Disk (`disk_seq_gbs`, `disk_rnd_gbs`): prima.cpp's fio job in Python: O_DIRECT (the page cache out
of the way), time-based, one reader per thread, iodepth 1; sequential reads of the device's
readahead size, random reads of one page; on a probe file in the directory where checkpoints live
(the cache dir). Without O_DIRECT (tmpfs, macOS) it falls back to posix_fadvise/F_NOCACHE."""

from __future__ import annotations

import errno
import fcntl
import math
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from primasim.core.errors import SpecError
from primasim.core.io import make_dir
from primasim.core.procfs import BlockDevice, block_device_of
from primasim.core.units import GB, GiB, KiB, MiB

from .measurement import Measurement, measurement


@dataclass(frozen=True)
class DiskResult:
    seq: Measurement
    rnd: Measurement
    direct: bool  # O_DIRECT used (else: fadvise / F_NOCACHE, best effort)
    file: str
    device: BlockDevice | None


def aligned_buffer(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n)  # anonymous mmaps are page-aligned: what O_DIRECT needs


def open_direct(path: str, flags: int) -> tuple[int, bool]:
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

        fcntl.fcntl(fd, 48, 1)  # F_NOCACHE
    return fd, False


def disk_probe_file(directory: str | Path, size: int) -> Path:
    """A file of >= `size` incompressible bytes in `directory` (kept for the next profile: a
    sparse or zero file would be read without touching the disk). Written with O_DIRECT, atomically."""
    d = make_dir(directory, what="disk-probe directory",
                 fix="pass --disk-dir with a writable directory on the disk that holds the checkpoints")
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
    buf = aligned_buffer(chunk)
    buf.write(os.urandom(chunk))
    try:
        fd, direct = open_direct(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
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
        fd, dr = open_direct(str(path), os.O_RDONLY)
        direct = direct and dr
        if not dr and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        fds.append(fd)
    start = threading.Barrier(jobs + 1)
    t0_box = [0.0]

    def reader(j: int) -> None:
        try:
            buf = aligned_buffer(block)
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
        measurement("disk_seq", seq, "GB/s", GB, f"sequential {seq_block // KiB} KiB reads (device readahead), {common}"),
        measurement("disk_rnd", rnd, "GB/s", GB, f"random {rnd_block // KiB} KiB reads (page size), {common}"),
        direct, str(path), dev)
