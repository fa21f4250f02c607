"""Background prefetch of the next window (madvise WILLNEED), prima.cpp's prefetch."""

from __future__ import annotations

import contextlib
import queue
import threading
import time

from .._measure import name_thread
from .recorder import Recorder
from .stage import Stage


class Prefetcher(threading.Thread):
    """madvise(WILLNEED) of the next window in the background (prima.cpp's prefetch)."""

    def __init__(self, stage: Stage, rec: Recorder) -> None:
        super().__init__(name="primasim-prefetch", daemon=True)
        self.stage, self.rec = stage, rec
        self.q: queue.Queue[tuple[str, list[tuple[str, int, int]]] | None] = queue.Queue()

    def post(self, name: str, ranges: list[tuple[str, int, int]]) -> None:
        if ranges:
            self.q.put((name, ranges))

    def stop(self) -> None:
        self.q.put(None)

    def run(self) -> None:
        name_thread()
        while True:
            item = self.q.get()
            if item is None:
                return
            name, ranges = item
            t0 = time.time()
            with contextlib.suppress(Exception):  # advisory: a failed hint must not stop the run
                self.stage.prefetch(ranges)
            self.rec.span("prefetch", t0, time.time(), name, nbytes=sum(r[2] for r in ranges))
