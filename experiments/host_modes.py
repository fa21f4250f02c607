"""What decides how much the host's two CPUs slow each other (`runtime_facts.HOST_CONTENTION`).

experiments/host_contention.py found the slow-down of a decode window bimodal: ~1.0 in some rounds,
1.4-2.0 in others a minute later. Candidate mechanisms, told apart by what slows down:

- the two vCPUs on one physical core's two SMT threads (the hypervisor's placement; the guest
  reports one thread per core either way): then work that never leaves the core's own L1/L2 --
  in-cache FMA, `alu` -- slows as much as a window does, and `l2` (a 512 KiB array summed over and
  over) too, since SMT siblings share the L2;
- the memory system (L3, memory controllers; also other guests of the same machine): then only
  `stream` (summing a 256 MiB array, as a window streams its weights) slows;
- the hypervisor time-sharing one physical thread between the two vCPUs: then the guest's steal
  time grows while both compute (/proc/stat, recorded per phase);
- frequency: every kind slows by the same modest factor.

One process per host CPU (pinned), each runs one kind back to back for `--seconds`: CPU 0 alone,
CPU 1 alone, then both at once; the kinds interleaved within a round, `--rounds` rounds, so a mode
change between rounds shows in every kind at once. Printed per round and kind: median thread CPU
ms per call alone and together, the ratio, and the steal seconds of each phase.

    flock /work/coord/measure.lock nice -n -5 .venv/bin/python experiments/host_modes.py --rounds 12

`--window` adds the runtime's decode window (4 f32 blocks of llama-mini-300m, as host_contention.py;
needs the random-weight checkpoint `make validate` writes). Results: experiments/results/host_contention.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

KINDS = ("alu", "l2", "stream")


def _kernels(window: bool, cpu: int) -> dict[str, Callable[[], Any]]:
    import numpy as np

    a = np.random.default_rng(cpu).standard_normal((64, 64)).astype(np.float32)
    small = np.ones(128 * 1024, np.float32)  # 512 KiB: in a core's L2
    big = np.ones(64 * 1024 * 1024, np.float32)  # 256 MiB: streamed from memory

    def alu() -> Any:
        b = a
        for _ in range(400):
            b = a @ b  # 64x64 f32: in L1, FMA-bound
            b *= 0.01
        return b

    def l2() -> Any:
        s = 0.0
        for _ in range(200):
            s += float(small.sum())
        return s

    def stream() -> Any:
        return float(big.sum())

    out: dict[str, Callable[[], Any]] = {"alu": alu, "l2": l2, "stream": stream}
    if window:
        from primasim.core.model_sources import load_model
        from primasim.runtime import model as md
        from primasim.runtime.checkpoint import open_checkpoint
        from primasim.runtime.head import cached_random_weights

        ck = open_checkpoint(cached_random_weights(load_model("llama-mini-300m", "f32"), fmt="safetensors"))
        win = list(range(4 * cpu, 4 * cpu + 4))
        params = md.load_params(ck, win, embed=False, head=False)
        state = {"kv": md.init_kv(ck.spec, win, 1024)}
        x = np.zeros((1, 1, ck.spec.hidden), np.float32)

        def run_window() -> Any:
            y, state["kv"] = md.run_layers(params, state["kv"], x, 20, win)
            return np.asarray(y)

        out["window"] = run_window
    return out


def worker(cpu: int, window: bool) -> None:
    """Pinned to `cpu`; per line 'KIND SECONDS' on stdin runs KIND back to back and prints the
    median thread CPU ms and wall ms per call and the number of calls."""
    os.sched_setaffinity(0, {cpu})
    ks = _kernels(window, cpu)
    for f in ks.values():
        for _ in range(3):
            f()
    print("ready", flush=True)
    for line in sys.stdin:
        kind, seconds = line.split()
        f, rows = ks[kind], []
        end = time.perf_counter() + float(seconds)
        while time.perf_counter() < end:
            c0, t0 = time.thread_time(), time.perf_counter()
            f()
            rows.append((time.thread_time() - c0, time.perf_counter() - t0))
        rows = rows[len(rows) // 10:]
        print(f"{1e3 * statistics.median(r[0] for r in rows):.4f} {1e3 * statistics.median(r[1] for r in rows):.4f} "
              f"{len(rows)}", flush=True)


def _steal() -> dict[int, float]:
    """Per CPU, the guest's steal time so far in seconds (/proc/stat, USER_HZ ticks)."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    with open("/proc/stat") as f:
        for ln in f:
            if ln.startswith("cpu") and ln[3].isdigit():
                p = ln.split()
                out[int(p[0][3:])] = int(p[8]) / hz
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=2, metavar=("CPU", "WINDOW"), help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=1.0, help="per phase")
    ap.add_argument("--window", action="store_true", help="also the runtime's decode window")
    a = ap.parse_args(argv)
    if a.worker:
        worker(int(a.worker[0]), a.worker[1] == "1")
        return 0
    c0, c1 = sorted(os.sched_getaffinity(0))[:2]
    procs = {c: subprocess.Popen([sys.executable, __file__, "--worker", str(c), "1" if a.window else "0"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for c in (c0, c1)}
    for p in procs.values():
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"

    def phase(kind: str, cpus: tuple[int, ...]) -> tuple[dict[int, float], dict[int, float]]:
        s0 = _steal()
        for c in cpus:
            stdin = procs[c].stdin
            assert stdin is not None
            stdin.write(f"{kind} {a.seconds}\n")
            stdin.flush()
        res = {}
        for c in cpus:
            stdout = procs[c].stdout
            assert stdout is not None
            res[c] = float(stdout.readline().split()[0])
        s1 = _steal()
        return res, {c: s1[c] - s0[c] for c in (c0, c1)}

    kinds = KINDS + (("window",) if a.window else ())
    print(f"uptime before: {os.getloadavg()}", flush=True)
    print("| round | time | kind | CPU 0 alone / together ms | CPU 1 alone / together ms | ratio 0 | ratio 1 | steal s (both phase) |")
    print("|---|---|---|---|---|---|---|---|")
    ratios: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(a.rounds):
        for kind in kinds:
            al0, _ = phase(kind, (c0,))
            al1, _ = phase(kind, (c1,))
            both, st = phase(kind, (c0, c1))
            r0, r1 = both[c0] / al0[c0], both[c1] / al1[c1]
            ratios[kind] += [r0, r1]
            print(f"| {r + 1} | {time.strftime('%H:%M:%S')} | {kind} | {al0[c0]:.2f} / {both[c0]:.2f} | "
                  f"{al1[c1]:.2f} / {both[c1]:.2f} | {r0:.3f} | {r1:.3f} | {st[c0]:.2f} / {st[c1]:.2f} |", flush=True)
    for p in procs.values():
        assert p.stdin is not None
        p.stdin.close()
        p.wait(timeout=60)
    for kind, rs in ratios.items():
        print(f"{kind}: ratio together / alone median {statistics.median(rs):.3f} (min {min(rs):.3f}, max {max(rs):.3f})")
    print(f"uptime after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
