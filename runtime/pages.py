"""Page-level control of memory-mapped weights: which of this process's pages map a file range,
fault them in, evict them (from our mappings and from the page cache), and split a range at a
byte budget. The worker's residency planning and validate's probes use these."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os

import numpy as np

Ranges = list[tuple[str, int, int]]  # (file, offset, length)
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def lock_code() -> int:
    """mlock this process's executable file mappings (Python, jaxlib, numpy, zmq: ~225 MB, shared by
    every worker on the host); returns the bytes locked. Emulated devices share one host's page
    cache, so a library page is charged to the device that read it first: a device thrashing at its
    memory limit evicted the others' code (measured: devices whose weights fit re-read 25-128 MB of
    it per token, and a control thread stalled past the heartbeat timeout). Real devices each have
    their own copy, so an emulated one locks it; never called outside emulation."""
    locked = 0
    try:
        with open("/proc/self/maps") as fh:
            lines = fh.readlines()
    except OSError:
        return 0
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or "x" not in parts[1] or not parts[5].startswith("/") or "(deleted)" in parts[5]:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if _libc.mlock(lo, hi - lo) == 0:
            locked += hi - lo
    return locked


def _file_mappings(path: str) -> list[tuple[int, int, int]]:
    """(start address, end address, file offset) of this process's mappings of `path`."""
    real = os.path.realpath(path)
    out = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() == real:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi, int(parts[2], 16)))
    except OSError:
        pass
    return out


def mapped_spans(ranges: Ranges) -> list[tuple[int, int]]:
    """Page-aligned (address, length) spans of our mappings that cover the file `ranges`."""
    spans: list[tuple[int, int]] = []
    maps: dict[str, list[tuple[int, int, int]]] = {}
    for f, off, length in ranges:
        if f not in maps:
            maps[f] = _file_mappings(f)
        for lo, hi, foff in maps[f]:
            a = max(off, foff)
            b = min(off + length, foff + (hi - lo))
            if b <= a:
                continue
            addr = lo + (a - foff)
            start = addr - addr % PAGE
            end = -(-(lo + (b - foff)) // PAGE) * PAGE
            spans.append((start, end - start))
    return spans


def advise_random(ranges: Ranges) -> None:
    """MADV_RANDOM over our mappings of `ranges`: a page fault reads that page, not the disk's
    whole readahead window around it (for tensors read a row at a time, like the embedding)."""
    for addr, length in mapped_spans(ranges):
        _libc.madvise(addr, length, mmap.MADV_RANDOM)


def drop_pages(ranges: Ranges, spans: list[tuple[int, int]] | None = None) -> None:
    """Evict file ranges from memory: unmap our pages (MADV_DONTNEED keeps the mapping valid,
    reads fault the file back in), then drop them from the page cache (POSIX_FADV_DONTNEED).
    `spans`: the ranges' addresses from `mapped_spans`, if already known (it reads /proc)."""
    for addr, length in mapped_spans(ranges) if spans is None else spans:
        _libc.madvise(addr, length, mmap.MADV_DONTNEED)
    for f, off, length in ranges:
        with contextlib.suppress(OSError):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def touch_pages(ranges: Ranges) -> int:
    """Read one byte per page of the mapped ranges (fault them in). Returns bytes touched."""
    n = 0
    for addr, length in mapped_spans(ranges):
        arr = np.ctypeslib.as_array((ctypes.c_uint8 * length).from_address(addr))
        int(arr[::PAGE].sum())
        n += length
    return n


def split_ranges(ranges: Ranges, keep: float) -> tuple[Ranges, Ranges]:
    """Split file ranges into a first part of `keep` bytes and the rest (page-aligned cut)."""
    head: Ranges = []
    tail: Ranges = []
    left = int(keep)
    for f, off, length in ranges:
        if left >= length:
            head.append((f, off, length))
            left -= length
        elif left > 0:
            cut = off + left
            cut -= cut % PAGE
            if cut > off:
                head.append((f, off, cut - off))
            if off + length > cut:
                tail.append((f, cut, off + length - cut))
            left = 0
        else:
            tail.append((f, off, length))
    return head, tail


def resident_bytes(ranges: Ranges) -> int:
    """Bytes of the file ranges that are in the page cache now (mincore(2) over our mappings):
    how much of a device's weights sit in memory, whoever read them."""
    n = 0
    for addr, length in mapped_spans(ranges):
        vec = np.zeros(-(-length // PAGE), dtype=np.uint8)
        if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec.ctypes.data_as(ctypes.c_void_p)):
            raise OSError(ctypes.get_errno(), "mincore failed")
        n += int(np.count_nonzero(vec & 1)) * PAGE
    return n


def trim_heap() -> None:
    """Return the C heap's free memory to the OS (glibc malloc_trim): what a burst of temporary
    buffers left behind stops counting in the process's (and its memory cgroup's) usage."""
    with contextlib.suppress(AttributeError, OSError):
        _libc.malloc_trim(0)
