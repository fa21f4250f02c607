"""Every system's schedule on the same simulated devices, against the papers' reported results.

prima.cpp Table 4 (prima-d1-d4, Q4K): llama.cpp within +/-30 %, prima within +/-25 % (Halda's
plans, the default planner), exo and dllama OOM at 70B, and the paper's
orderings; MDI-LLM's recurrent pipeline; Bud's batching; PIPO vs FlexGen.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from primasim import load_model
from primasim.core.cluster import ClusterSpec
from primasim.plan.planners import make_plan
from primasim.sim import SimConfig, sim_plan, simulate
from primasim.sim._testbeds import bud_xeon, mdi_jetsons, pipo_laptop

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["llama3-8b", "llama3-14b", "llama1-30b", "llama3-45b", "llama3-60b", "llama1-65b", "llama3-70b"]
CFG = SimConfig(tokens=8)


def _paper() -> dict[tuple[str, str], float]:
    with open(ROOT / "data" / "paper" / "prima_table4.csv") as fh:
        return {(r["model"], r["system"]): float(r["tpot_ms"]) for r in csv.DictReader(fh) if r["tpot_ms"]}


@pytest.fixture(scope="module")
def paper() -> dict[tuple[str, str], float]:
    return _paper()


@pytest.mark.parametrize("name", MODELS)
def test_llamacpp_within_30_percent(d1d4: ClusterSpec, paper: dict, name: str) -> None:
    m = load_model(name, "q4k")
    res = simulate("llama.cpp", m, d1d4, config=CFG)
    assert res.feasible, res.reason
    assert res.tpot_ms == pytest.approx(paper[(name, "llama.cpp")], rel=0.30)


# 30B used to miss (+31-38 %) with the +700 MiB CUDA reserve of later prima.cpp versions, which keeps
# seven layers off the GPUs; the testbed now budgets prima.cpp v1's compute-buffer estimate (the code
# that measured Table 4), see data/clusters/prima-d1-d6.toml and experiments/results/reproduce/.
@pytest.mark.parametrize("name", MODELS)
def test_prima_within_25_percent(d1d4: ClusterSpec, paper: dict, name: str) -> None:
    m = load_model(name, "q4k")
    res = simulate("prima", m, d1d4, config=CFG)
    assert res.tpot_ms == pytest.approx(paper[(name, "prima")], rel=0.25), res.plan.describe() if res.plan else ""


@pytest.mark.parametrize("name", ["llama3-45b", "llama3-70b"])
def test_the_sim_planner_is_never_worse_than_halda(d1d4: ClusterSpec, name: str) -> None:
    sp = sim_plan(load_model(name, "q4k"), d1d4, config=CFG, max_rounds=3)
    assert sp.tpot_ms <= sp.start_tpot_ms + 1e-9


def test_exo_and_dllama_run_out_of_memory_at_70b(d1d4: ClusterSpec) -> None:
    m = load_model("llama3-70b", "q4k")
    for system in ("exo", "dllama"):
        res = simulate(system, m, d1d4, config=CFG)
        assert not res.feasible and "OOM" in res.reason, (system, res.reason)
        assert res.to_json()["feasible"] is False


def test_orderings_at_8b_and_70b(d1d4: ClusterSpec) -> None:
    """8B: llama.cpp ~ prima < prima w/o Halda < exo < dllama. 70B: prima < llama.cpp < w/o Halda."""
    m8 = load_model("llama3-8b", "q4k")
    t = {s: simulate(s, m8, d1d4, config=CFG).tpot_ms for s in ("llama.cpp", "prima-no-halda", "exo", "dllama")}
    t["prima"] = simulate("prima", m8, d1d4, config=CFG).tpot_ms
    assert t["prima"] == pytest.approx(t["llama.cpp"], rel=0.1)
    assert t["llama.cpp"] < t["prima-no-halda"] < t["exo"] < t["dllama"]
    m70 = load_model("llama3-70b", "q4k")
    p70 = sim_plan(m70, d1d4, config=CFG, max_rounds=2).tpot_ms
    l70 = simulate("llama.cpp", m70, d1d4, config=CFG).tpot_ms
    h70 = simulate("prima-no-halda", m70, d1d4, config=CFG).tpot_ms
    assert p70 < l70 < h70
    assert l70 / p70 > 10  # the paper: 15x


def test_llamacpp_thrashes_between_45b_and_60b(d1d4: ClusterSpec) -> None:
    t45 = simulate("llama.cpp", load_model("llama3-45b", "q4k"), d1d4, config=CFG).tpot_ms
    t60 = simulate("llama.cpp", load_model("llama3-60b", "q4k"), d1d4, config=CFG).tpot_ms
    assert t60 / t45 > 10  # 328 -> 7965 ms in the paper


# ------------------------------------------------------------------ MDI-LLM
def test_mdi_throughput_grows_with_nodes_and_s1_is_the_plain_pipeline() -> None:
    m = load_model("nanollama-304m", "f32")
    cfg = SimConfig(tokens=40, prompt_tokens=16)
    tput = {}
    for n in (1, 2, 3):
        tput[n] = simulate("mdi-llm", m, mdi_jetsons(n), config=cfg, S=3).throughput
    assert tput[1] < tput[2] < tput[3]
    # S = 1: one sequence walks the ring alone -- a plain pipeline: one token per ring trip and
    # never two devices busy at once; with S = 3 the devices overlap
    cl = mdi_jetsons(3)
    one = simulate("mdi-llm", m, cl, config=cfg, S=1)
    three = simulate("mdi-llm", m, cl, config=cfg, S=3)
    assert one.throughput == pytest.approx(1e3 / one.metrics.tpot_ms, rel=0.05)
    busy = lambda r: sum(sum(v for k, v in b.items() if k in ("cpu", "gpu")) for b in r.metrics.busy.values())  # noqa: E731
    assert busy(one) <= 1.02
    assert busy(three) > 1.5
    assert one.throughput < 0.5 * three.throughput


# ------------------------------------------------------------------ Bud
def test_bud_batching_reaches_the_papers_order() -> None:
    """100 requests of ~220 prompt + ~45 generated tokens, CodeLlama-7B bf16 on a 32-vCPU Xeon:
    the paper reports 21.5x generated tokens/s over one request at a time."""
    m = load_model("codellama-7b", "f16")
    cl = bud_xeon()
    cfg = SimConfig(tokens=45, prompt_tokens=220, requests=100)
    serial = simulate("bud", m, cl, config=cfg, batch=1)
    paged = simulate("bud", m, cl, config=cfg)
    prealloc = simulate("bud", m, cl, config=cfg, kv="prealloc", max_len=2048)
    assert serial.throughput == pytest.approx(4.36, rel=0.1)  # the fitted baseline cell
    ratio = paged.throughput / serial.throughput
    assert 15 <= ratio <= 25
    assert prealloc.extra["peak_batch"] < paged.extra["peak_batch"]  # max-length reservations admit fewer
    assert prealloc.throughput < paged.throughput


# ------------------------------------------------------------------ PIPO vs FlexGen
def test_pipo_beats_flexgen_in_the_papers_direction() -> None:
    m = load_model("llama1-30b", "q4k")
    cl = pipo_laptop()
    cfg = SimConfig(tokens=8, prompt_tokens=64)
    out = {}
    for s in ("flexgen", "pipo"):
        plan = make_plan(s, m, cl, batch=64, n_ctx=256).plan
        out[s] = simulate(s, m, cl, plan=plan, config=cfg)
    assert out["pipo"].extra["gpu_util"] > out["flexgen"].extra["gpu_util"]
    assert out["pipo"].throughput > 1.1 * out["flexgen"].throughput


def test_memory_ratio_split_fits_at_45b_and_conflicts_at_70b(d1d4: ClusterSpec) -> None:
    """prima w/o Halda (memory-ratio split, k = 1): at 45B D1's 8 Metal layers fit its memory (the
    paper: 409 ms, no thrashing); at 70B D1's 13-layer window does not, and prefetching that window
    evicts its own pages before use (the prefetch-release conflict): D1 reads more than its window
    per token and prefetching makes TPOT worse, not better."""
    m45 = load_model("llama3-45b", "q4k")
    assert simulate("prima-no-halda", m45, d1d4, config=CFG).tpot_ms < 1000
    m70 = load_model("llama3-70b", "q4k")
    on = simulate("prima-no-halda", m70, d1d4, config=CFG)
    off = simulate("prima-no-halda", m70, d1d4, config=CFG.replace(prefetch=False))
    window = on.plan.totals()["D1"][0] * m70.layer_bytes
    assert on.extra["disk_read_bytes_per_token"]["D1"] > window
    assert on.trace.device_stats["D1"]["cache_wasted_prefetch_bytes"] > 0
    assert on.tpot_ms > 1.2 * off.tpot_ms
