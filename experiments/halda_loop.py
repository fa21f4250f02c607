"""Why prima.cpp's Halda loop locks on an overloaded device on the paper's testbed (issue 16, part 2).

Runs our port of prima.cpp's ``assign_layers_to_device`` (primasim.plan.halda, ``--planner loop``) on
prima-d1-d4 for every Table 4 Llama, in the two revisions of prima.cpp that matter:

- ``head``: prima.cpp main (2025-07): GPU layers start at n = w ("assume all layers can run on
  GPU"), device selection (drop devices given one layer, re-run);
- ``v1``: commit f97a9700 (2025-04-07), the code behind the paper's Table 4 for >= 30B (v2's table
  repeats v1's numbers, and v1 gave every device >= 1 layer): GPU layers start at n = 0, as the
  paper's Algorithm 1 says, and no device selection.

For each: the plan, the sets it ends in, prima.cpp's own objective, the paper-variant cost model's
TPOT, the simulated TPOT (primasim.sim, 16 tokens) and the paper's measurement. Then the
iteration-by-iteration trace at 70B, and how the v1 plans move when the testbed's inputs move
(the inputs are estimates: data/clusters/prima-d1-d6.toml).

    python experiments/halda_loop.py       # -> experiments/results/halda_loop.md (about a minute)
"""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path
from typing import Any

from primasim import load_model
from primasim.core.cluster import ClusterSpec, load_cluster
from primasim.core.io import atomic_write_text
from primasim.core.units import GiB, MiB
from primasim.plan.cost import CostModel, predict_tpot
from primasim.plan.halda import _init_split, halda
from primasim.plan.halda_common import _ring
from primasim.sim import SimConfig, simulate

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["llama3-8b", "llama3-14b", "llama1-30b", "llama3-45b", "llama3-60b", "llama1-65b", "llama3-70b"]
CFG = SimConfig(tokens=16)


def _cell(plan: Any, sets: list[str]) -> str:
    return ", ".join(f"{d.name} {d.layers}({d.gpu_layers})" + (f" {s}" if s not in ("M4", "-") else "")
                     for d, s in zip(plan.devices, sets) if d.layers)


def _run(model: Any, cluster: ClusterSpec, **kw: Any) -> dict[str, Any]:
    r = halda(model, cluster, **kw)
    sim = simulate("prima", model, cluster, plan=r.plan, config=CFG)
    return {"plan": _cell(r.plan, r.sets), "objective": r.objective * 1e3,
            "tpot": predict_tpot(r.plan, model, cluster) * 1e3, "sim": sim.tpot_ms, "result": r}


def _start(model: Any, cluster: ClusterSpec, revision: str) -> str:
    ring = _ring(cluster)
    cm = CostModel(model, [cluster.device(n) for n in ring], cluster.network, 0, n_ctx=1024, variant="code")
    w, n = _init_split(cm, revision)
    from primasim.plan.cost import totals_of

    lt, lg, _ = totals_of(w, n, cm.L)
    sets = cm.sets(lt, lg)
    return ", ".join(f"{nm} {int(a)}({int(b)}) {s}" for nm, a, b, s in zip(ring, w, n, sets))


def _caps(model: Any, cluster: ClusterSpec) -> str:
    ring = _ring(cluster)
    cm = CostModel(model, [cluster.device(n) for n in ring], cluster.network, 0, n_ctx=1024, variant="code")
    return ", ".join(f"{nm}: fits {cf:.2f} layers, GPU {g:.2f}, disk {s / 1e9:.2f} GB/s"
                     for nm, cf, g, s in zip(ring, cm.cap_fit, cm.gpu_cap, cm.disk))


def _variant(cluster: ClusterSpec, what: str) -> ClusterSpec:
    """The testbed with one input moved (for the sensitivity table)."""
    def dev(name: str, **ch: Any) -> ClusterSpec:
        d = cluster.device(name)
        if ch.get("gpu"):
            ch["gpu"] = dataclasses.replace(d.gpu, **ch["gpu"])  # type: ignore[arg-type]
        nd = dataclasses.replace(d, **ch)
        return dataclasses.replace(cluster, devices=tuple(nd if x.name == name else x for x in cluster.devices))

    if what == "D1 Metal budget 5.3 GiB (recommendedMaxWorkingSetSize)":
        return dev("D1", gpu={"vram_avail": 5.3 * GiB})
    if what == "D1 without Metal (CPU build)":
        return dev("D1", gpu=None, uma=False)
    if what == "D3 RAM available 11 GiB":
        return dev("D3", ram_avail=11.0 * GiB)
    if what == "D2 RAM available 5 GiB":
        return dev("D2", ram_avail=5.0 * GiB)
    if what == "HEAD's GPU reserves (+700 MiB CUDA, +300 MiB Metal)":
        c = cluster
        for nm, extra in (("D1", 300), ("D2", 700), ("D3", 700)):
            g = c.device(nm).gpu
            assert g is not None
            c = _variant_gpu(c, nm, compute_buffer=g.compute_buffer + extra * MiB)
        return c
    raise ValueError(what)


