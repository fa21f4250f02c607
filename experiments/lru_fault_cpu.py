"""CPU an lru device spends per MB its faults read, from a fidelity study's journals (issue 15 part 6).

In `lru` residency the kernel's work of streaming -- allocating and charging pages (reclaiming
others at the memory limit), submitting the reads, mapping them -- runs in the worker's own
threads, on its CPU quota. This compares each `lru` device run with the same plan's `planned` row
of the same journal: the `planned` row's thread CPU less its streamed bytes' known cost
(`runtime_facts.STREAM_CPU_PER_BYTE`) is the compute; what the `lru` row spends beyond that compute,
per MB it read, is the lru streaming's CPU. Device runs that read < 50 MB more than their planned
twin are skipped (too little signal).

    python experiments/lru_fault_cpu.py experiments/results/fidelity_stream_q4k/run3 experiments/results/fidelity_stream_q4k/run4

Prints per device run and the median per device and overall (ms of thread CPU per MB read).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from primasim.core.runtime_facts import STREAM_CPU_PER_BYTE


def thread_cpu(stats: dict[str, float]) -> float:
    return sum(v for k, v in stats.items() if k.startswith("thread_cpu_s"))


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    per_device: dict[str, list[float]] = {}
    for run in argv:
        rows = {}
        for line in (Path(run) / "fidelity_runs.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "measured" in r:
                rows[r["name"]] = r["measured"]
        for name, m in sorted(rows.items()):
            twin = rows.get(name.replace("-lru/", "-planned/")) if "-lru/" in name else None
            if twin is None:
                continue
            for dev, st in m.get("device_stats", {}).items():
                pst = twin.get("device_stats", {}).get(dev)
                if not pst:
                    continue
                mb, mb_p = st["disk_read_bytes"] / 1e6, pst["disk_read_bytes"] / 1e6
                if mb - mb_p < 50:
                    continue
                compute = thread_cpu(pst) - STREAM_CPU_PER_BYTE * 1e6 * mb_p
                ms_per_mb = (thread_cpu(st) - compute) / mb * 1e3
                per_device.setdefault(dev, []).append(ms_per_mb)
                print(f"{Path(run).name} {name:36s} {dev:8s} lru {thread_cpu(st):.2f} s CPU, {mb:.0f} MB; "
                      f"planned {thread_cpu(pst):.2f} s, {mb_p:.0f} MB -> {ms_per_mb:.2f} ms/MB")
    every = [x for v in per_device.values() for x in v]
    for dev, v in per_device.items():
        print(f"{dev}: median {statistics.median(v):.2f} ms/MB over {len(v)} device runs")
    if every:
        print(f"all: median {statistics.median(every):.2f} ms/MB, {min(every):.2f}-{max(every):.2f} over {len(every)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
