"""MDI-LLM: throughput and memory per device as nodes are added (recurrent pipeline parallelism)."""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.figure import Figure

import primasim.loop.reproduce.framework as fw
from primasim.core.cluster import ClusterSpec
from primasim.core.model import ModelSpec
from primasim.core.model_sources import load_model
from primasim.core.plan import device_memory
from primasim.sim import SimResult, simulate
from primasim.sim._testbeds import mdi_jetsons

# =========================================================================== MDI-LLM
MDI_SRC = "MDI-LLM README figures / paper Sec. V"


#: Per-node runtime memory besides weights and KV cache: the Python interpreter with PyTorch and CUDA
#: libraries (~450 MB), the HTTP server (150-200 MB) and the communication threads/buffers (150-200 MB),
#: as one secondary summary of the paper itemises them (reference C.5) -- ~0.8 GB per node.
MDI_RUNTIME_BYTES = 0.8e9


def _mdi_memory(res: SimResult, model: ModelSpec, S: int) -> dict[str, float]:
    """GB per node as MDI-LLM allocates it (reference C.4-C.5): the node's weights, a KV cache per
    sample preallocated at the full block size with K/V expanded to every query head (litGPT's
    cache does not keep GQA's saving), at the weights' precision, plus the runtime."""

    assert res.plan is not None
    mem = device_memory(res.plan, model, _cluster_of(res))
    elt = 4 if model.quant == "f32" else 2
    kv_layer = 2 * model.max_context * model.n_heads * model.head_dim * elt
    out = {}
    for d in res.plan.devices:
        if d.layers == 0:
            continue
        m = mem[d.name]
        out[d.name] = (m.weights_cpu + m.weights_gpu + S * d.layers * kv_layer + MDI_RUNTIME_BYTES) / 1e9
    return out


def _cluster_of(res: SimResult) -> ClusterSpec:
    assert res.plan is not None
    return mdi_jetsons(len([d for d in res.plan.devices]))