def _variant_gpu(cluster: ClusterSpec, name: str, **ch: Any) -> ClusterSpec:
    d = cluster.device(name)
    nd = dataclasses.replace(d, gpu=dataclasses.replace(d.gpu, **ch))  # type: ignore[arg-type]
    return dataclasses.replace(cluster, devices=tuple(nd if x.name == name else x for x in cluster.devices))


SENSITIVITY = ["D1 Metal budget 5.3 GiB (recommendedMaxWorkingSetSize)", "D1 without Metal (CPU build)",
               "D3 RAM available 11 GiB", "D2 RAM available 5 GiB", "HEAD's GPU reserves (+700 MiB CUDA, +300 MiB Metal)"]


def main() -> None:
    t0 = time.time()
    with open(ROOT / "data/paper/prima_table4.csv", newline="") as fh:
        paper = {(r["model"], r["system"]): r for r in csv.DictReader(fh)}
    c4 = load_cluster("prima-d1-d4")
    out = ["# Why prima.cpp's loop locks on the paper's testbed (prima-d1-d4, Q4K, head D3)", "",
           "`python experiments/halda_loop.py` (reproduces this file). Plans: device window(GPU layers) and the set "
           "when not M4. objective = what prima.cpp's Halda computes for its plan (code variant); cost model = "
           "the paper variant with communication (what `primasim plan` reports); simulated = primasim.sim, 16 "
           "tokens; paper = prima.cpp's measured TPOT (Table 4).", "",
           "| model | revision | plan | objective ms | cost model ms | simulated ms | paper ms |",
           "|---|---|---|---|---|---|---|"]
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for name in MODELS:
        m = load_model(name, "q4k")
        p = paper.get((name, "prima"), {}).get("tpot_ms", "")
        for rev, label, kw in (("head", "HEAD, device selection", {"revision": "head"}),
                               ("v1", "v1, no device selection", {"revision": "v1", "select_devices": False}),
                               ("model", "global model (default planner)", {"global_opt": True, "variant": "paper",
                                                                            "comm": True})):
            r = _run(m, c4, **kw)
            rows[(name, rev)] = r
            out.append(f"| {name} | {label} | {r['plan']} | {r['objective']:.0f} | {r['tpot']:.0f} | {r['sim']:.0f} "
                       f"| {p} |")
    m70 = load_model("llama3-70b", "q4k")
    out += ["", "## The 70B trace, step by step", "",
            "Per-device capacities (code variant, n_ctx 1024; layers of b' = weights + KV): " + _caps(m70, c4) + ".", ""]
    for rev in ("head", "v1"):
        r = halda(m70, c4, revision=rev, select_devices=rev == "head")  # type: ignore[arg-type]
        out += [f"**{rev}**: start (memory-ratio windows, GPU layers, sets): {_start(m70, c4, rev)}", "", "```"]
        out += r.trace + ["```", ""]
    out += ["## How the v1 plans move with the inputs", "",
            "Each row moves one estimated input of `data/clusters/prima-d1-d6.toml` (the paper gives only RAM, VRAM "
            "and disk speeds); v1 without device selection, simulated ms (plan).", "",
            "| input | " + " | ".join(MODELS[2:]) + " |", "|---|" + "---|" * len(MODELS[2:])]
    for what in ["as in the cluster file"] + SENSITIVITY:
        c = c4 if what == "as in the cluster file" else _variant(c4, what)
        cells = []
        for name in MODELS[2:]:
            try:
                r = _run(load_model(name, "q4k"), c, revision="v1", select_devices=False)
                cells.append(f"{r['sim']:.0f} ({r['plan']})")
            except Exception as e:  # noqa: BLE001 -- a refused plan is a result here
                cells.append(f"refused: {e}")
        out.append(f"| {what} | " + " | ".join(cells) + " |")
    out += ["", "Paper (Table 4, prima.cpp): " + ", ".join(
        f"{n} {paper.get((n, 'prima'), {}).get('tpot_ms', '')}" for n in MODELS[2:]) + " ms.",
            "", f"({(time.time() - t0) / 60:.1f} min)"]
    text = "\n".join(out) + "\n"
    atomic_write_text(ROOT / "experiments/results/halda_loop.md", text)
    print(text)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
