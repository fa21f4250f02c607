"""Sensitivity of prima.cpp's Table 4 to every estimated parameter (issue #15, "no knife edges").

    python experiments/sensitivity.py [--tokens 8] [--only NAME,...]

For each figure of the testbed that a spec sheet or the paper does not pin down (the OS's memory
figures, the devices' estimated rates, the Wi-Fi, the fitted constants at their priors), the whole
pipeline -- Halda plans, the simulator predicts -- runs at the low and high end of its plausible
range, every other figure at its nominal value. Reported per parameter: TPOT of every prima and
llama.cpp cell at low / nominal / high and the largest max/min ratio over the range. The bar: no
prima cell moves more than 2x across a range a spec sheet cannot pin down (llama.cpp's thrashing
cliff is the paper's own, so its cells may).

Writes experiments/results/sensitivity.csv (one row per parameter, value and cell) and
sensitivity.md (the summary).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from primasim import load_model
from primasim.core.cluster import ClusterSpec, load_cluster
from primasim.core.device import DeviceSpec
from primasim.core.io import atomic_csv_rows, atomic_write_text
from primasim.core.units import GB, MBPS, MS, GiB, MiB
from primasim.loop.reproduce.framework import TABLE4_MODELS, paper_rows
from primasim.sim import SimConfig, _fitted as F, simulate

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("prima", "llama.cpp")

Edit = Callable[[ClusterSpec, float], ClusterSpec]


def dev(name: str, fn: Callable[[DeviceSpec, float], DeviceSpec]) -> Edit:
    return lambda cl, v: cl.replace_device(fn(cl.device(name), v))


def devs(names: tuple[str, ...], fn: Callable[[DeviceSpec, float], DeviceSpec]) -> Edit:
    def edit(cl: ClusterSpec, v: float) -> ClusterSpec:
        for n in names:
            cl = cl.replace_device(fn(cl.device(n), v))
        return cl
    return edit


def gpu(fn: Callable[[object, float], object]) -> Callable[[DeviceSpec, float], DeviceSpec]:
    return lambda d, v: d.replace(gpu=fn(d.gpu, v))


def scale_cpu(d: DeviceSpec, f: float) -> DeviceSpec:
    return d.replace(cpu_flops={q: x * f for q, x in d.cpu_flops.items()})


def net(fn: Callable[[object, float], object]) -> Edit:
    return lambda cl, v: ClusterSpec(cl.name, cl.devices, fn(cl.network, v), cl.head, cl.description, cl.path)


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    low: float
    high: float
    nominal: str
    why: str
    edit: Edit | None = None
    fitted: str | None = None  # a fitted constant: the range is prior .. fitted


LINUX = ("D2", "D3")
PARAMS = (
    # --- the OS's memory (primasim/sim/_pagecache.py)
    Param("avail_reported_fraction (D2, D3, D4)", 0.8, 1.0, "0.8",
          "prima.cpp's profiler reports 80 % of MemAvailable; 1.0 if the paper printed MemAvailable itself",
          devs(("D2", "D3", "D4"), lambda d, v: d.replace(avail_fraction=v))),
    Param("swap_avail_gib (D2, D3)", 0.0, 8.0, "4 / 8", "no swap at all .. an 8 GiB swap file",
          devs(LINUX, lambda d, v: d.replace(swap_avail=v * GiB, swap_total=max(d.swap_total, v * GiB)))),
    Param("anon_other share (all)", 0.5, 0.9, "0.75", "share of the memory the OS does not report available that "
          "is other processes' anonymous memory (the rest: kernel, drivers)",
          devs(("D1", "D2", "D3", "D4"), lambda d, v: d.replace(anon_other=v * max(0.0, d.ram_total - d.os_avail)))),
    Param("ram_total_gib (D3)", 16, 64, "32", "the paper gives D3's available RAM only",
          dev("D3", lambda d, v: d.replace(ram_total=max(v * GiB, d.os_avail)))),
    Param("ram_total_gib (D2)", 8, 32, "16", "the paper gives D2's available RAM only",
          dev("D2", lambda d, v: d.replace(ram_total=max(v * GiB, d.os_avail)))),
    Param("idle_anon_fraction (D1, macOS)", 0.2, 0.8, "0.5", "what the compressor can take from other apps",
          dev("D1", lambda d, v: d.replace(idle_anon=v))),
    Param("zram compress_ratio (D4)", 2.0, 4.0, "2.5", "lz4 zram ratios on phones",
          dev("D4", lambda d, v: d.replace(compress_ratio=v))),
    Param("lmk_cached_gib (D4)", 0.0, 1.0, "0.5", "cached apps lmkd kills first",
          dev("D4", lambda d, v: d.replace(lmk_cached=v * GiB))),
    Param("swap_avail_gib (D4, zram)", 0.0, 4.0, "2", "zram device free space",
          dev("D4", lambda d, v: d.replace(swap_avail=v * GiB))),
    # --- estimated rates
    Param("D1 Metal budget (vram_avail_gib)", 2.4, 5.3, "4.2", "ram_avail .. recommendedMaxWorkingSetSize",
          dev("D1", gpu(lambda g, v: dataclasses.replace(g, vram_avail=v * GiB)))),
    Param("D1 GPU FLOPS (x)", 0.5, 1.5, "1.1 TFLOPS q4k", "M1 GPU 2.6 TFLOPS FP32 peak, 30-70 % for K-quants",
          dev("D1", gpu(lambda g, v: dataclasses.replace(g, flops={q: x * v for q, x in g.flops.items()})))),
    Param("D1 memory bandwidth (GB/s)", 40, 68, "60", "LPDDR4X-4266 peak 68 GB/s",
          dev("D1", lambda d, v: d.replace(ram_bw=v * GB, gpu=dataclasses.replace(d.gpu, mem_bw=v * GB)))),
    Param("D2, D3 GPU FLOPS (x)", 0.5, 1.5, "12 TFLOPS q4k", "int8 MMQ, 40-100 % of the FP32 peak",
          devs(LINUX, gpu(lambda g, v: dataclasses.replace(g, flops={q: x * v for q, x in g.flops.items()})))),
    Param("D4 CPU FLOPS (x)", 0.5, 1.5, "100 GFLOPS q4k", "Kirin 9000 sdot, 25-60 % of peak", dev("D4", scale_cpu)),
    Param("D4 memory bandwidth (GB/s)", 15, 40, "25", "LPDDR5 44 GB/s peak", dev("D4", lambda d, v: d.replace(ram_bw=v * GB))),
    Param("D1 CPU FLOPS (x)", 0.5, 1.5, "300 GFLOPS q4k", "M1 CPU cluster", dev("D1", scale_cpu)),
    Param("PCIe (GB/s, D2 D3)", 6, 16, "12", "PCIe 3.0 x8 .. 4.0 x16 effective",
          devs(LINUX, gpu(lambda g, v: dataclasses.replace(g, pcie_bw=v * GB)))),
    Param("GPU compute reserve (MiB, D1-D3)", 256, 700, "256", "prima.cpp v1's estimate .. the later +700 MiB",
          devs(("D1", "D2", "D3"), gpu(lambda g, v: dataclasses.replace(g, compute_buffer=v * MiB)))),
    Param("KV-copy time (ms, all)", 0.001, 0.01, "0.002-0.004", "profiled per device by prima.cpp; not in the paper",
          devs(("D1", "D2", "D3", "D4"), lambda d, v: d.replace(kv_copy=v * MS))),
    # --- the network (the paper gives ranges)
    Param("Wi-Fi latency (ms)", 3, 7, "3", "paper: 3-7 ms", net(lambda n, v: dataclasses.replace(n, latency=v * MS))),
    Param("Wi-Fi bandwidth (Mbps)", 320, 610, "465", "paper: 320-610 Mbps",
          net(lambda n, v: dataclasses.replace(n, bandwidth=v * MBPS))),
    Param("Wi-Fi jitter (ms)", 0.0, 2.0, "1", "std-dev of the per-message latency",
          net(lambda n, v: dataclasses.replace(n, jitter=v * MS))),
    Param("Wi-Fi TXOP overhead (us)", 0, 400, "190", "802.11ac/ax timing, more with contention",
          net(lambda n, v: dataclasses.replace(n, txop_overhead=v * 1e-6))),
    # --- the fitted constants, prior .. fitted
    *(Param(f"{n} (fitted)", 0.0, 0.0, "fitted", F.FITTED[n].prior_source, fitted=n)
      for n in ("x86_dram_eff", "x86_flops_eff", "cuda_vram_eff", "linux_idle_anon")),
)


def run_cells(cl: ClusterSpec, cfg: SimConfig) -> dict[tuple[str, str], float]:
    out = {}
    for mn in TABLE4_MODELS:
        m = load_model(mn, "q4k")
        for s in SYSTEMS:
            r = simulate(s, m, cl, config=cfg)
            out[(mn, s)] = r.tpot_ms if r.feasible else float("inf")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--only", default="", help="';'-separated figure names to run (default: all)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = ap.parse_args()
    t0 = time.time()
    cfg = SimConfig(tokens=args.tokens)
    base_cl = load_cluster("prima-d1-d4")
    paper = {(r["model"], r["system"]): float(r["tpot_ms"]) for r in paper_rows("prima_table4") if r["tpot_ms"]}
    nominal = run_cells(base_cl, cfg)
    rows: list[dict] = []
    md = ["# Sensitivity of Table 4 to every estimated figure", "",
          f"`python experiments/sensitivity.py --tokens {args.tokens}` (plan + simulate each cell; one figure at a "
          "time at the ends of its plausible range, the rest nominal). Columns: the largest max/min ratio of TPOT "
          "over {low, nominal, high} among the prima cells and among the llama.cpp cells, and the cell where it "
          "happens. The bar: no prima cell moves more than 2x.", "",
          "| figure | range | nominal | why this range | prima: max ratio (cell) | llama.cpp: max ratio (cell) |",
          "|---|---|---|---|---|---|"]
    only = set(filter(None, args.only.split(";")))
    worst_prima = 0.0
    for p in PARAMS:
        if only and p.name not in only:
            continue
        res = {"nominal": nominal}
        if p.fitted:
            f = F.FITTED[p.fitted]
            with F.override({p.fitted: f.prior}):
                res["low"] = run_cells(F.calibrated(base_cl), cfg)
            lo_s, hi_s = f"{f.prior:.3g} (prior)", f"{f.value:.3g} (fitted)"
        else:
            assert p.edit is not None
            res["low"] = run_cells(p.edit(base_cl, p.low), cfg)
            res["high"] = run_cells(p.edit(base_cl, p.high), cfg)
            lo_s, hi_s = f"{p.low:g}", f"{p.high:g}"
        cells = {}
        for key in nominal:
            vals = [r[key] for r in res.values()]
            ratio = max(vals) / min(vals)
            cells[key] = ratio
            for which, r in res.items():
                rows.append({"figure": p.name, "at": which, "value": {"low": lo_s, "high": hi_s}.get(which, p.nominal),
                             "model": key[0], "system": key[1], "tpot_ms": round(r[key], 1),
                             "paper_ms": paper.get(key), "ratio_over_range": round(ratio, 3)})
        out = []
        for s in SYSTEMS:
            k = max((c for c in cells if c[1] == s), key=lambda c: cells[c])
            out.append(f"{cells[k]:.2f}x ({k[0]})")
            if s == "prima":
                worst_prima = max(worst_prima, cells[k])
        md.append(f"| {p.name} | {lo_s} .. {hi_s} | {p.nominal} | {p.why} | {out[0]} | {out[1]} |")
        print(md[-1], flush=True)
    md += ["", f"Largest prima ratio over any single range: **{worst_prima:.2f}x** "
           f"({'within' if worst_prima <= 2 else 'beyond'} the 2x bar). Elapsed {time.time() - t0:.0f} s.",
           "", "Per cell and value: sensitivity.csv."]
    outdir = Path(args.out)
    atomic_csv_rows(outdir / "sensitivity.csv", rows, list(rows[0]))
    atomic_write_text(outdir / "sensitivity.md", "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
