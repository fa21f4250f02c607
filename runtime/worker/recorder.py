"""What a worker records: spans, samples and counters, spilled to a temporary file."""

from __future__ import annotations

import collections
import os
import struct
import tempfile
import threading
from typing import Any

MEM_SAMPLE = "mem_available_bytes"  # the MemorySampler's samples, kept by the Recorder


class Recorder:
    """Spans, samples and counters of one worker, in its own clock (time.time()).

    A run records a dozen spans and samples per token; kept as Python lists until the driver's
    STATS they grew every worker by ~4 KB a token (experiments/long_run.py). They are spilled
    instead to an unlinked temporary file (a SIGKILLed worker leaves nothing behind) as fixed-size
    records, strings interned in a table (resources and names come from a small set), so memory
    stays at one buffer of FLUSH records per kind however long the run; stats() reads them back."""

    SPAN = struct.Struct("<IIddqqd")  # resource id, name id, start, end, seq, token, nbytes
    SAMPLE = struct.Struct("<Idd")  # name id, time, value
    FLUSH = 4096  # records buffered per kind before a write

    def __init__(self) -> None:
        self.counters: dict[str, float] = collections.defaultdict(float)
        self.lock = threading.Lock()
        self._ids: dict[str, int] = {}
        self._strings: list[str] = []
        self._files = {self.SPAN: tempfile.TemporaryFile(prefix="primasim-rec-"),
                       self.SAMPLE: tempfile.TemporaryFile(prefix="primasim-rec-")}
        self._bufs = {self.SPAN: bytearray(), self.SAMPLE: bytearray()}

    def _id(self, s: str) -> int:
        i = self._ids.get(s)
        if i is None:
            i = self._ids[s] = len(self._strings)
            self._strings.append(s)
        return i

    def _put(self, kind: struct.Struct, *fields: Any) -> None:
        buf = self._bufs[kind]
        buf += kind.pack(*fields)
        if len(buf) >= self.FLUSH * kind.size:
            self._flush(kind)

    def _flush(self, kind: struct.Struct) -> None:
        f = self._files[kind]
        if not f.closed:  # a background thread may record after close(): drop it
            f.write(self._bufs[kind])
        self._bufs[kind].clear()

    def span(self, resource: str, start: float, end: float, name: str = "", seq: int = 0, token: int = -1,
             nbytes: float = 0.0) -> None:
        with self.lock:
            self._put(self.SPAN, self._id(resource), self._id(name), start, end, seq, token, nbytes)

    def sample(self, name: str, t: float, value: float) -> None:
        with self.lock:
            self._put(self.SAMPLE, self._id(name), t, value)

    def add(self, key: str, v: float) -> None:
        with self.lock:
            self.counters[key] += v

    def _read(self, kind: struct.Struct) -> Any:
        self._flush(kind)
        f = self._files[kind]
        f.seek(0)
        data = f.read()
        f.seek(0, os.SEEK_END)
        return kind.iter_unpack(data)

    def stats(self) -> tuple[list[list[Any]], list[list[Any]]]:
        """Every span [resource, start, end, name, seq, token, nbytes] and sample [name, time,
        value] since the last clear(), in recording order."""
        with self.lock:
            st = self._strings
            spans = [[st[r], a, b, st[n], seq, tok, nb] for r, n, a, b, seq, tok, nb in self._read(self.SPAN)]
            samples = [[st[n], t, v] for n, t, v in self._read(self.SAMPLE)]
        return spans, samples

    def clear(self) -> None:
        with self.lock:
            for kind, f in self._files.items():
                self._bufs[kind].clear()
                if not f.closed:
                    f.seek(0)
                    f.truncate()
            self.counters.clear()

    def close(self) -> None:
        with self.lock:
            for kind, f in self._files.items():
                self._bufs[kind].clear()
                f.close()
