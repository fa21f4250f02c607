"""How long one XLA call of the runtime takes inside an emulated CPU quota after an idle spell:
the ring's pattern (a device computes its window, then waits for the rest of the ring).

A cgroup v1 CPU group with `cpu.cfs_quota_us` / `cpu.cfs_period_us` = 6000/10000 (then 4000/10000,
the emulated desktop's and tablet's quotas), one host CPU; in it, windows of L = 1..12 blocks of
llama-mini-300m (f32, one token, `primasim.runtime.model.run_layers`), each after 60 ms asleep,
16 per L. Printed per L: the call's thread CPU time and its wall time (medians), and the wall time
the simulator's `CpuQuota` gives for that CPU time after an idle spell (median over the period's
phases), with the quota charged at scheduler ticks (`runtime_facts.SCHED_TICK`, the model) and
throttled the moment the quota is spent (`quota_ticks=False`, the model before 2026-12-07 19:45).

    sudo flock /work/coord/measure.lock nice -n -5 .venv/bin/python experiments/quota_tick.py
    sudo ... experiments/quota_tick.py --quant q4k   # the same on the Q4_K_M GGUF (the compiled kernels)
    python experiments/quota_tick.py --model 9.4 12.7 18.1   # the model only, for given CPU ms

Needs root (the cgroup) and the random-weight checkpoint `make validate` writes. The group is
removed at the end. Results: experiments/results/quota_tick.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

GROUP = Path("/sys/fs/cgroup/cpu") / f"primasim-quota-tick-{os.getpid()}"
PERIOD_US = 10_000


def model_wall(cpu_s: float, cores: float, tick: float, n: int = 400) -> float:
    """Median wall seconds `CpuQuota` gives `cpu_s` of full-speed work after an idle spell, over
    n start phases spread over two periods (the tick and period grids repeat every 20 ms)."""
    from primasim.core.units import MS
    from primasim.sim._runtime import CpuQuota

    walls = []
    for i in range(n):
        em = SimpleNamespace(cpu_quota=cores, threads=1, cpu_period=PERIOD_US * 1e-6)
        q = CpuQuota(SimpleNamespace(spec=SimpleNamespace(emulate=em)), True, None, tick=tick)  # type: ignore[arg-type]
        walls.append(q.duration(1.0 + i / n * 20 * MS, cpu_s / q.frac))
    return statistics.median(walls)


def worker(cpu: int, quant: str = "f32") -> None:
    """Inside the group: time the windows (prints one line per L)."""
    import numpy as np

    from primasim.core.model_sources import load_model
    from primasim.runtime import model as md
    from primasim.runtime.checkpoint import open_checkpoint
    from primasim.runtime.head import cached_random_weights

    os.sched_setaffinity(0, {cpu})
    fmt = "safetensors" if quant == "f32" else "gguf"
    ck = open_checkpoint(cached_random_weights(load_model("llama-mini-300m", quant), fmt=fmt))
    n = ck.spec.n_layers
    params = md.load_params(ck, list(range(n)), embed=True, head=True)
    kv: Any = md.init_kv(ck.spec, list(range(n)), 1024)
    x = np.zeros((1, 1, ck.spec.hidden), np.float32)

    def call(layers: list[int]) -> None:
        nonlocal kv
        y, kv = md.run_layers(params, kv, x, 20, layers)
        np.asarray(y)

    for L in (1, 2, 3, 4, 6, 8, 12):
        wins = [list(range(s, s + L)) for s in range(0, n - L + 1, L)]
        for w in wins:
            call(w)  # compile + fault in
        cpus, walls = [], []
        for i in range(16):
            time.sleep(0.06)
            c0, t0 = time.thread_time(), time.perf_counter()
            call(wins[i % len(wins)])
            walls.append(time.perf_counter() - t0)
            cpus.append(time.thread_time() - c0)
        print(f"{L} {statistics.median(cpus):.6f} {statistics.median(walls):.6f} {np.percentile(walls, 25):.6f} "
              f"{np.percentile(walls, 75):.6f}", flush=True)


def table(cores: float, rows: list[tuple[int, float, float, float, float]]) -> list[str]:
    from primasim.core.runtime_facts import SCHED_TICK

    out = [f"quota {cores:g} core ({int(cores * PERIOD_US)}/{PERIOD_US} us)", "",
           "| L | thread CPU ms | wall ms (IQR) | model, tick | model, at once |", "|---|---|---|---|---|"]
    for L, c, w, lo, hi in rows:
        out.append(f"| {L} | {c * 1e3:.2f} | {w * 1e3:.2f} ({lo * 1e3:.1f}-{hi * 1e3:.1f}) | "
                   f"{model_wall(c, cores, SCHED_TICK) * 1e3:.1f} | {model_wall(c, cores, 0.0) * 1e3:.1f} |")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--cpu", type=int, default=1, help="the host CPU to pin to")
    ap.add_argument("--quant", default="f32", choices=("f32", "q4k"),
                    help="f32 safetensors (XLA's dots) or the Q4_K_M GGUF (the compiled kernels)")
    ap.add_argument("--model", type=float, nargs="*", help="no measurement: the model's wall ms for these CPU ms")
    a = ap.parse_args(argv)
    if a.worker >= 0:
        worker(a.worker, a.quant)
        return 0
    if a.model:
        for cores in (0.6, 0.4):
            print("\n".join(table(cores, [(0, c / 1e3, float("nan"), float("nan"), float("nan")) for c in a.model])))
        return 0
    if os.geteuid() != 0:
        print("quota_tick: needs root for the cgroup (or use --model)", file=sys.stderr)
        return 2
    lines = [f"`python experiments/quota_tick.py --quant {a.quant}` on {time.strftime('%Y-%m-%d %H:%M')}, "
             f"load {os.getloadavg()[0]:.2f}", ""]
    for cores in (0.6, 0.4):
        GROUP.mkdir()
        try:
            (GROUP / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (GROUP / "cpu.cfs_quota_us").write_text(str(int(cores * PERIOD_US)))
            (GROUP / "cpu.shares").write_text("8192")
            out = subprocess.run(["sh", "-c", f'echo $$ > {GROUP}/tasks && exec "$0" "$1" --worker "$2" --quant "$3"',
                                  sys.executable, __file__, str(a.cpu), a.quant], capture_output=True, text=True, check=True)
        finally:
            GROUP.rmdir()
        rows = [(int(f[0]), *map(float, f[1:])) for f in (ln.split() for ln in out.stdout.splitlines()) if len(f) == 5]
        lines += table(cores, rows)  # type: ignore[arg-type]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
