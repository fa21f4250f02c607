"""PIPO vs FlexGen: GPU utilisation and throughput of offloaded inference on one laptop GPU."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

import primasim.loop.reproduce.framework as fw
from primasim.core.model_sources import load_model
from primasim.sim import SimConfig, make_plan, simulate
from primasim.sim._testbeds import pipo_laptop

# =========================================================================== PIPO
PIPO_SRC = "PIPO (arXiv 2504.03664) abstract"


PIPO_CASES = (("llama3-8b", "q4k", 1), ("llama1-30b", "q4k", 16), ("llama1-30b", "q4k", 64), ("llama1-30b", "q4k", 256),
              ("llama3-8b", "f16", 64), ("llama3-8b", "f16", 256))


@fw.register("pipo-offload", "PIPO vs FlexGen: GPU utilisation and throughput on the RTX 3060 laptop (6 GB)", PIPO_SRC)
def _pipo_offload(opts: fw.TargetOptions) -> fw.Output:
    """PIPO's GPU utilisation above FlexGen's and PIPO faster than FlexGen in every case (the
    paper's direction); FlexGen's utilisation below 40 % somewhere in the sweep. The paper's
    magnitudes (PIPO > 90 % utilisation, up to 3.1x throughput) are reported with their ratio, not
    toleranced: the paper does not state the model, batch, placement or per-task times (see README)."""

    cl = pipo_laptop()
    pp = {r["metric"]: r for r in fw.paper_rows("pipo")}
    rows: list[fw.Row] = []
    util: dict[tuple[str, str], float] = {}
    tput: dict[tuple[str, str], float] = {}
    for mn, q, B in PIPO_CASES:
        m = load_model(mn, q)
        case = f"{mn} {q} batch {B}"
        for s in ("flexgen", "pipo"):
            plan = make_plan(s, m, cl, batch=B, n_ctx=256).plan
            r = simulate(s, m, cl, plan=plan, config=SimConfig(tokens=16, prompt_tokens=64, seed=opts.seed))
            util[(case, s)] = 100 * float(r.extra.get("gpu_util", math.nan))
            tput[(case, s)] = r.throughput
            ref_util = fw.num(pp["gpu_util_pct"][s]) if s in pp["gpu_util_pct"] else None
            rows.append(fw.Row(case, s, "gpu_util", "%", util[(case, s)], ref_util, source=pp["gpu_util_pct"]["source"],
                            note=("paper bound: " + ("< 40 %" if s == "flexgen" else "> 90 %")) + "; weights "
                            + str(plan.options.get("weights_home")) if plan is not None else ""))
            rows.append(fw.Row(case, s, "throughput", "tok/s", r.throughput, source=PIPO_SRC))
        rows.append(fw.Row(case, "pipo / flexgen", "throughput_ratio", "x", tput[(case, "pipo")] / tput[(case, "flexgen")],
                        fw.num(pp["throughput_ratio"]["pipo"]), source=pp["throughput_ratio"]["source"],
                        note="paper: up to 3.1x (best case)"))
    cases = [f"{mn} {q} batch {B}" for mn, q, B in PIPO_CASES]
    worse_u = [c for c in cases if util[(c, "pipo")] <= util[(c, "flexgen")]]
    worse_t = [c for c in cases if tput[(c, "pipo")] <= tput[(c, "flexgen")]]
    best = max(tput[(c, "pipo")] / tput[(c, "flexgen")] for c in cases)
    claims = [
        fw.Claim("PIPO's GPU utilisation above FlexGen's in every case", "ordering", not worse_u,
              "ok" if not worse_u else "not in: " + ", ".join(worse_u), PIPO_SRC),
        fw.Claim("PIPO faster than FlexGen in every case", "ordering", not worse_t,
              f"best x{best:.2f} (paper up to 3.1x)" if not worse_t else "not in: " + ", ".join(worse_t), PIPO_SRC),
        fw.Claim("FlexGen's GPU utilisation below 40 % (paper: < 40 %)", "bound",
              min(util[(c, "flexgen")] for c in cases) < 40, f"min {min(util[(c, 'flexgen')] for c in cases):.0f} %",
              PIPO_SRC),
    ]
    return fw.Output(rows, claims, _plot_pipo, notes=[
        "paper's magnitudes not reached: best PIPO/FlexGen ratio and PIPO utilisation here are in the CSV; "
        "removing the per-layer barrier only pays where per-layer demands differ (see README)"])


def _plot_pipo(df: pd.DataFrame) -> Figure:
    fig, (ax, ax2) = fw.new_figure(2, 12, 4.2)
    cases = list(dict.fromkeys(df["case"]))
    x = np.arange(len(cases))
    for i, (s, c) in enumerate((("flexgen", "#7f7f7f"), ("pipo", "#2ca02c"))):
        ax.bar(x - 0.2 + 0.4 * i, [fw.cell_value(df, case=cs, system=s, metric="gpu_util") for cs in cases], 0.4, color=c, label=s)
        ax2.bar(x - 0.2 + 0.4 * i, [fw.cell_value(df, case=cs, system=s, metric="throughput") for cs in cases], 0.4, color=c,
                label=s)
    ax.axhline(40, ls="--", color="#7f7f7f", lw=0.8)
    ax.axhline(90, ls="--", color="#2ca02c", lw=0.8)
    ax.text(len(cases) - 0.5, 91, "paper: PIPO > 90 %", ha="right", fontsize=7)
    ax.text(len(cases) - 0.5, 36, "paper: FlexGen < 40 %", ha="right", fontsize=7)
    for axis, lab in ((ax, "GPU utilisation (%)"), (ax2, "throughput (tokens/s)")):
        axis.set_xticks(x, [c.replace(" batch ", "\nbatch ") for c in cases], fontsize=7)
        axis.set_ylabel(lab)
        axis.legend(fontsize=7)
    fig.suptitle("PIPO vs FlexGen: offloaded inference on an RTX 3060 Laptop (6 GB)")
    return fig