@fw.register("mdi-llm-nodes", "MDI-LLM: throughput and memory per device vs nodes (NanoLlama, TinyLlama, Jetson TX2)", MDI_SRC)
def _mdi_llm_nodes(opts: fw.TargetOptions) -> fw.Output:
    """throughput (3 samples, recurrent pipeline) within +/-30 % per cell and memory per device
    within +/-25 % per cell (the paper's memory values come from secondary summaries); throughput
    rises with the number of nodes for both models; memory per device falls with it; the plain
    pipeline (S = 1) gains nothing from more nodes; TinyLlama does not fit one TX2."""

    paper = {(r["model"], int(r["nodes"])): r for r in fw.paper_rows("mdi_llm")}
    rows: list[fw.Row] = []
    tput: dict[tuple[str, int, int], float] = {}
    memd: dict[tuple[str, int], float] = {}
    for mn in ("nanollama-304m", "tinyllama-1.1b"):
        m = load_model(mn, "f32")
        for n in (1, 2, 3):
            cl = mdi_jetsons(n)
            cfg = fw.sim_config(opts, tokens=max(40, 4 * opts.tokens), prompt_tokens=16)
            for S in (3, 1):
                r = simulate("mdi-llm", m, cl, config=cfg, S=S)
                pr = paper.get((mn, n), {})
                if not r.feasible:
                    rows.append(fw.Row(mn, f"mdi-llm S={S}", "throughput", "tok/s", None, fw.num(pr.get("throughput_tok_s")),
                                    device=f"{n} nodes", source=pr.get("source", MDI_SRC), note=r.reason[:100]))
                    continue
                tput[(mn, n, S)] = r.throughput
                rows.append(fw.Row(mn, f"mdi-llm S={S}", "throughput", "tok/s", r.throughput,
                                fw.num(pr.get("throughput_tok_s")) if S == 3 else None, device=f"{n} nodes",
                                rel_tol=0.30 if (S == 3 and pr.get("throughput_tok_s")) else None,
                                source=pr.get("source", MDI_SRC), note=pr.get("note", "") if S == 3 else
                                "S = 1: one sequence, plain pipeline"))
                if S == 3:
                    mem = _mdi_memory(r, m, S)
                    memd[(mn, n)] = max(mem.values())
                    rows.append(fw.Row(mn, "mdi-llm S=3", "memory_per_device", "GB", max(mem.values()),
                                    fw.num(pr.get("mem_per_device_gb")), device=f"{n} nodes",
                                    rel_tol=0.25 if pr.get("mem_per_device_gb") else None,
                                    source=pr.get("source", MDI_SRC),
                                    note="max over nodes: " + ", ".join(f"{k} {v:.2f}" for k, v in mem.items())))
    claims: list[fw.Claim] = []
    for mn in ("nanollama-304m", "tinyllama-1.1b"):
        ns = [n for n in (1, 2, 3) if (mn, n, 3) in tput and (mn == "nanollama-304m" or n > 1)]
        vals = [tput[(mn, n, 3)] for n in ns]
        claims.append(fw.Claim(f"{mn}: throughput rises with the number of nodes (S = 3)", "trend",
                            all(a < b for a, b in zip(vals, vals[1:])),
                            " < ".join(f"{v:.1f}" for v in vals) + " tok/s", MDI_SRC))
        mv = [memd[(mn, n)] for n in ns if (mn, n) in memd]
        claims.append(fw.Claim(f"{mn}: memory per device falls with the number of nodes", "trend",
                            all(a > b for a, b in zip(mv, mv[1:])), " > ".join(f"{v:.2f}" for v in mv) + " GB",
                            "MDI-LLM paper Sec. V"))
        s1 = [tput[(mn, n, 1)] for n in ns if (mn, n, 1) in tput]
        claims.append(fw.Claim(f"{mn}: with one sequence (S = 1) more nodes do not raise throughput (plain pipeline)",
                            "trend", max(s1) <= 1.05 * s1[0], " / ".join(f"{v:.1f}" for v in s1) + " tok/s",
                            "MDI-LLM README (n_samples >= n_nodes)"))
    tx2 = mdi_jetsons(1).devices[0].ram_avail / 1e9
    one = memd.get(("tinyllama-1.1b", 1), math.nan)
    claims.append(fw.Claim("tinyllama-1.1b does not fit one TX2 (the paper could not run it on one node)", "oom",
                        one > tx2, f"needs {one:.2f} GB, a TX2 has {tx2:.2f} GB available", MDI_SRC))
    return fw.Output(rows, claims, _plot_mdi, notes=["Jetson TX2 testbed: primasim/sim/_testbeds.py mdi_jetsons "
                                                  "(TX2 bandwidth and MDI-LLM's per-message cost FITTED to NanoLlama "
                                                  "on 1 and 3 nodes; PyTorch's per-block dispatch cost to NanoLlama on 1 node)",
                                                  f"memory per node = weights + 3 full-size KV caches (K/V expanded to every "
                                                  f"head) + {MDI_RUNTIME_BYTES / 1e9:.1f} GB runtime (Python + PyTorch + CUDA "
                                                  "libraries, HTTP server, communication)"])


def _plot_mdi(df: pd.DataFrame) -> Figure:
    fig, (ax, ax2) = fw.new_figure(2, 11, 4.0)
    for mn, c in (("nanollama-304m", "#1f77b4"), ("tinyllama-1.1b", "#d62728")):
        s = fw.select(df, case=mn, metric="throughput", system="mdi-llm S=3")
        ns = [int(d.split()[0]) for d in s["device"]]
        ax.plot(ns, s["predicted"].astype(float), marker="o", color=c, label=f"{mn} simulated")
        ax.scatter(ns, s["paper"].astype(float), marker="x", s=60, color=c, label=f"{mn} paper")
        s1 = fw.select(df, case=mn, metric="throughput", system="mdi-llm S=1")
        ax.plot([int(d.split()[0]) for d in s1["device"]], s1["predicted"].astype(float), ls=":", color=c,
                label=f"{mn} S = 1")
        sm = fw.select(df, case=mn, metric="memory_per_device")
        nm = [int(d.split()[0]) for d in sm["device"]]
        ax2.plot(nm, sm["predicted"].astype(float), marker="o", color=c, label=f"{mn} simulated")
        ax2.scatter(nm, sm["paper"].astype(float), marker="x", s=60, color=c, label=f"{mn} paper")
    ax.set_xlabel("nodes (Jetson TX2)")
    ax.set_ylabel("generated tokens/s (3 samples)")
    ax.set_xticks([1, 2, 3])
    ax.legend(fontsize=6)
    ax2.set_xlabel("nodes")
    ax2.set_ylabel("memory per device (GB)")
    ax2.set_xticks([1, 2, 3])
    ax2.legend(fontsize=6)
    fig.suptitle("MDI-LLM: recurrent pipeline on Jetson TX2s")
    return fig
