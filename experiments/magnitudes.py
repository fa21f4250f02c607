"""The other papers' magnitudes the simulator does not reach, and why (issue #15, part 7).

    python experiments/magnitudes.py [--tokens 8]

1. PIPO vs FlexGen on PIPO's laptop (RTX 3060 Laptop 6 GB): every placement the planners offer
   (weights in pinned RAM or on the SSD, KV on the CPU or the GPU), batch 1-512, four models, and
   FlexGen's per-layer Python/sync cost across 0.1-2 ms. Reported: the largest PIPO / FlexGen
   throughput ratio and PIPO's largest GPU utilisation anywhere, the utilisation pair where the
   ratio peaks, and the bound a barrier can cost: FlexGen pays per layer the slowest of its
   concurrent tasks (with the SSD read and the host-to-device copy of a layer chained), PIPO the
   busiest resource over the whole step, so the ratio cannot exceed sum(stage) / max(stage) per
   layer (<= 2 with one chain of two) plus the sync cost over the layer time.
2. Fig. 10's MemSched at 60-70B: the plan MemSched makes, what prima.cpp's *own* cost model
   (Eq. 16, macOS with Metal: the whole slice is re-read when it overflows the Metal budget)
   predicts for it, and what the simulator predicts; and Halda over PerfSched as each estimated
   figure of the Fig. 10 devices moves across its range.
3. Fig. 8's fastest device set as D1's Metal budget (an estimate) and D5's CPU rate move.

Writes experiments/results/magnitudes.md and magnitudes.csv.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from pathlib import Path

from primasim import load_model, make_plan
from primasim.core.cluster import load_cluster
from primasim.core.io import atomic_csv_rows, atomic_write_text
from primasim.core.units import GiB
from primasim.plan.cost import predict_tpot
from primasim.sim import SimConfig, _offload, simulate
from primasim.sim._testbeds import pipo_laptop

ROOT = Path(__file__).resolve().parents[1]


def pipo(tokens: int, rows: list[dict], md: list[str]) -> None:
    cl = pipo_laptop()
    cfg = SimConfig(tokens=tokens, prompt_tokens=64)
    best = best_util = best_streamed = None
    n = 0
    for (mn, q), B, home, kv, sync in itertools.product(
            (("llama3-8b", "f16"), ("llama3-8b", "q4k"), ("llama1-30b", "q4k"), ("llama3-70b", "q4k")),
            (1, 4, 16, 64, 256, 512), ("cpu", "disk"), ("cpu", "gpu"), (0.1e-3, 0.5e-3, 2e-3)):
        m = load_model(mn, q)
        out = make_plan("pipo", m, cl, batch=B, n_ctx=256, weights_home=home)
        if not out.feasible or out.plan is None:
            continue
        plan = out.plan.replace(options={**out.plan.options, "kv_home": kv})
        _offload.FLEXGEN_SYNC_OVERHEAD = sync
        res = {}
        for s in ("flexgen", "pipo"):
            r = simulate(s, m, cl, plan=plan.replace(system=s), config=cfg)
            if not r.feasible:
                break
            res[s] = (r.throughput, 100 * float(r.extra.get("gpu_util", float("nan"))))
        if len(res) < 2:
            continue
        n += 1
        ratio = res["pipo"][0] / res["flexgen"][0]
        streamed = int(plan.options.get("resident_layers", m.n_layers)) < m.n_layers
        row = {"part": "pipo", "case": f"{mn} {q} b{B} w:{home} kv:{kv} sync {sync * 1e3:g} ms", "ratio": round(ratio, 3),
               "streamed": streamed,
               "flexgen_util": round(res["flexgen"][1], 1), "pipo_util": round(res["pipo"][1], 1),
               "flexgen_tok_s": round(res["flexgen"][0], 2), "pipo_tok_s": round(res["pipo"][0], 2)}
        rows.append(row)
        if best is None or ratio > best["ratio"]:
            best = row
        if streamed and (best_streamed is None or ratio > best_streamed["ratio"]):
            best_streamed = row
        if best_util is None or row["pipo_util"] > best_util["pipo_util"]:
            best_util = row
    _offload.FLEXGEN_SYNC_OVERHEAD = 0.5e-3
    assert best is not None and best_util is not None and best_streamed is not None
    at = {r["case"].rsplit(" sync ", 1)[1]: r["ratio"] for r in rows
          if r["part"] == "pipo" and r["case"].startswith(best["case"].rsplit(" sync ", 1)[0] + " sync ")}
    md += ["## 1. PIPO vs FlexGen (RTX 3060 Laptop 6 GB, i7-11800H, 16 GB, NVMe)", "",
           f"{n} configurations (4 models x batch 1-512 x weights in RAM / on the SSD x KV on CPU / GPU x "
           "FlexGen's per-layer Python issue + stream synchronisation 0.1 / 0.5 / 2 ms, an estimate).", "",
           "| | case | PIPO / FlexGen | FlexGen util | PIPO util |", "|---|---|---|---|---|"]
    for label, r in (("largest ratio", best), ("largest ratio where layers stream", best_streamed),
                     ("largest PIPO utilisation", best_util)):
        md.append(f"| {label} | {r['case']} | {r['ratio']:.2f}x | {r['flexgen_util']:.0f} % | {r['pipo_util']:.0f} % |")
    md += ["", f"The paper: up to 3.1x, FlexGen < 40 % -> PIPO > 90 %. **Reached by mechanism** in one regime: the "
           f"model fits the 6 GB GPU at INT4 (nothing streams) and FlexGen's per-layer issue + synchronisation, "
           f"a fixed cost per layer, is larger than the layer's compute, so the barrier idles the GPU; the ratio "
           f"there is {' / '.join(f'{v:.2f}x at {k}' for k, v in sorted(at.items()))} of FlexGen's per-layer cost. "
           f"Where layers stream over PCIe the gain is at most {best_streamed['ratio']:.2f}x: removing a barrier "
           "saves the difference between a layer's chained stages (FlexGen reads a layer from the SSD, then copies "
           "it to the GPU) and the busiest resource, at most 2x for two balanced stages, plus the sync cost. The "
           "paper names neither its model nor its batch; `pipo-offload` keeps 0.5 ms per layer and reports both "
           "regimes.", ""]


def fig10(tokens: int, rows: list[dict], md: list[str]) -> None:
    cl = load_cluster("prima-fig10")
    cfg = SimConfig(tokens=tokens)
    md += ["## 2. Fig. 10: Halda vs MemSched and PerfSched at 60-70B", "",
           "| model | MemSched's plan | MemSched, prima.cpp's cost model (paper variant) | MemSched, simulated | "
           "Halda, simulated | paper's Halda / MemSched |", "|---|---|---|---|---|---|"]
    for mn in ("llama3-60b", "llama3-70b"):
        m = load_model(mn, "q4k")
        ms = simulate("memsched", m, cl, config=cfg)
        h = simulate("prima", m, cl, config=cfg)
        assert ms.plan is not None
        cm = predict_tpot(ms.plan, m, cl, variant="paper", comm=True) * 1e3
        rows.append({"part": "fig10-memsched", "case": mn, "plan": ms.plan.describe(), "cost_model_ms": round(cm),
                     "sim_ms": round(ms.tpot_ms), "halda_ms": round(h.tpot_ms)})
        md.append(f"| {mn} | {ms.plan.describe()} | {cm:.0f} ms ({cm / h.tpot_ms:.1f}x Halda) | {ms.tpot_ms:.0f} ms | "
                  f"{h.tpot_ms:.0f} ms | 1.9-3.3x |")
    md += ["", "MemSched splits by memory, so the Mac Mini takes a slice larger than its Metal budget; by prima.cpp's "
           "own Eq. 16 (macOS with Metal re-reads the whole slice once it overflows, at the random-read rate) that "
           "plan costs the first column -- the paper's 1.9-3.3x cannot follow from this split on this hardware; "
           "it needs the Mac Mini's slice to fit (a smaller share) or a much faster disk.", ""]
    # Halda over PerfSched as the estimated figures move
    m = load_model("llama3-70b", "q4k")
    md += ["| Fig. 10 figure moved (70B) | range | Halda / PerfSched at low .. high (nominal) |", "|---|---|---|"]

    def ratio(c) -> float:  # noqa: ANN001
        return simulate("perfsched", m, c, config=cfg).tpot_ms / simulate("prima", m, c, config=cfg).tpot_ms

    nominal = ratio(cl)

    def scale_cpu(d, f):  # noqa: ANN001, ANN202
        return d.replace(cpu_flops={q: x * f for q, x in d.cpu_flops.items()})

    for label, names, fn, lo, hi in (
            ("laptop + PC CPU FLOPS (x)", ("Laptop", "PC"), scale_cpu, 0.5, 1.5),
            ("laptop + PC RAM bandwidth (x)", ("Laptop", "PC"), lambda d, f: d.replace(ram_bw=d.ram_bw * f), 0.6, 1.3),
            ("Mac Mini Metal budget (GiB)", ("MacMini",),
             lambda d, v: d.replace(gpu=dataclasses.replace(d.gpu, vram_avail=v * GiB)), 8.0, 10.7),
            ("Redmi CPU FLOPS (x)", ("Redmi",), scale_cpu, 0.5, 1.5)):
        vals = []
        for v in (lo, hi):
            c = cl
            for nme in names:
                c = c.replace_device(fn(c.device(nme), v))
            vals.append(ratio(c))
        rows.append({"part": "fig10-perfsched", "case": label, "low": vals[0], "high": vals[1], "nominal": nominal})
        md.append(f"| {label} | {lo:g} .. {hi:g} | {vals[0]:.2f} .. {vals[1]:.2f} ({nominal:.2f}) |")
    md += ["", "The paper: 1.6-1.8x at 60-70B.", ""]


def fig8(tokens: int, rows: list[dict], md: list[str]) -> None:
    cl = load_cluster("prima-d1-d6")
    m = load_model("llama3-70b", "q4k")
    cfg = SimConfig(tokens=tokens)
    sets = (("D2", "D3", "D5"), ("D1", "D2", "D3"), ("D1", "D2", "D3", "D5"), ("D1", "D2", "D3", "D4"))
    md += ["## 3. Fig. 8: the fastest device set for Llama 3-70B", "",
           "| D1 Metal budget (GiB) | D5 CPU (x) | " + " | ".join("+".join(s) for s in sets) + " | fastest |",
           "|---|---|" + "---|" * len(sets) + "---|"]
    for budget, d5 in itertools.product((2.4, 3.2, 4.2), (1.0, 2.0)):
        c = cl.replace_device(cl.device("D1").replace(gpu=dataclasses.replace(cl.device("D1").gpu, vram_avail=budget * GiB)))
        c = c.replace_device(c.device("D5").replace(cpu_flops={q: x * d5 for q, x in c.device("D5").cpu_flops.items()}))
        t = {"+".join(s): simulate("prima", m, c.subset(list(s)), config=cfg).tpot_ms for s in sets}
        best = min(t, key=t.get)  # type: ignore[arg-type]
        rows.append({"part": "fig8", "case": f"D1 Metal {budget} GiB, D5 CPU x{d5}", **{k: round(v) for k, v in t.items()},
                     "fastest": best})
        md.append(f"| {budget} | {d5:g} | " + " | ".join(f"{v:.0f}" for v in t.values()) + f" | {best} |")
    md += ["", "The paper: {D2, D3, D5} is the fastest. D1's Metal budget (what macOS lets Metal use on an 8 GB M1 "
           "with 2.4 GiB free) and D5's CPU rate are estimates the paper does not give.", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()
    t0 = time.time()
    rows: list[dict] = []
    md = ["# The other papers' magnitudes: closed by mechanism, or why they cannot follow", "",
          f"`python experiments/magnitudes.py --tokens {args.tokens}`", ""]
    for part in (pipo, fig10, fig8):
        part(args.tokens, rows, md)
        print("\n".join(md[-12:]), flush=True)
    md.append(f"Elapsed {time.time() - t0:.0f} s.")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    atomic_csv_rows(ROOT / "experiments" / "results" / "magnitudes.csv", rows, keys)
    atomic_write_text(ROOT / "experiments" / "results" / "magnitudes.md", "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
