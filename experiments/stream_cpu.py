"""CPU a planned-streaming worker spends on its streamed bytes, per MB (issue 18 diagnosis).

A streaming layer's part is read ahead by exact MADV_WILLNEED ranges (the worker's prefetch
thread), touched by the compute, and evicted after use (MADV_DONTNEED + POSIX_FADV_DONTNEED):
runtime/worker/residency.py. The simulator charges the reads to the disk only; this measures the
process CPU time of each step on a checkpoint's layers (the last 40 % of each streamed), one CPU,
outside a memory cgroup (a cgroup's charging adds to it). Not a timing benchmark of the disk: the
reads land during a sleep that is not counted.

    python experiments/stream_cpu.py [CHECKPOINT]   # default: spec_validation's target
"""

from __future__ import annotations

import os
import sys
import time

from spec_validation import build_weights

from primasim.runtime.checkpoint import open_checkpoint, prefetch
from primasim.runtime.pages import (
    advise_random,
    drop_pages,
    mapped_spans,
    split_ranges,
    touch_pages,
)


def main(argv: list[str]) -> int:
    path = argv[0] if argv else str(build_weights()["target"])
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    ck = open_checkpoint(path)
    tot = {"willneed": 0.0, "touch": 0.0, "evict": 0.0}
    mb = 0.0
    for layer in range(min(8, ck.spec.n_layers)):
        rs = ck.layer_ranges([layer])
        advise_random(rs)
        _, st = split_ranges(rs, 0.6 * sum(r[2] for r in rs))
        drop_pages(st, mapped_spans(st))
        c0 = time.process_time()
        prefetch(st)
        c1 = time.process_time()
        time.sleep(0.5)  # the reads land
        c2 = time.process_time()
        touch_pages(st)
        c3 = time.process_time()
        drop_pages(st, mapped_spans(st))
        c4 = time.process_time()
        tot["willneed"] += c1 - c0
        tot["touch"] += c3 - c2
        tot["evict"] += c4 - c3
        mb += sum(r[2] for r in st) / 1e6
    print(f"{mb:.0f} MB streamed: " + ", ".join(f"{k} {1e3 * v / mb:.3f}" for k, v in tot.items())
          + f" ms CPU per MB; total {1e3 * sum(tot.values()) / mb:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
