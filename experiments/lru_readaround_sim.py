"""The simulator's page cache and readahead (primasim/sim/_devices.py, _pagecache.py) on the access
pattern experiments/lru_readaround.py replays on the kernel: one device's windows of llama-mini-300m
Q4_K_M layers scanned lap after lap in a given room, with an 8 MiB readahead window, the rest of the
file its neighbours' bytes. Prints the bytes read per pass over the window's bytes after the first
lap, beside the kernel's from results/lru_readaround.md (measured 2026-12-07), and the simulator
without readahead. A table of what the model misses, for whoever improves it.

    python experiments/lru_readaround_sim.py      # seconds; writes experiments/results/lru_readaround_sim.md
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import simpy

from primasim import load_model
from primasim.core.device import DeviceSpec
from primasim.core.trace import Trace
from primasim.sim import Recorder
from primasim.sim._devices import SimDevice

MODEL = load_model("llama-mini-300m", "q4k")
# (label, windows, room bytes): the cases experiments/lru_readaround.py measured on the kernel
CASES = [("stream-2 k=2 laptop", [[4, 5, 6, 7], [12, 13, 14, 15]], 26.4e6),
         ("stream-2 k=1 laptop", [list(range(8, 16))], 26.4e6),
         ("stream-2 k=2 desktop (no output)", [[0, 1, 2, 3], [8, 9, 10, 11]], 37.0e6),
         ("stream-3 k=4 laptop", [[2], [6], [10], [14]], 35.0e6),
         ("stream-4 k=1 laptop, room 31 MB", [[4, 5, 6, 7]], 31e6),
         ("stream-4 k=1 laptop, room 35 MB", [[4, 5, 6, 7]], 35e6),
         ("stream-4 k=1 laptop, room 37 MB", [[4, 5, 6, 7]], 37e6),
         ("stream-4 k=1 laptop, room 38 MB", [[4, 5, 6, 7]], 38e6)]
RESULTS = Path(__file__).resolve().parent / "results"


def kernel_ratios() -> dict[str, float]:
    """read / window bytes per case with the default advice and no prefetch, from the probe's table."""
    out = {}
    for line in (RESULTS / "lru_readaround.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[1] == "normal" and cells[2] == "off":
            out[cells[0]] = float(cells[5])
    return out


def passes(windows: list[list[int]], room: float, read_ahead: float, laps: int = 5) -> float:
    env = simpy.Environment()
    spec = DeviceSpec(name="d", os="linux", cores=1, ram_total=16e9, ram_avail=room, ram_bw=20e9,
                      cpu_flops={"f32": 1e11}, disk_seq=0.2e9, read_ahead=read_ahead)
    dev = SimDevice(env, spec, MODEL, recorder=Recorder(Trace(source="sim", system="lru_readaround_sim")))
    dev.setup_memory(0.0, mmap=True)
    assert dev.cache is not None
    dev.cache.capacity = room
    lb = float(MODEL.layer_bytes)
    n = max(4, math.ceil(8 * lb / read_ahead)) if read_ahead else 4  # as sim/_runtime.py chunks a layer
    own = sorted({i for w in windows for i in w})
    base = 0
    for i in own:
        dev.register_chunks(i, lb, n, metal=False, base=base)
        base += n
    if read_ahead:
        dev.map_file(MODEL, set(own), lb / n, head=False, base=base)
        dev.cache.large_folios = False  # as sim/_runtime.py leaves it (its comment)
    per: list[float] = []

    def scan():  # type: ignore[no-untyped-def]
        for _ in range(laps):
            b0 = dev.disk_bytes
            for w in windows:
                yield from dev.run_layers(dev.cpu, w, 0.02, name="window")
                yield env.timeout(0.05)  # the rest of the ring computes
            per.append(dev.disk_bytes - b0)

    env.process(scan())
    env.run()
    return sum(per[1:]) / len(per[1:]) / (lb * len(own))


def main() -> int:
    lines = ["# lru: the simulator's page cache against the kernel's", "",
             f"`python experiments/lru_readaround_sim.py` on {time.strftime('%Y-%m-%d %H:%M')}: bytes read per pass "
             "/ the window's bytes after the first lap, the kernel's from results/lru_readaround.md.", "",
             "| device | room MB | kernel | simulator (8 MiB readahead) | simulator (no readahead) |", "|---|---|---|---|---|"]
    kernel = kernel_ratios()
    for label, windows, room in CASES:
        k = f"{kernel[label]:.2f}" if label in kernel else "-"
        lines.append(f"| {label} | {room / 1e6:.1f} | {k} | {passes(windows, room, 8 * 2**20):.2f} | "
                     f"{passes(windows, room, 0.0):.2f} |")
        print(lines[-1], flush=True)
    out = RESULTS / "lru_readaround_sim.md"
    out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
