"""Where a decode token's CPU goes, per thread: the in-process engine vs `primasim run`'s worker.

    python experiments/runtime_decode_schedstat.py /tmp/models/llama-mini-300m-q4_k_m.gguf

Reads /proc/<pid>/task/*/schedstat (CPU time and run-queue wait per thread) around 200 in-process
tokens (`generate`, the prompt included) and around 3 s of a 600-token `primasim run --cluster
local` once its worker has used 3 s of CPU (set-up and compile done). Prints per token: each busy
thread's CPU and its wait for a CPU (runnable, not running). Run it under the measurement lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_decode_bench import Ours  # noqa: E402

PROMPT = list(range(3, 67))


def snap(pid: int | str) -> dict[str, tuple[str, int, int]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            run, wait, _ = open(f"/proc/{pid}/task/{tid}/schedstat").read().split()
            comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            out[tid] = (comm, int(run), int(wait))
        except OSError:
            pass
    return out


def show(a: dict, b: dict, tokens: float, label: str) -> None:
    rows = sorted(((b[t][1] - a[t][1], b[t][2] - a[t][2], b[t][0]) for t in b if t in a), reverse=True)
    print(f"{label}: per token (ms) cpu / run-queue wait, busiest threads:")
    for run, wait, comm in rows[:6]:
        print(f"   {comm:18s} {run / tokens / 1e6:7.3f} / {wait / tokens / 1e6:6.3f}")


def worker_of(driver: subprocess.Popen) -> str | None:
    for q in os.listdir("/proc"):
        if q.isdigit():
            try:
                cmd = open(f"/proc/{q}/cmdline").read()
            except OSError:
                continue
            if "primasim\0worker" in cmd and f"--parent-pid\0{driver.pid}\0" in cmd:
                return q
    return None


def main() -> int:
    path = sys.argv[1]
    o = Ours(Path(path), 1024)
    o.run(PROMPT, 8)
    a = snap(os.getpid())
    r = o.run(PROMPT, 200)
    b = snap(os.getpid())
    print(f"in-process: step median {np.median(r['steps']) * 1e3:.2f} ms")
    show(a, b, 200, "in-process")
    p = subprocess.Popen([sys.executable, "-m", "primasim", "run", "--cluster", "local", "--model", path, "--prompt-ids",
                          ",".join(map(str, PROMPT)), "--tokens", "600", "--ignore-eos", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    wpid = None
    while wpid is None and p.poll() is None:
        time.sleep(0.2)
        wpid = worker_of(p)
    if wpid is None:
        raise SystemExit("the worker did not start")

    def total() -> int:
        return sum(v[1] for v in snap(wpid).values())

    c0 = total()
    while total() - c0 < 3e9 and p.poll() is None:
        time.sleep(0.2)
    a = snap(wpid)
    t = time.perf_counter()
    time.sleep(3.0)
    b = snap(wpid)
    dt = time.perf_counter() - t
    out, _ = p.communicate()
    d = json.loads(out)
    tokens = dt * 1e3 / d["tpot_p50_ms"]
    print(f"primasim run: TPOT p50 {d['tpot_p50_ms']:.2f} ms (mean {d['tpot_ms']:.2f}); {dt:.1f} s ~ {tokens:.0f} tokens")
    show(a, b, tokens, "primasim run's worker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
