"""MDI-LLM, Bud and PIPO/FlexGen on their papers' testbeds (primasim.sim._testbeds).

    python experiments/sim_baselines.py [--out experiments/results]

- MDI-LLM: NanoLlama 304M and TinyLlama 1.1B (f32) on 1-3 Jetson TX2, 3 samples (S = 3) and S = 1,
  against the README's 17.9 / 25.9 / 30.3 tok/s (NanoLlama) and 13.4 / 17.9 (TinyLlama, 2-3 nodes).
- Bud: 100 requests, ~220 prompt + ~45 generated tokens, CodeLlama-7B/13B bf16 on a 32-vCPU Xeon:
  one request at a time vs batching with max-length KV preallocation vs the paged (tiled) pool.
- PIPO vs FlexGen on the PIPO laptop (RTX 3060 6 GB): GPU utilisation and throughput over
  batch sizes for an offloaded model.
Writes sim_baselines.csv and sim_baselines.md.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from primasim import load_model, make_plan
from primasim.core.io import atomic_csv_rows, atomic_write_text
from primasim.sim import SimConfig, simulate
from primasim.sim._testbeds import bud_xeon, mdi_jetsons, pipo_laptop

ROOT = Path(__file__).resolve().parents[1]
MDI_PAPER = {("nanollama-304m", 1): 17.9, ("nanollama-304m", 2): 25.9, ("nanollama-304m", 3): 30.3,
             ("tinyllama-1.1b", 2): 13.4, ("tinyllama-1.1b", 3): 17.9}
BUD_PAPER = {("codellama-7b", "serial"): 4.36, ("codellama-7b", "paged"): 93.69, ("codellama-13b", "paged"): 53.89}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    rows: list[dict] = []
    md = ["# Baseline papers on their testbeds (simulated)", "",
          "`python experiments/sim_baselines.py` (numbers in sim_baselines.csv).", ""]
    # ---------------------------------------------------------------- MDI-LLM
    md += ["## MDI-LLM (recurrent pipeline), generated tok/s", "",
           "| model | nodes | S = 1 | S = 3 | paper (S = 3) | busy devices (S = 3) |", "|---|---|---|---|---|---|"]
    for mn in ("nanollama-304m", "tinyllama-1.1b"):
        m = load_model(mn, "f32")
        for n in (1, 2, 3):
            cl = mdi_jetsons(n)
            cfg = SimConfig(tokens=100, prompt_tokens=16)
            r1 = simulate("mdi-llm", m, cl, config=cfg, S=1)
            r3 = simulate("mdi-llm", m, cl, config=cfg, S=3)
            if not r3.feasible:
                md.append(f"| {mn} | {n} | infeasible | infeasible ({r3.reason[:60]}) | "
                          f"{MDI_PAPER.get((mn, n), '-')} | - |")
                continue
            busy = sum(b.get("gpu", 0.0) + b.get("cpu", 0.0) for b in r3.metrics.busy.values())
            rows.append({"experiment": "mdi", "case": f"{mn} x{n}", "variant": "S=1", "value": round(r1.throughput, 2),
                         "paper": "", "unit": "tok/s"})
            rows.append({"experiment": "mdi", "case": f"{mn} x{n}", "variant": "S=3", "value": round(r3.throughput, 2),
                         "paper": MDI_PAPER.get((mn, n), ""), "unit": "tok/s"})
            md.append(f"| {mn} | {n} | {r1.throughput:.1f} | {r3.throughput:.1f} | {MDI_PAPER.get((mn, n), '-')} | "
                      f"{busy:.2f} |")
    md += ["", "Fitted: TX2 effective GPU bandwidth to NanoLlama x1 (17.9), per-message overhead to NanoLlama x3 "
           "(30.3); NanoLlama x2 and every TinyLlama value are predictions. TinyLlama did not run on one TX2 in the "
           "paper; here it fits because the simulated TX2 has no OS/runtime overhead beyond the plan's memory.", ""]
    # ---------------------------------------------------------------- Bud
    md += ["## Bud (CPU batching), 100 requests x (~220 prompt + ~45 generated)", "",
           "| model | one at a time | batching, max-length KV (2048) | batching, paged KV | paged / serial | paper |",
           "|---|---|---|---|---|---|"]
    for mn in ("codellama-7b", "codellama-13b"):
        m = load_model(mn, "f16")
        cl = bud_xeon()
        cfg = SimConfig(tokens=45, prompt_tokens=220, requests=100)
        s = simulate("bud", m, cl, config=cfg, batch=1)
        pre = simulate("bud", m, cl, config=cfg, kv="prealloc", max_len=2048)
        pag = simulate("bud", m, cl, config=cfg)
        for v, r in (("serial", s), ("prealloc", pre), ("paged", pag)):
            rows.append({"experiment": "bud", "case": mn, "variant": v,
                         "value": round(r.throughput, 2) if r.feasible else "infeasible",
                         "paper": BUD_PAPER.get((mn, v), ""), "unit": "generated tok/s"})
        pre_s = f"{pre.throughput:.1f} (peak batch {pre.extra['peak_batch']})" if pre.feasible else "infeasible"
        ratio = pag.throughput / s.throughput
        paper = "21.5x (4.36 -> 93.69)" if mn == "codellama-7b" else "- (53.89 batched)"
        md.append(f"| {mn} | {s.throughput:.2f} | {pre_s} | {pag.throughput:.1f} (peak batch {pag.extra['peak_batch']}) "
                  f"| {ratio:.1f}x | {paper} |")
        rows.append({"experiment": "bud", "case": mn, "variant": "paged/serial", "value": round(ratio, 2),
                     "paper": 21.5 if mn == "codellama-7b" else "", "unit": "x"})
    md += ["", "Fitted: the Xeon's effective RAM bandwidth to CodeLlama-7B one-at-a-time (4.36 tok/s). The AMX rate "
           "is an estimate (40 % of peak); the batched rates and ratios are predictions.", ""]
    # ---------------------------------------------------------------- PIPO vs FlexGen
    md += ["## PIPO vs FlexGen (offloading on the RTX 3060 Laptop 6 GB)", "",
           "| model | batch | weights home | FlexGen tok/s | FlexGen GPU util | PIPO tok/s | PIPO GPU util | PIPO / FlexGen |",
           "|---|---|---|---|---|---|---|---|"]
    cl = pipo_laptop()
    for mn, q in (("llama1-30b", "q4k"), ("llama3-8b", "f16")):
        m = load_model(mn, q)
        for B in (16, 64, 256):
            res = {}
            for s in ("flexgen", "pipo"):
                plan = make_plan(s, m, cl, batch=B, n_ctx=256).plan
                res[s] = simulate(s, m, cl, plan=plan, config=SimConfig(tokens=16, prompt_tokens=64))
            f, p = res["flexgen"], res["pipo"]
            home = p.plan.options.get("weights_home") if p.plan else "?"
            ratio = p.throughput / f.throughput
            md.append(f"| {mn} {q} | {B} | {home} | {f.throughput:.1f} | {f.extra['gpu_util']:.0%} | "
                      f"{p.throughput:.1f} | {p.extra['gpu_util']:.0%} | {ratio:.2f}x |")
            for v, r in (("flexgen", f), ("pipo", p)):
                rows.append({"experiment": "pipo", "case": f"{mn} {q} B={B}", "variant": v,
                             "value": round(r.throughput, 2), "paper": "", "unit": "tok/s"})
                rows.append({"experiment": "pipo", "case": f"{mn} {q} B={B}", "variant": v + " gpu_util",
                             "value": round(r.extra["gpu_util"], 3), "paper": "", "unit": "fraction"})
    md += ["", "Paper: GPU utilisation < 40 % (FlexGen) -> > 90 % (PIPO), up to 3.1x throughput, on an unidentified "
           "INT4 model. The paper does not give the model, batch, prompt/generation lengths, the weight/KV placement, "
           "buffer counts or per-task times; we assumed the planner's placement (GPU-resident layers, the rest "
           "streamed from pinned RAM or the SSD), 2 GPU weight buffers, 4 pinned staging buffers, 64-token prompts, "
           "16 generated tokens, and 0.5 ms of Python issue + synchronisation per FlexGen layer step.", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_csv_rows(out / "sim_baselines.csv", rows, ["experiment", "case", "variant", "value", "paper", "unit"])
    atomic_write_text(out / "sim_baselines.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
