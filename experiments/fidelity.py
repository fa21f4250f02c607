"""Fidelity of the simulator against primasim's runtime on the emulated home cluster.

Every configuration is planned on a *profiled* cluster (each device measured inside its emulated
limits by `primasim.loop.validate.calibrate.profile_cluster`), simulated as the runtime executes it
(`SimConfig(runtime=True)`) and run on the emulated cluster (`primasim.runtime.head.run_plan`). Reported,
as the simulators of reference §2 do (Vidur, BLIS, LLMServingSim): per metric the median and P90
absolute percentage error, per regime and per split (fitted vs held out), and whether the
predicted ranking of the plans of one cluster matches the measured one (Kendall tau).

Longer than ~600 lines: one study's whole pipeline (configurations, profiling, the fit on the
training subset, runs, error tables, ranking) kept in one script so a run reads top to bottom.

Regimes: memory-short (devices stream part of every layer from disk every token), memory-rich
(everything resident), bandwidth-limited links, the recurrent pipeline (MDI-LLM, S = 1..4) and
batched decode (Bud). Planners: Halda (prima, global and prima.cpp's loop), the memory-ratio split
(prima-no-halda), even splits with k = 1..4; prefetch on and off; 2-4 devices.

Plans of one group that are the same plan count once in its ranking: the same segments (planners
that return the same split), or prefetch on where no device has room to read ahead (the simulated
residency gives no device a second streamed part: prefetch on and off then run identically).

The streaming regime (issue 15 part 6, `--only stream`): every device short of memory for its
share of the model (variant `stream`), 2, 3 and 4 devices x residency planned and lru (both in one
study, whatever --residency says) x even splits k = 1..4 with prefetch on, k = 1..4 with prefetch
off, and Halda: 42 configurations, all held out, ranked per group (devices x residency). Meant
for `--quant q4k` (the papers' Q4_K_M); it runs at f32 as well. Whether every device of a plan
really streamed is checked per configuration (measured and predicted disk reads).

Independent runs: `--runs N` repeats the whole study N times into <out>/run1..runN (each profiles
its clusters afresh) and writes <out>/fidelity_spread.md (experiments/fidelity_spread.py): each
run's errors and per-group Kendall tau, and their spread -- a fidelity figure is what re-runs give.

What is fitted, and on what: the simulator's device figures all come from the profile (nothing per
configuration). The only fitted quantities are the global runtime coefficients in `FIT`, fitted on
the configurations of the named training subset (`TRAIN_GROUPS`) and applied unchanged to the
held-out ones; errors are reported for both.

    sudo .venv/bin/python experiments/fidelity.py                 # profile + run everything (~25 min)
    sudo .venv/bin/python experiments/fidelity.py --resume        # after a kill: run only what is missing
    sudo .venv/bin/python experiments/fidelity.py --only stream --quant q4k --runs 3   # streaming regime
    python experiments/fidelity.py --analyze                      # re-simulate + report from the journal

Writes experiments/results/fidelity.csv (one row per configuration), fidelity.md (the summary),
fidelity.png, fidelity_runs.jsonl (the journal: measured metrics per configuration) and the
profiled clusters fidelity_cluster_<variant>.toml.

Crash safety (primasim.core.io): every configuration's measurement is appended to the journal as one
fsync'd line as soon as it finishes, and every other file is replaced atomically, so a run killed
at any point loses at most the configuration in flight. `--resume` keeps the journal's
configurations and the profiled clusters already written and runs the rest (a torn last line is
cut off and its configuration re-run); without it a run starts afresh and keeps the previous
journal as fidelity_runs.jsonl.prev.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from primasim.core import runtime_facts
from primasim.core.cluster import ClusterSpec, LinkSpec, NetworkSpec, load_cluster
from primasim.core.errors import WorkerError
from primasim.core.io import (
    Journal,
    atomic_csv,
    atomic_savefig,
    atomic_write_json,
    atomic_write_text,
    atomic_write_with,
    read_journal,
)
from primasim.core.model_sources import load_model
from primasim.core.paths import cache_dir
from primasim.core.procfs import block_device_of
from primasim.core.units import MBPS, MS, MiB

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "llama-mini-300m"
# the weights and the residency mode of the whole study (--quant, --residency): f32 and planned are
# the committed study; q4k (Q4_K_M, the papers' format) and lru (the kernel decides, as prima.cpp)
# run the same configurations, with every device's memory scaled by the file's size over f32's
QUANT = "f32"
RESIDENCY = "planned"
MEMORY_SCALE = 1.0
TOKENS = 20
PROMPT = 16
N_CTX = 1024
HOST = {"cpus": 0}  # the measuring host's CPUs the emulated devices are pinned to (SimConfig.host_cpus)
FOREIGN_RETRY = 0.30  # re-run a configuration once if other processes used more of the host's CPUs

# The training subset: the only configurations the fitted coefficients see.
TRAIN_GROUPS = ("short-2", "rich-4")
COMMITTED_FIT = {"call_scale": 2.0}  # fitted on fidelity_f32/run1 short-2 + rich-4 (2026-12-07 evening, quota at ticks); run2 and the streaming study use it
# The streaming regime: the share of the weight file each device can hold (stream_memory_mib)
STREAM_WEIGHTS = {"desktop": 0.16, "laptop": 0.13, "tablet": 0.08, "phone": 0.05}
STREAM_TOKENS = 10  # streamed tokens are slow at f32 (seconds each); TPOT over 9 intervals


# ----------------------------------------------------------------------------------- clusters
def variant(name: str) -> ClusterSpec:
    """The emulated cluster of one regime, derived from home-emu (memory for weights x MEMORY_SCALE,
    the KV caches and the activation reserve kept, as `primasim validate --quant` scales it)."""
    from primasim.core.model_sources import load_model
    from primasim.loop.validate.driver import scale_memory, weight_share_reserves

    if name == "stream":  # sized from the weight file itself (the KV caches do not shrink with it)
        return _with_memory(load_cluster("home-emu"), stream_memory_mib(), "home-emu-stream")
    c = _variant(name)
    if MEMORY_SCALE == 1.0:
        return c
    return scale_memory(c, MEMORY_SCALE, weight_share_reserves(c, load_model(MODEL, QUANT), N_CTX))


def stream_memory_mib() -> dict[str, int]:
    """The streaming regime's memory per device: the runtime's anonymous memory for its share of
    an even 4-device split (KV caches + activations) plus STREAM_WEIGHTS of the weight file -- less
    than a quarter of the weights each, so every device of an even 2-4 device split streams."""
    from primasim.core.runtime_facts import anon_reserve

    m = load_model(MODEL, QUANT)
    reserve = anon_reserve(m.n_layers // 4, N_CTX, m.n_kv_heads, m.head_dim)
    return {d: math.ceil((reserve + f * m.total_bytes) / MiB) for d, f in STREAM_WEIGHTS.items()}


def _variant(name: str) -> ClusterSpec:
    base = load_cluster("home-emu")
    if name == "short":
        return base
    if name == "rich":  # every window fits: nothing is streamed
        mem = {"desktop": 1024, "laptop": 768, "tablet": 512, "phone": 384}
        return _with_memory(base, mem, "home-emu-rich")
    if name == "bw":  # memory-rich devices behind slow links: the network matters
        c = _with_memory(base, {"desktop": 1024, "laptop": 768, "tablet": 512, "phone": 384}, "home-emu-bw")
        links = tuple(LinkSpec(a, b, (12 if "desktop" in (a, b) else 8) * MBPS, 5 * MS)
                      for i, a in enumerate(c.names) for b in c.names[i + 1:])
        net = NetworkSpec("switched", 8 * MBPS, 5 * MS, c.network.jitter, links, {"bandwidth_mbps": "fidelity: bw"},
                          contention="pair")
        return ClusterSpec("home-emu-bw", c.devices, net, c.head, "home-emu with slow links", c.path)
    if name == "batch":  # one device that holds the whole model pinned, plus a KV pool
        c = _with_memory(base, {"desktop": 1536, "laptop": 768, "tablet": 512, "phone": 384}, "home-emu-batch")
        return c.subset(["desktop"])
    raise SystemExit(f"unknown variant {name}")


def _with_memory(c: ClusterSpec, mem: dict[str, int], name: str) -> ClusterSpec:
    devs = []
    for d in c.devices:
        assert d.emulate is not None
        em = dataclasses.replace(d.emulate, memory_limit=mem[d.name] * MiB)
        devs.append(d.replace(emulate=em, ram_avail=mem[d.name] * MiB, ram_total=max(d.ram_total, mem[d.name] * MiB)))
    return ClusterSpec(name, tuple(devs), c.network, c.head, c.description, c.path)


# ----------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    name: str
    group: str  # plans of one cluster: their rankings are compared
    regime: str
    variant: str
    devices: tuple[str, ...]
    system: str
    options: tuple[tuple[str, Any], ...] = ()
    prefetch: bool | None = None  # override the plan's
    S: int | None = None
    batch: int | None = None
    residency: str | None = None  # planned | lru for this configuration (None: the study's --residency)
    tokens: int | None = None  # tokens generated (None: TOKENS)

    @property
    def mode(self) -> str:
        return self.residency or RESIDENCY

    @property
    def n_tokens(self) -> int:
        return self.tokens or TOKENS

    @property
    def split(self) -> str:
        return "train" if self.group in TRAIN_GROUPS else "held-out"


def configs() -> list[Config]:
    out: list[Config] = []
    D4 = ("desktop", "laptop", "tablet", "phone")
    D3 = D4[:3]
    D2 = D4[:2]

    def ring(group: str, regime: str, var: str, devs: tuple[str, ...], items: list[tuple[str, str, dict[str, Any],
                                                                                          bool | None]]) -> None:
        for label, system, opts, pre in items:
            out.append(Config(f"{group}/{label}", group, regime, var, devs, system, tuple(opts.items()), pre))

    evens = [(f"even-k{k}", "even", {"k": k}, None) for k in (1, 2, 3, 4)]
    ring("short-4", "memory-short", "short", D4, [
        ("halda", "prima", {}, None), ("halda-noprefetch", "prima-no-prefetch", {}, None),
        ("halda-all-devices", "prima", {"select_devices": False}, None),
        ("halda-loop", "prima", {"planner": "loop"}, None),
        ("memratio", "prima-no-halda", {}, None), ("memratio-noprefetch", "prima-no-halda", {}, False),
        *evens, ("even-k2-noprefetch", "even", {"k": 2}, False)])
    ring("short-3", "memory-short", "short", D3, [
        ("halda", "prima", {}, None), ("halda-noprefetch", "prima-no-prefetch", {}, None),
        ("memratio", "prima-no-halda", {}, None), *evens])
    ring("short-2", "memory-short", "short", D2, [
        ("halda", "prima", {}, None), ("halda-noprefetch", "prima-no-prefetch", {}, None),
        ("memratio", "prima-no-halda", {}, None), ("even-k1", "even", {"k": 1}, None),
        ("even-k2", "even", {"k": 2}, None)])
    ring("rich-4", "memory-rich", "rich", D4, [
        ("halda", "prima", {}, None), ("memratio", "prima-no-halda", {}, None),
        ("even-k1", "even", {"k": 1}, None), ("even-k2", "even", {"k": 2}, None), ("even-k4", "even", {"k": 4}, None)])
    ring("bw-3", "bandwidth-limited", "bw", D3, [
        ("halda", "prima", {}, None), ("even-k1", "even", {"k": 1}, None), ("even-k2", "even", {"k": 2}, None),
        ("even-k4", "even", {"k": 4}, None)])
    for S in (1, 2, 3, 4):
        out.append(Config(f"rpp-4/S{S}", "rpp-4", "recurrent pipeline", "rich", D4, "mdi-llm", (("S", S),), S=S))
    for b in (1, 2, 4, 8):
        out.append(Config(f"batch/b{b}", "batch", "batched decode", "batch", ("desktop",), "bud",
                          (("batch", b), ("device", "desktop"), ("max_len", 256)), batch=b))
    out += stream_configs()
    return out


def stream_configs() -> list[Config]:
    """The streaming regime: 2-4 devices x residency x (even k = 1..4, prefetch on and off; Halda)."""
    out = []
    for devs in (("desktop", "laptop"), ("desktop", "laptop", "tablet"), ("desktop", "laptop", "tablet", "phone")):
        for mode in ("planned", "lru"):
            group = f"stream-{len(devs)}-{mode}"
            items: list[tuple[str, str, dict[str, Any], bool | None]] = [
                *((f"even-k{k}", "even", {"k": k}, True) for k in (1, 2, 3, 4)),
                *((f"even-k{k}-noprefetch", "even", {"k": k}, False) for k in (1, 2, 3, 4)),
                ("halda", "prima", {}, None)]
            for label, system, opts, pre in items:
                out.append(Config(f"{group}/{label}", group, "streaming", "stream", devs, system,
                                  tuple(opts.items()), pre, residency=mode, tokens=STREAM_TOKENS))
    return out


# ----------------------------------------------------------------------------------- one configuration
def make(cfg: Config, profiled: ClusterSpec) -> Any:
    """The plan of a configuration on the profiled cluster (runtime memory accounting)."""
    from primasim import make_plan
    from primasim.core.runtime_facts import runtime_model

    model = runtime_model(load_model(MODEL, QUANT))
    cl = profiled.subset(list(cfg.devices)) if len(cfg.devices) < len(profiled.devices) else profiled
    opts = dict(cfg.options)
    out = make_plan(cfg.system, model, cl, n_ctx=N_CTX, prompt_tokens=PROMPT, **opts)
    if not out.feasible or out.plan is None:
        raise RuntimeError(f"{cfg.name}: {cfg.system} infeasible: {out.reason}")
    plan = out.plan
    if cfg.batch:  # a fixed KV pool: the runtime's warm-up then compiles the run's own shapes
        plan = plan.replace(options={**plan.options, "kv_bytes": 16 * MiB})
    if cfg.prefetch is not None:
        plan = plan.replace(prefetch=cfg.prefetch)
    return plan, cl


def simulate_config(cfg: Config, plan: Any, cl: ClusterSpec, fit: dict[str, float] | None = None,
                    switches: dict[str, bool] | None = None) -> dict[str, Any]:
    from primasim.loop.validate import predict

    model = load_model(MODEL, QUANT)
    requests = cfg.batch if cfg.batch else None
    sim = predict(plan, model, _calibrated(cl, fit or {}), tokens=cfg.n_tokens, prompt_tokens=PROMPT,
                  requests=requests, batch=cfg.batch, residency=cfg.mode,
                  **({"host_cpus": HOST["cpus"]} | (switches or {})))
    if not sim.feasible:
        raise RuntimeError(f"{cfg.name}: simulator: {sim.reason}")
    m = sim.metrics
    return {"tpot_ms": m.tpot_ms, "ttft_ms": m.ttft_ms, "throughput": m.throughput_tok_s,
            "disk_mb_per_token": sum(sim.trace.device_stats.get(d, {}).get("disk_read_bytes", 0.0)
                                     for d in cl.names) / max(1, m.n_tokens) / 1e6,
            "streaming": streaming_devices(plan, sim.trace.device_stats, m.n_tokens),
            "prefetches": sum(int(sim.trace.device_stats.get(d, {}).get("prefetches", 0.0)) for d in cl.names),
            "output_blocks": int(sim.trace.device_stats.get(plan.devices[0].name, {}).get("output_blocks", 1.0))}


def streaming_devices(plan: Any, stats: dict[str, dict[str, float]], n_tokens: int) -> str:
    """'streamed/active': devices with layers that read at least a tenth of a layer per token."""
    layer = load_model(MODEL, QUANT).layer_bytes
    active = [d.name for d in plan.active]
    n = sum(1 for d in active if stats.get(d, {}).get("disk_read_bytes", 0.0) / max(1, n_tokens) >= 0.1 * layer)
    return f"{n}/{len(active)}"


def _calibrated(cl: ClusterSpec, fit: dict[str, float]) -> ClusterSpec:
    """The profiled cluster with the fitted global runtime coefficients applied (see FIT)."""
    if not fit:
        return cl
    devs = []
    for d in cl.devices:
        ch: dict[str, Any] = {}
        if "call_scale" in fit:
            ch["call_overhead"] = d.call_overhead * fit["call_scale"]
        devs.append(d.replace(**ch) if ch else d)
    return ClusterSpec(cl.name, tuple(devs), cl.network, cl.head, cl.description, cl.path)


def measure_config(cfg: Config, plan: Any, emu_cluster: ClusterSpec, weights: Any) -> dict[str, Any]:
    from primasim.core.trace import metrics
    from primasim.loop.validate import measure, prompt_ids

    model = load_model(MODEL, QUANT)
    cl = emu_cluster.subset(list(cfg.devices)) if len(cfg.devices) < len(emu_cluster.devices) else emu_cluster
    best = None
    failure = None
    for attempt in range(2):
        try:
            run, host = measure(plan, weights, cl, tokens=cfg.n_tokens, prompt=prompt_ids(PROMPT, model.vocab),
                                requests=cfg.batch, timeout=300, residency=cfg.mode)
        except WorkerError as e:  # an overloaded host can starve a worker's heartbeats: try once more
            failure = e
            print(f"    attempt {attempt + 1} failed: {e}", flush=True)
            time.sleep(20)
            continue
        m = metrics(run.trace)
        rec = {"tpot_ms": m.tpot_ms, "ttft_ms": m.ttft_ms, "throughput": m.throughput_tok_s,
               "disk_mb_per_token": sum(run.trace.device_stats.get(d, {}).get("disk_read_bytes", 0.0)
                                        for d in cl.names) / max(1, m.n_tokens) / 1e6,
               "foreign_cpu": host.foreign_share, "load1": host.load1, "attempt": attempt,
               "device_stats": run.trace.device_stats}
        if best is None or rec["foreign_cpu"] < best["foreign_cpu"]:
            best = rec
        if host.foreign_share <= FOREIGN_RETRY:
            break
        time.sleep(20)
    if best is None:
        raise failure if failure is not None else RuntimeError(f"{cfg.name}: no measurement")
    return best


def _read_ahead_kib(path: Any) -> float:
    """queue/read_ahead_kb of the disk under `path` (emulated devices read through it)."""
    dev = block_device_of(str(path))
    return dev.read_ahead / 1024 if dev is not None else 128.0


STALE = {"lru-shared": "lru before 6bac929: the emulated devices shared one weight file's page cache",
         "output": "before f4450e8: the head computed an output that does not fit in one call (now row blocks)"}


def stale_reason(c: Config, rec: dict[str, Any], meta: dict[str, Any]) -> str:
    """Why a journal entry was measured by a runtime that runs the configuration differently now
    ('' if it does not): lru before each emulated device mapped a file of its own (runs without
    read_ahead_kib in fidelity_run.json), or a head streaming part of its output before it could
    compute it in row blocks (no load_output_blocks; stale only if the plan blocks now)."""
    if c.mode == "lru" and "read_ahead_kib" not in meta:
        return "lru-shared"
    head = rec.get("plan", {}).get("devices", [{}])[0].get("name")
    st = rec.get("measured", {}).get("device_stats", {}).get(head, {})
    if c.mode == "planned" and st.get("load_output_streamed_bytes", 0) > 0 and "load_output_blocks" not in st:
        return "output"
    return ""


# ----------------------------------------------------------------------------------- fitting
# Global runtime coefficients, fitted on the training subset only (applied to every device):
#   call_scale -- multiplies each device's profiled per-call cost (the probe's calls run back to
#                 back; the worker's calls come after an idle wait and carry its Python around them)
FIT_GRID = {"call_scale": [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0]}


def fit(rows: list[dict[str, Any]], plans: dict[str, Any], clusters: dict[str, ClusterSpec]) -> dict[str, float]:
    """Pick the coefficients that minimise the training configurations' median TPOT error."""
    train = [r for r in rows if r["split"] == "train"]
    best: tuple[float, dict[str, float]] = (math.inf, {})
    for v in FIT_GRID["call_scale"]:
        f = {"call_scale": v}
        errs = []
        for r in train:
            plan, cl = plans[r["name"]]
            p = simulate_config(CONFIGS[r["name"]], plan, cl, f)
            errs.append(abs(p["tpot_ms"] - r["meas_tpot_ms"]) / r["meas_tpot_ms"])
        score = float(np.median(errs)) if errs else math.inf
        if score < best[0]:
            best = (score, f)
    return best[1]


