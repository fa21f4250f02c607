"""Memory bandwidth (`ram_bw_gbs`): a STREAM-like read, numpy reductions over a buffer far larger
than the last-level cache, split across the runtime's thread count; summed bytes / wall time."""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Iterator

import numpy as np

from primasim.core.units import GB, MiB

from .measurement import Measurement, measurement


class RamReader:
    """A STREAM-like read probe: `threads` threads run numpy reductions (bitwise-or over uint64,
    > 50 GB/s per core from cache, so DRAM is the bottleneck) over a buffer of `nbytes`. Threads
    take `chunk`-sized pieces from a shared counter, as XLA's thread pool does, so one thread that
    the OS descheduled on a shared machine does not stall the whole pass. Use as a context manager."""

    def __init__(self, nbytes: int, threads: int, chunk: int = 4 * MiB) -> None:
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
        return measurement("ram_bw", samples, "GB/s", GB,
                        f"numpy bitwise_or.reduce over {r.buf.nbytes / MiB:.0f} MiB in {chunk // MiB} MiB pieces, "
                        f"{threads} thread(s), samples of >= {min_seconds * 1000:.0f} ms")
