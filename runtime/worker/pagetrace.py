"""A diagnostic trace of an lru device's page cache, window by window (issue 15 part 6).

Set `PRIMASIM_PAGE_TRACE=DIR` in the environment of a run (emulated workers inherit it): each
worker appends one JSON line per window computed to DIR/<device>.jsonl, taken before and after the
window's compute -- the bytes the process caused to be read (/proc/self/io read_bytes), its major
faults, the file's bytes in the page cache per MB of the weight file (mincore(2) over the
worker's own mapping: whoever read them), and its memory cgroup's counters (memory.stat). Off
when the variable is unset (the default): nothing is read. Costs ~1-3 ms a sample (a mincore of
the whole mapping), so a traced run's times are not the study's; its bytes are.
`experiments/lru_trace.py` compares such a trace with the replay of the same windows.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from primasim.core.cgroups import own_group
from primasim.core.procfs import proc_faults, read_bytes

from ..pages import PAGE, _file_mappings

ENV = "PRIMASIM_PAGE_TRACE"
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


class PageTrace:
    """One worker's trace file; `sample(tag, window)` appends a line (nothing when `out` is None: off)."""

    def __init__(self, out: Path | None, path: str, device: str) -> None:
        self.path = path
        self.device = device
        self.group = own_group("memory") if out is not None else None
        self.fh = open(out, "a") if out is not None else None  # noqa: SIM115 (lives as long as the session)

    @staticmethod
    def from_env(path: str, device: str) -> PageTrace:
        d = os.environ.get(ENV, "")
        if d:
            Path(d).mkdir(parents=True, exist_ok=True)
        return PageTrace(Path(d) / f"{device}.jsonl" if d else None, path, device)

    def resident_mb(self) -> list[int]:
        """Pages of the weight file in the page cache, per MiB of the file (256 pages a bin), over
        every mapping of it (madvise splits one mapping into several)."""
        maps = _file_mappings(self.path)
        if not maps:
            return []
        per = (1 << 20) // PAGE
        size = max(foff + hi - lo for lo, hi, foff in maps)
        bins = np.zeros(-(-size // (1 << 20)), dtype=np.int64)
        for lo, hi, foff in maps:
            n = (hi - lo) // PAGE
            vec = np.zeros(n, dtype=np.uint8)
            if _libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(n * PAGE), vec.ctypes.data_as(ctypes.c_void_p)):
                continue
            pages = np.nonzero(vec & 1)[0] + foff // PAGE
            np.add.at(bins, pages // per, 1)
        return [int(x) for x in bins]

    def sample(self, tag: str, window: tuple[int, int], **extra: Any) -> None:
        if self.fh is None:
            return
        st = self.group.memory_stat() if self.group is not None else {}
        keep = ("cache", "rss", "mapped_file", "active_file", "inactive_file", "pgpgin", "pgmajfault",
                "total_cache", "total_rss", "total_active_file", "total_inactive_file", "file", "anon")
        line = {"t": time.time(), "tag": tag, "window": list(window), "read": read_bytes(),
                "majflt": proc_faults()[1], "resident_pages_per_mib": self.resident_mb(),
                "usage": self.group.memory_current() if self.group is not None else 0,
                "limit": self.group.memory_max() if self.group is not None else 0,
                "stat": {k: v for k, v in st.items() if k in keep}, **extra}
        self.fh.write(json.dumps(line) + "\n")
        self.fh.flush()