CONFIGS = {c.name: c for c in configs()}

# What each modelled mechanism of the emulated devices buys: the same journal and fit, simulated
# with the mechanism switched off (SimConfig switches).
ABLATIONS = {"no CPU-quota bursts": {"cpu_quota_bursts": False},
             "quota enforced at once (no tick)": {"quota_ticks": False},
             "host CPUs that do not slow each other": {"host_contention": False},
             "devices on CPUs of their own": {"host_cpus": 0},
             "plain-rate disk": {"disk_slices": False},
             "plain-rate links": {"link_buckets": False},
             "none of the three": {"cpu_quota_bursts": False, "disk_slices": False, "link_buckets": False}}


# ----------------------------------------------------------------------------------- reporting
def ape(p: float, m: float) -> float:
    return abs(p - m) / abs(m) * 100 if m and math.isfinite(p) and math.isfinite(m) else float("nan")


def ablation_table(rows: list[dict[str, Any]], ablated: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Median / P90 APE per variant: the full model (rows) and each ablation (name -> config -> preds)."""
    cols = [("held-out TPOT", "held-out", None, "tpot_ms"), ("held-out TTFT", "held-out", None, "ttft_ms"),
            ("memory-short TPOT", None, "memory-short", "tpot_ms"), ("memory-rich TPOT", None, "memory-rich", "tpot_ms"),
            ("slow links TPOT", None, "bandwidth-limited", "tpot_ms"),
            ("recurrent pipeline TPOT", None, "recurrent pipeline", "tpot_ms"),
            ("recurrent pipeline throughput", None, "recurrent pipeline", "throughput")]
    out = ["| simulator | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    variants = [("full model", {r["name"]: {k: r[f"pred_{k}"] for k in ("tpot_ms", "ttft_ms", "throughput")}
                                for r in rows}), *ablated.items()]
    for label, preds in variants:
        cells = []
        for _, split, regime, key in cols:
            e = [ape(preds[r["name"]][key], r[f"meas_{key}"]) for r in rows
                 if (split is None or r["split"] == split) and (regime is None or r["regime"] == regime)]
            e = [x for x in e if math.isfinite(x)]
            cells.append(f"{np.median(e):.1f} / {np.percentile(e, 90):.1f}" if e else "-")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def summarize(rows: list[dict[str, Any]], fitted: dict[str, float], cmd: str, seconds: float,
              ablated: dict[str, dict[str, dict[str, float]]] | None = None,
              run_meta: dict[str, Any] | None = None) -> str:
    import pandas as pd
    from scipy.stats import kendalltau

    df = pd.DataFrame(rows)
    run = run_meta or {}
    measured = (f"measured by `{run['command']}` on {run['finished']} ({run['minutes']:.0f} min); " if run else "")
    lines = ["# Simulator vs runtime on the emulated home cluster (fidelity)", "",
             f"{len(df)} configurations {measured}predicted and reported by `{cmd}` on "
             f"{time.strftime('%Y-%m-%d %H:%M')} ({seconds:.0f} s). "
             f"Model {MODEL} ({QUANT} random weights, {load_model(MODEL, QUANT).total_bytes / 1e9:.2f} GB), "
             f"residency {RESIDENCY}, devices' memory x {MEMORY_SCALE:.3g}, prompt {PROMPT} tokens, {TOKENS} "
             f"generated (streaming regime: residency per configuration, {STREAM_TOKENS} generated, memory "
             "by stream_memory_mib).", ""]
    metrics_ = [("TPOT", "tpot_ms"), ("TTFT", "ttft_ms"), ("throughput", "throughput")]

    def block(sub: Any) -> list[str]:
        out = []
        for lab, key in metrics_:
            e = sub[f"ape_{key}"].dropna()
            if len(e):
                out.append(f"{lab} {np.median(e):.1f} / {np.percentile(e, 90):.1f}")
        return out

    lines += ["## Headline (absolute percentage error, median / P90)", "",
              "| split | n | TPOT | TTFT | throughput |", "|---|---|---|---|---|"]
    for split in ("held-out", "train", "all"):
        sub = df if split == "all" else df[df["split"] == split]
        vals = {k: sub[f"ape_{k}"].dropna() for _, k in metrics_}
        cells = [f"{np.median(v):.1f} / {np.percentile(v, 90):.1f}" if len(v) else "-" for v in vals.values()]
        lines.append(f"| {split} | {len(sub)} | " + " | ".join(cells) + " |")
    lines += ["", "Targets: TPOT median <= 5 % and P90 <= 10 % on held-out configurations; TTFT median <= 10 %.", ""]
    lines += ["## Per regime (held-out and train together; median / P90 APE)", "",
              "| regime | n | TPOT | TTFT | throughput | host CPU used by others (median) |", "|---|---|---|---|---|---|"]
    for reg, sub in df.groupby("regime", sort=False):
        cells = []
        for _, k in metrics_:
            v = sub[f"ape_{k}"].dropna()
            cells.append(f"{np.median(v):.1f} / {np.percentile(v, 90):.1f}" if len(v) else "-")
        lines.append(f"| {reg} | {len(sub)} | " + " | ".join(cells) + f" | {100 * sub['foreign_cpu'].median():.0f} % |")
    lines += ["", "## Plan rankings (Kendall tau of predicted vs measured TPOT, plans of one cluster)", "",
              "| group | plans | tau | predicted order | measured order |", "|---|---|---|---|---|"]
    taus = []
    for grp, sub0 in df.groupby("group", sort=False):
        key = "pred_tpot_ms" if grp not in ("batch", "rpp-4") else "pred_throughput"
        mkey = key.replace("pred_", "meas_")
        sign = 1 if "tpot" in key else -1
        # planners that return the same plan are one candidate (their runs differ only by noise)
        sub = (sub0.groupby("plan_key", sort=False).agg({key: "mean", mkey: "mean", "label": " = ".join})
               .reset_index())
        if len(sub) < 3:
            continue
        tau = float(kendalltau(sign * sub[key], sign * sub[mkey]).statistic)
        taus.append(tau)
        po = " < ".join(sub.sort_values(key, ascending=sign > 0)["label"])
        mo = " < ".join(sub.sort_values(mkey, ascending=sign > 0)["label"])
        lines.append(f"| {grp} ({'TPOT' if sign > 0 else 'throughput'}) | {len(sub)} | {tau:.2f} | {po} | {mo} |")
    if taus:
        lines += ["", f"Mean tau over groups: {np.mean(taus):.2f}, lowest {min(taus):.2f} (target >= 0.9 in every group).", ""]
    stream = df[df["regime"] == "streaming"]
    if len(stream):
        lines += ["## Streaming regime per group (every device short of memory; median / P90 APE)", "",
                  "| group | n | TPOT | TTFT | disk MB/token | configurations where every device streamed "
                  "(measured / predicted) |", "|---|---|---|---|---|---|"]
        for grp, sub in stream.groupby("group", sort=False):
            allm = sum(1 for v in sub["meas_streaming"] if _all_of(v))
            allp = sum(1 for v in sub["pred_streaming"] if _all_of(v))
            e, t = sub["ape_tpot_ms"].dropna(), sub["ape_ttft_ms"].dropna()
            dk = sub["ape_disk_mb_per_token"].dropna()
            lines.append(f"| {grp} | {len(sub)} | {np.median(e):.1f} / {np.percentile(e, 90):.1f} | "
                         f"{np.median(t):.1f} / {np.percentile(t, 90):.1f} | "
                         f"{np.median(dk):.1f} / {np.percentile(dk, 90):.1f} | {allm} / {allp} of {len(sub)} |")
        e = stream["ape_tpot_ms"].dropna()
        lines += ["", f"Streaming regime, all {len(stream)}: TPOT {np.median(e):.1f} / {np.percentile(e, 90):.1f} "
                  "(targets: median <= 5 %, P90 <= 10 %). Disk MB/token: the bytes the devices read per token, "
                  "a check of the residency and page-cache model that the host's CPU load does not distort.", ""]
    if ablated:
        lines += ["## What each mechanism buys (ablation: same journal, same fit; median / P90 APE)", "",
                  *ablation_table(rows, ablated), "",
                  "CPU-quota bursts: a device's CFS budget refills every period, so a short window after a wait "
                  "runs at full speed (`CpuQuota`). Disk slices: blk-throttle grants a slice's allowance at the "
                  "disk's own speed (`DiskBucket`). Link buckets: a tbf-shaped link lets its bucket through at "
                  "once after an idle spell (`LinkBucket`). Host CPUs: devices pinned to one host CPU share it "
                  "while they compute at once, and the host's two CPUs slow each other's windows "
                  "(`Host`, `runtime_facts.HOST_CONTENTION`). See docs/validate.md.", ""]
    lines += ["## Fitted on the training subset", "",
              f"Training groups: {', '.join(TRAIN_GROUPS)}; everything else is held out. Fitted: "
              + (", ".join(f"`{k}` = {v:g}" for k, v in fitted.items()) or "nothing")
              + (" (none of this study's configurations is in a training group: the committed study's fit, "
                 "experiments/results/fidelity.md)" if not (df["split"] == "train").any() and fitted else "") + ".", ""]
    lines += ["## Every configuration", "",
              "| configuration | split | plan | TPOT pred / meas ms | err % | TTFT pred / meas ms | err % | "
              "disk MB/token pred / meas | devices streaming pred / meas | others' CPU |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['split']} | {r['plan']} | {r['pred_tpot_ms']:.1f} / {r['meas_tpot_ms']:.1f} | "
                     f"{r['err_tpot_ms']:+.1f} | {r['pred_ttft_ms']:.0f} / {r['meas_ttft_ms']:.0f} | "
                     f"{r['err_ttft_ms']:+.1f} | {r['pred_disk_mb_per_token']:.0f} / {r['meas_disk_mb_per_token']:.0f} | "
                     f"{r['pred_streaming']} / {r['meas_streaming']} | {100 * r['foreign_cpu']:.0f} % |")
    return "\n".join(lines) + "\n"


def _all_of(v: Any) -> bool:
    """'n/m' with n == m > 0."""
    a, _, b = str(v).partition("/")
    return a.isdigit() and b.isdigit() and int(a) == int(b) > 0


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.8))
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    for k, (lab, key) in enumerate((("TPOT (ms)", "tpot_ms"), ("TTFT (ms)", "ttft_ms"))):
        a = ax[k]
        for i, reg in enumerate(regimes):
            for split, mk in (("held-out", "o"), ("train", "^")):
                sub = [r for r in rows if r["regime"] == reg and r["split"] == split]
                if sub:
                    a.scatter([r[f"meas_{key}"] for r in sub], [r[f"pred_{key}"] for r in sub], marker=mk,
                              color=f"C{i}", label=f"{reg} ({split})", alpha=0.8)
        lo = min(min(r[f"meas_{key}"], r[f"pred_{key}"]) for r in rows) * 0.8
        hi = max(max(r[f"meas_{key}"], r[f"pred_{key}"]) for r in rows) * 1.2
        xs = np.array([lo, hi])
        a.plot(xs, xs, "k-", lw=1)
        a.fill_between(xs, xs * 0.9, xs * 1.1, color="0.85", label="+/-10 %")
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel(f"measured {lab}")
        a.set_ylabel(f"predicted {lab}")
        a.set_title(lab)
    ax[0].legend(fontsize=6)
    a = ax[2]
    for k, (lab, key) in enumerate((("TPOT", "tpot_ms"), ("TTFT", "ttft_ms"), ("throughput", "throughput"))):
        e = np.sort([r[f"ape_{key}"] for r in rows if r["split"] == "held-out" and math.isfinite(r[f"ape_{key}"])])
        if len(e):
            a.plot(e, np.arange(1, len(e) + 1) / len(e), label=lab, color=f"C{k}")
    a.axvline(5, color="k", ls=":", lw=1)
    a.axvline(10, color="k", ls="--", lw=1)
    a.set_xlabel("absolute percentage error (held-out)")
    a.set_ylabel("fraction of configurations")
    a.set_xscale("symlog", linthresh=1)
    a.legend()
    a.set_title("error CDF, held-out configurations")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- main
def dry_run(cfgs: list[Config]) -> int:
    """Plan and simulate every configuration on its variant's nominal figures (no profile, no run)."""
    clusters = {v: variant(v) for v in sorted({c.variant for c in cfgs})}
    short = 0
    for c in cfgs:
        plan, cl = make(c, clusters[c.variant])
        p = simulate_config(c, plan, cl)
        short += c.regime == "streaming" and not _all_of(p["streaming"])
        print(f"{c.name:34s} {c.mode:7s} {plan.describe():60s} prefetch={plan.prefetch!s:5s} "
              f"TPOT {p['tpot_ms']:8.1f} ms  disk {p['disk_mb_per_token']:6.0f} MB/token  streaming {p['streaming']}")
    print(f"{len(cfgs)} configurations; streaming configurations where not every device streams: {short}")
    return 0


def main(argv: list[str] | None = None) -> int:
    global QUANT, RESIDENCY, MEMORY_SCALE, FOREIGN_RETRY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--analyze", action="store_true", help="no runs: re-simulate the journal and report")
    ap.add_argument("--only", default="", help="comma list of configuration name prefixes to run")
    ap.add_argument("--resume", action="store_true", help="keep the journal's configurations, run the rest")
    ap.add_argument("--out", default="", help="results directory (default experiments/results, or "
                    "experiments/results/fidelity_<quant>_<residency> for another --quant or --residency)")
    ap.add_argument("--quant", default="f32", help="random weights: f32 (the committed study), q8_0, q4k (Q4_K_M, "
                    "GGUF)")
    ap.add_argument("--residency", default="planned", choices=("planned", "lru"), help="run and simulate with it")
    ap.add_argument("--memory-scale", type=float, default=0.0,
                    help="scale every device's memory for weights, its KV caches and activation reserve kept "
                    "(default: the weight file's size over the f32 model's, so each regime keeps its share of the model)")
    ap.add_argument("--dry-run", action="store_true", help="no runs, no root: plan and simulate the selected "
                    "configurations on the emulated clusters' nominal figures (checks a configuration set)")
    ap.add_argument("--retry-above", type=float, default=FOREIGN_RETRY, help="re-run a configuration once (after "
                    "20 s) when other processes used more than this share of the host's CPUs (1 = never)")
    ap.add_argument("--runs", type=int, default=1, help="independent runs of the whole study into <out>/run1..N, "
                    "then their spread (<out>/fidelity_spread.md)")
    a = ap.parse_args(argv)
    if a.runs < 1:
        raise SystemExit("--runs must be >= 1")
    QUANT, RESIDENCY, FOREIGN_RETRY = a.quant, a.residency, a.retry_above
    MEMORY_SCALE = a.memory_scale or load_model(MODEL, QUANT).total_bytes / load_model(MODEL, "f32").total_bytes
    out = Path(a.out or (RESULTS if (QUANT, RESIDENCY) == ("f32", "planned") else RESULTS / f"fidelity_{QUANT}_{RESIDENCY}"))
    out.mkdir(parents=True, exist_ok=True)
    if a.dry_run:
        return dry_run([c for c in configs() if not a.only or any(c.name.startswith(p) for p in a.only.split(","))])
    if a.runs > 1:
        import fidelity_spread

        rest = list(argv if argv is not None else sys.argv[1:])
        for flag in ("--runs", "--out"):  # each run gets its own directory
            while flag in rest:
                i = rest.index(flag)
                del rest[i:i + 2]
            rest = [x for x in rest if not x.startswith(flag + "=")]
        for i in range(1, a.runs + 1):
            print(f"=== run {i} of {a.runs} -> {out / f'run{i}'}", flush=True)
            main([*rest, "--out", str(out / f"run{i}")])
        print(fidelity_spread.spread(out))
        return 0
    journal = out / "fidelity_runs.jsonl"
    cmd = "python experiments/fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t_start = time.time()
    cfgs = [c for c in configs() if not a.only or any(c.name.startswith(p) for p in a.only.split(","))]
    done: dict[str, dict[str, Any]] = {}
    if a.analyze:  # read-only: a torn last line (a run killed mid-write) is skipped, not cut
        done = {j["name"]: j for j in read_journal(journal)}
    # (analysis: only the variants the journal has configurations of)
    variants = sorted({c.variant for c in cfgs if not a.analyze or c.name in done})
    profiled: dict[str, ClusterSpec] = {}
    if not a.analyze:
        from primasim.loop.validate.calibrate import profile_cluster
        from primasim.runtime.head import cached_random_weights

        model = load_model(MODEL, QUANT)
        weights = cached_random_weights(model, fmt="safetensors" if QUANT in ("f32", "f16") else "gguf")
        # --resume keeps the journal's configurations (a torn last line is cut off: that one re-runs);
        # a fresh run keeps the old journal as fidelity_runs.jsonl.prev until it is done
        runs = Journal(journal, "name", resume=a.resume, default=float)
        done = dict(runs.records)
        if a.resume:
            print(f"resuming: {len(done)} configurations in {journal}", flush=True)
        for v in variants:
            path = out / f"fidelity_cluster_{v}.toml"
            # only the devices the selected configurations use are profiled (--only stream-2: two)
            full = variant(v)
            need = {d for c in cfgs if c.variant == v for d in c.devices}
            vc = full.subset([n for n in full.names if n in need]) if need < set(full.names) else full
            if a.resume and path.exists() and need <= set(load_cluster(path).names):
                profiled[v] = load_cluster(path)
                continue
            print(f"profiling variant {v} ({', '.join(vc.names)}) ...", flush=True)
            prof = profile_cluster(vc, weights, model, prompt_tokens=PROMPT, max_seq=N_CTX)
            profiled[v] = prof.cluster
            atomic_write_with(path, prof.cluster.save)
        # what the runtime and the host were (also for a run stopped before its end, then --analyze)
        run_meta = {"command": cmd, "finished": "(running)", "minutes": 0.0, "configurations": len(done),
                    "act_reserve_mib": runtime_facts.ACT_RESERVE / MiB,
                    "read_ahead_kib": _read_ahead_kib(weights),
                    "cpu_shares": os.environ.get("PRIMASIM_EMULATE_CPU_SHARES", ""),
                    "host_cpus": len(os.sched_getaffinity(0))}
        if not (out / "fidelity_run.json").exists():
            atomic_write_json(out / "fidelity_run.json", run_meta, indent=None)
        for i, c in enumerate(cfgs):
            if c.name in done:
                continue
            plan, cl = make(c, profiled[c.variant])
            print(f"[{i + 1}/{len(cfgs)}] {c.name}: {plan.describe()} prefetch={plan.prefetch} ...", flush=True)
            try:
                meas = measure_config(c, plan, variant(c.variant), weights)
            except (WorkerError, RuntimeError) as e:  # a plan the runtime cannot run is a finding: keep it, go on
                rec = {"name": c.name, "plan": plan.to_json(), "failed": str(e).splitlines()[0][:400]}
                runs.add(rec)
                done[c.name] = rec
                print(f"    FAILED (journaled, the study goes on): {rec['failed']}", flush=True)
                continue
            rec = {"name": c.name, "plan": plan.to_json(), "measured": meas}
            runs.add(rec)  # one fsync'd line: a kill loses at most the configuration in flight
            done[c.name] = rec
            print(f"    measured TPOT {meas['tpot_ms']:.1f} ms, TTFT {meas['ttft_ms']:.0f} ms, "
                  f"others' CPU {100 * meas['foreign_cpu']:.0f} %", flush=True)
        runs.close()
        atomic_write_json(out / "fidelity_run.json", run_meta | {
            "finished": time.strftime("%Y-%m-%d %H:%M"), "minutes": (time.time() - t_start) / 60,
            "configurations": len(done)}, indent=None)
        host_cpus = len(os.sched_getaffinity(0))
    else:
        # simulate the runtime that was measured: its workers reserved ACT_RESERVE besides the KV
        # caches when they took their weights' budget (8 MiB before 2026-12-07, not recorded then)
        meta0 = out / "fidelity_run.json"
        reserve = json.loads(meta0.read_text()).get("act_reserve_mib", 8.0) if meta0.exists() else None
        if reserve is not None and reserve * MiB != runtime_facts.ACT_RESERVE:
            print(f"(the journal's runtime reserved {reserve:g} MiB for activations: simulated so)", flush=True)
            runtime_facts.ACT_RESERVE = int(reserve * MiB)
        # the host CPUs the emulated devices were pinned to (not recorded before 2026-12-07: each
        # device simulated on CPUs of its own, as the simulator did then)
        host_cpus = int(json.loads(meta0.read_text()).get("host_cpus", 0)) if meta0.exists() else 0
        # the disk's readahead window (sim: faults read around, scans read ahead), profiled since
        # 2026-12-07 16:30; earlier clusters get the run's recorded value, else this host's disk
        ra = json.loads(meta0.read_text()).get("read_ahead_kib") if meta0.exists() else None
        for v in variants:
            profiled[v] = load_cluster(out / f"fidelity_cluster_{v}.toml")
            if all(d.read_ahead == 0 for d in profiled[v].devices):
                kib = float(ra if ra is not None else _read_ahead_kib(cache_dir()))
                print(f"(profiled cluster {v} has no readahead window: {kib:g} KiB, "
                      f"{'recorded by the run' if ra is not None else 'this host disk'})", flush=True)
                profiled[v] = ClusterSpec(profiled[v].name, tuple(d.replace(read_ahead=kib * 1024) for d in profiled[v].devices),
                                          profiled[v].network, profiled[v].head, profiled[v].description, profiled[v].path)
    HOST["cpus"] = host_cpus
    # predictions (cheap): every configuration re-simulated from its plan and the profiled cluster
    from primasim.core.plan import Plan

    plans: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    stale: list[dict[str, Any]] = []
    meta_now = json.loads((out / "fidelity_run.json").read_text()) if (out / "fidelity_run.json").exists() else {}
    for c in cfgs:
        if c.name not in done:
            continue
        plan = Plan.from_json(done[c.name]["plan"])
        why = stale_reason(c, done[c.name], meta_now)
        if why:  # measured by a runtime that no longer runs this plan so: reported apart
            cl = profiled[c.variant]
            cl = cl.subset(list(c.devices)) if len(c.devices) < len(cl.devices) else cl
            p = simulate_config(c, plan, cl, dict(COMMITTED_FIT))
            if why == "output" and p["output_blocks"] <= 1:
                why = ""
            else:
                m = done[c.name].get("measured", {})
                stale.append({"name": c.name, "plan": plan.describe(), "why": STALE[why], "pred": p["tpot_ms"],
                              "meas": m.get("tpot_ms", float("nan")), "failed": done[c.name].get("failed", "")})
                continue
        if "failed" in done[c.name]:  # the runtime could not run the plan: reported apart, with the prediction
            cl = profiled[c.variant]
            cl = cl.subset(list(c.devices)) if len(c.devices) < len(cl.devices) else cl
            failed.append({"name": c.name, "plan": plan.describe(), "residency": c.mode, "reason": done[c.name]["failed"],
                           "pred": simulate_config(c, plan, cl, dict(COMMITTED_FIT))})
            continue
        cl = profiled[c.variant]
        cl = cl.subset(list(c.devices)) if len(c.devices) < len(cl.devices) else cl
        plans[c.name] = (plan, cl)
        m = done[c.name]["measured"]
        rows.append({"name": c.name, "label": c.name.split("/", 1)[1], "group": c.group, "regime": c.regime,
                     "split": c.split, "plan": plan.describe(), "prefetch": plan.prefetch,
                     "plan_key": f"{plan.describe()} prefetch={plan.prefetch} S={c.S} batch={c.batch}",
                     **{f"meas_{k}": m[k] for k in ("tpot_ms", "ttft_ms", "throughput", "disk_mb_per_token")},
                     "residency": c.mode, "meas_streaming": streaming_devices(plan, m.get("device_stats", {}), c.n_tokens),
                     "foreign_cpu": m["foreign_cpu"], "load1": m.get("load1", float("nan"))})
    # a study without training configurations (e.g. --only stream) applies the committed study's fit
    fitted = fit(rows, plans, profiled) if any(r["split"] == "train" for r in rows) else dict(COMMITTED_FIT)
    for r in rows:
        p = simulate_config(CONFIGS[r["name"]], *plans[r["name"]], fitted)
        for k in ("tpot_ms", "ttft_ms", "throughput", "disk_mb_per_token", "streaming"):
            r[f"pred_{k}"] = p[k]
        if r["prefetch"] and not p["prefetches"]:  # prefetch on where no device has room to read ahead:
            r["plan_key"] = r["plan_key"].replace("prefetch=True", "prefetch=False")  # the same plan as off
        r["ape_disk_mb_per_token"] = ape(r["pred_disk_mb_per_token"], r["meas_disk_mb_per_token"])
        for k in ("tpot_ms", "ttft_ms", "throughput"):
            r[f"ape_{k}"] = ape(r[f"pred_{k}"], r[f"meas_{k}"])
            r[f"err_{k}"] = (r[f"pred_{k}"] - r[f"meas_{k}"]) / r[f"meas_{k}"] * 100
    ablated = {lab: {r["name"]: simulate_config(CONFIGS[r["name"]], *plans[r["name"]], fitted, sw) for r in rows}
               for lab, sw in ABLATIONS.items()}
    import pandas as pd

    atomic_csv(out / "fidelity.csv", pd.DataFrame(rows), float_format="%.6g")  # (rankings from it: no rounding ties)
    meta = out / "fidelity_run.json"
    md = summarize(rows, fitted, cmd, time.time() - t_start, ablated, json.loads(meta.read_text()) if meta.exists() else None)
    if failed:
        md += "\n".join(["", "## Configurations the runtime could not run", "",
                          "Planned and predicted feasible, but the measured run failed (twice): a gap between the "
                          "memory the planner and simulator account for and what the runtime uses.", "",
                          "| configuration | residency | plan | predicted TPOT ms | why the run failed |", "|---|---|---|---|---|",
                          *(f"| {f['name']} | {f['residency']} | {f['plan']} | {f['pred']['tpot_ms']:.1f} | {f['reason']} |"
                            for f in failed), ""])
    if stale:
        md += "\n".join(["", "## Measured by an earlier runtime (not in the tables above)", "",
                          "The runtime has since changed what it does for these configurations; their measurements "
                          "are kept in the journal and listed here, with today's prediction.", "",
                          "| configuration | plan | why | predicted TPOT ms | measured TPOT ms |", "|---|---|---|---|---|",
                          *(f"| {x['name']} | {x['plan']} | {x['why']} | {x['pred']:.1f} | "
                            + (f"{x['meas']:.1f}" if not x["failed"] else "failed: " + x["failed"][:120]) + " |"
                            for x in stale), ""])
    atomic_write_text(out / "fidelity.md", md)
    figure(rows, out / "fidelity.png")
    print((out / "fidelity.md").read_text().split("## Per regime")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
