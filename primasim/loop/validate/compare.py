"""Predict (simulator, runtime model), run (the runtime on the emulated cluster) and compare: one Row
per quantity (TPOT, TTFT, throughput; per device disk bytes, resident weights, peak memory, memory
pressure)."""

from __future__ import annotations

from typing import Any

import numpy as np

from primasim.core.cluster import ClusterSpec
from primasim.core.model import ModelSpec
from primasim.core.runtime_facts import runtime_model
from primasim.core.trace import metrics
from primasim.core.units import MB, MS
from primasim.runtime.head import RunOptions, run_plan
from primasim.sim import SimConfig, simulate

from ..row import Row, nan_if_none
from .hostload import HostLoad


# ============================================================================ predict, run, compare
def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    """A deterministic prompt of n token ids (random weights have no tokenizer worth using)."""

    return [int(x) for x in np.random.default_rng(seed).integers(1, vocab, size=n)]


def predict(plan: Any, model: ModelSpec, cluster: ClusterSpec, *, tokens: int, prompt_tokens: int,
            seed: int = 0, requests: int | None = None, batch: int | None = None, draft: Any = None,
            **fidelity: Any) -> Any:
    """The simulator's prediction of `plan` as primasim's runtime executes it (`fidelity`: SimConfig
    switches such as cpu_quota_bursts=False, for ablations; `draft`: a DraftSpec, speculative
    decoding with the draft on the head)."""

    cfg = SimConfig(runtime=True, tokens=tokens, prompt_tokens=prompt_tokens, seed=seed, warmup=False,
                    requests=requests or 100, batch=batch, draft=draft, **fidelity)
    return simulate(plan.system, runtime_model(model), cluster, plan=plan, config=cfg)


def measure(plan: Any, weights: Any, cluster: ClusterSpec, *, tokens: int, prompt: list[int], seed: int = 0,
            emulate: bool = True, requests: int | None = None, timeout: float = 300.0,
            residency: str = "planned", draft: str | None = None, draft_tokens: int = 4) -> tuple[Any, HostLoad]:
    """Run `plan` with the runtime on the (emulated) cluster; the result and the host's load
    (`draft`: a draft checkpoint, run on the head, `draft_tokens` per pass)."""

    opts = RunOptions(max_new_tokens=tokens, seed=seed, emulate=emulate, n_requests=requests,
                      token_timeout=timeout, residency=residency, draft=draft, draft_tokens=draft_tokens)
    load = HostLoad().start()
    res = run_plan(plan, weights, cluster, [prompt], opts)
    load.stop()
    return res, load


def compare(sim: Any, run: Any, plan: Any, cluster: ClusterSpec) -> list[Row]:
    """Predicted vs measured: TPOT (mean, P50, P90), TTFT, throughput, and per device the disk bytes
    read per token, the weights kept resident, the peak memory the run added and memory pressure."""

    ps, ms = sim.metrics, metrics(run.trace)
    rows = [Row("", "", "TPOT", "ms", ps.tpot_ms * MS, ms.tpot_ms * MS, device="", scale=MS),
            Row("", "", "TPOT P50", "ms", ps.tpot_p50_ms * MS, ms.tpot_p50_ms * MS, device="", scale=MS),
            Row("", "", "TPOT P90", "ms", ps.tpot_p90_ms * MS, ms.tpot_p90_ms * MS, device="", scale=MS),
            Row("", "", "TTFT", "ms", ps.ttft_ms * MS, ms.ttft_ms * MS, device="", scale=MS),
            Row("", "", "throughput", "tok/s", ps.throughput_tok_s, ms.throughput_tok_s, device="")]
    n_tok = max(1, ms.n_tokens)
    p_tok = max(1, ps.n_tokens)
    res = sim.extra.get("residency", {})
    for d in plan.devices:
        if d.layers == 0 and d.name != plan.devices[0].name:
            continue
        n = d.name
        pst = sim.trace.device_stats.get(n, {})
        mst = run.trace.device_stats.get(n, {})
        rows.append(Row("", "", "disk read per token", "MB", pst.get("disk_read_bytes", 0.0) / p_tok, mst.get("disk_read_bytes", 0.0) / n_tok, device=n, scale=MB))
        if n in res:
            rows.append(Row("", "", "resident weights", "MB", float(res[n]["resident_bytes"]), nan_if_none(mst.get("load_resident_bytes", mst.get("resident_weight_bytes"))), device=n, scale=MB))
        if "cg_mem_max_usage" in mst and "cg_mem_limit" in mst and cluster.device(n).emulate:
            # the run's peak in the device's memory cgroup, above the worker's own footprint
            foot = mst["cg_mem_limit"] - cluster.device(n).emulate.memory_limit  # type: ignore[union-attr]
            pred_peak = float(res.get(n, {}).get("resident_bytes", 0.0)) + float(pst.get("anon_bytes", 0.0))
            if res.get(n, {}).get("mode") == "planned":
                lb = sim.plan.n_layers and float(sim.trace.device_stats.get(n, {}).get("streamed_bytes_per_pass", 0.0))
                lay = [s for s in plan.segments() if s.device == n]
                per_layer = lb / max(1, sum(s.n for s in lay))
                pred_peak += (2 if res[n].get("stream_prefetch") else 1) * per_layer
            rows.append(Row("", "", "peak memory", "MB", pred_peak, mst["cg_mem_max_usage"] - foot, device=n, scale=MB))
        pp, mp = ps.memory_pressure.get(n), ms.memory_pressure.get(n)
        if pp is not None and mp is not None:
            rows.append(Row("", "", "memory pressure", "%", 100 * pp, 100 * mp, device=n))
    return rows
