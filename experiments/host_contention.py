"""How much slower the runtime's kernel runs on one host CPU while the other host CPU runs it too.

The emulated cluster pins its single-thread devices to the host's CPUs (`runtime_facts.emulated_cpus`:
desktop and tablet on CPU 0, laptop and phone on CPU 1). In a ring one device computes at a time;
in the recurrent pipeline (S >= 2 sequences in flight) devices on both CPUs compute at once, and
the fidelity runs measured each device's thread CPU time per token growing with S (rpp-4, run2:
+6..+19 % at S = 4 over S = 1). A decode window streams its weights from memory (f32, one token:
a matrix-vector product), and the two CPUs share the memory system (the last-level cache, the
memory controllers; on a VM possibly one physical core's two hyperthreads).

This measures it: a process pinned to CPU 0 runs windows of 4 blocks of llama-mini-300m (f32, one
token, `primasim.runtime.model.run_layers`, as an emulated device runs its window) back to back
for a few seconds, alone and then while a second process does the same on CPU 1 with other blocks;
alternated `--rounds` times. Printed: per phase the median thread CPU time and wall time per call,
and the ratio together / alone (the simulator's `runtime_facts.HOST_CONTENTION`).

    sudo flock /work/coord/measure.lock nice -n -5 .venv/bin/python experiments/host_contention.py

No cgroup, no root needed (CPU affinity only); needs the random-weight checkpoint `make validate`
writes. Results: experiments/results/host_contention.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any


def worker(cpu: int, first: int, seconds: float, layers: int = 4) -> None:
    """Pinned to `cpu`: windows of blocks first..first+layers-1 back to back for `seconds`; prints
    'cpu_ms wall_ms' per call after a warm-up."""
    import numpy as np

    from primasim.core.model_sources import load_model
    from primasim.runtime import model as md
    from primasim.runtime.checkpoint import open_checkpoint
    from primasim.runtime.head import cached_random_weights

    os.sched_setaffinity(0, {cpu})
    ck = open_checkpoint(cached_random_weights(load_model("llama-mini-300m", "f32"), fmt="safetensors"))
    win = list(range(first, first + layers))
    params = md.load_params(ck, win, embed=False, head=False)
    kv: Any = md.init_kv(ck.spec, win, 1024)
    x = np.zeros((1, 1, ck.spec.hidden), np.float32)
    for _ in range(3):  # compile + fault in
        y, kv = md.run_layers(params, kv, x, 20, win)
        np.asarray(y)
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        c0, t0 = time.thread_time(), time.perf_counter()
        y, kv = md.run_layers(params, kv, x, 20, win)
        np.asarray(y)
        print(f"{1e3 * (time.thread_time() - c0):.4f} {1e3 * (time.perf_counter() - t0):.4f}", flush=True)


def phase(cpus: list[tuple[int, int]], seconds: float) -> dict[int, tuple[float, float, int]]:
    """Run one worker per (cpu, first block) at once; per cpu: median CPU ms, median wall ms, calls."""
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(c), str(f), str(seconds)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for c, f in cpus]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    out = {}
    for (c, _), p in zip(cpus, procs):
        text, _ = p.communicate(timeout=600)
        rows = [tuple(map(float, ln.split())) for ln in text.splitlines() if ln.strip()]
        rows = rows[len(rows) // 10:]  # the first calls of a phase overlap the other's start
        out[c] = (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows), len(rows))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=3, metavar=("CPU", "FIRST", "SECONDS"), help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0, help="per phase")
    a = ap.parse_args(argv)
    if a.worker:
        worker(int(a.worker[0]), int(a.worker[1]), float(a.worker[2]))
        return 0
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two host CPUs")
    c0, c1 = sorted(os.sched_getaffinity(0))[:2]
    print(f"uptime: {os.getloadavg()}", flush=True)
    lines = []
    ratios = []
    for r in range(a.rounds):
        alone0 = phase([(c0, 0)], a.seconds)[c0]
        alone1 = phase([(c1, 4)], a.seconds)[c1]
        both = phase([(c0, 0), (c1, 4)], a.seconds)
        for c, alone in ((c0, alone0), (c1, alone1)):
            ratio = both[c][0] / alone[0]
            ratios.append(ratio)
            line = (f"| {r + 1} | {c} | {alone[0]:.2f} / {alone[1]:.2f} ({alone[2]}) | {both[c][0]:.2f} / {both[c][1]:.2f} "
                    f"({both[c][2]}) | {ratio:.3f} |")
            lines.append(line)
            print(line, flush=True)
    print("| round | CPU | alone: CPU / wall ms per call (calls) | together | CPU ratio |")
    print("|---|---|---|---|---|")
    print("\n".join(lines))
    print(f"median CPU ratio together / alone: {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}); uptime after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
