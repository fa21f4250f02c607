"""`primasim validate`: the loop the toolkit exists for, on one host.

    profile each emulated device inside its limits -> plan (Halda) -> simulate -> run -> compare

1. **Profile** (`profile_cluster`): every device of an emulated cluster gets its cgroups and network
   namespace (primasim.runtime.emulate), and `python -m primasim.loop.validate probe` runs inside them:
   - prima.cpp's figures with `primasim.profile.profiler.run_profile` (disk under the blkio throttle, RAM
     bandwidth and GEMM under the CPU quota, KV-copy time);
   - available memory with the runtime's semantics: the device's memory cgroup limited to the
     probe's own footprint (Python + JAX, like a worker's) + `memory_mib`, then read with the
     profiler's prima.cpp formula (limit - usage + page cache) -- what a worker can give the model;
   - the runtime's own kernels (`runtime_probe`): `primasim.runtime.model.run_layers` on the checkpoint's
     memory-mapped layers, one-layer calls and a four-layer window, at one token (decode) and at the
     prompt's length (prefill), cycling through layers that do not fit the LLC. That gives the
     per-call cost (dispatch + Python + result copy) and the per-layer time of each shape;
     effective RAM bandwidth and FLOPS are solved from them in the cost model's own basis
     (`t_layer(T) = T f / s_cpu + T kv_copy + (b + kv) / T_cpu`), so the simulator reproduces the
     probe exactly at both shapes;
   - page-fault streaming: reading a dropped part of the checkpoint through the mapping, as a
     worker short of memory streams its layers;
   - links: the runtime's wire format over zmq to an echo peer in every other device's namespace
     (through the tbf shaping): bandwidth, and one-way latency with an *idle* receiver (the peer
     sleeps between messages, as a ring device does while the others compute).
2. **Plan** with Halda (`make_plan("prima")`) on the profiled cluster, with the runtime's memory
   accounting (`runtime_model`: f32 KV cache, the worker's small activation reserve).
3. **Simulate** with `SimConfig(runtime=True)`: the simulator's model of primasim's runtime
   (primasim/sim/_runtime.py: per-layer streaming of what does not fit, prefetch of the next
   layer's streamed part, per-call costs), cold start as the runtime does.
4. **Run** the same plan with the runtime (`primasim.runtime.head.run_plan`) on the emulated cluster.
5. **Compare**: TPOT, TTFT, throughput, disk bytes and memory per device, errors in %, a figure,
   both timelines as Chrome traces, a JSON summary.

Without root the devices are plain processes (no limits): it still profiles, plans, simulates,
runs and compares, and says that it ran degraded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import primasim.loop.validate.speculation as spv
from primasim.core.cluster import ClusterSpec, load_cluster
from primasim.core.errors import CheckpointError, PlanError, PrimasimError, SpecError
from primasim.core.io import atomic_write_text
from primasim.core.model import ModelSpec
from primasim.core.model_sources import catalogue, load_model
from primasim.core.runtime_facts import ACT_RESERVE, kv_bytes, residency_mode, runtime_model
from primasim.runtime.head import cached_random_weights
from primasim.sim import make_plan

from ..row import Row
from .calibrate import ClusterProfile, Progress, profile_cluster
from .compare import compare, measure, predict, prompt_ids
from .hostload import HostLoad
from .probes import probe_main
from .report import check_out, write_outputs


# ============================================================================ the whole loop
@dataclass(frozen=True)
class ValidateConfig:
    """What `primasim validate` runs (embedded defaults: the README's first command)."""

    cluster: str = field(default="home-emu", metadata={"help": "emulated cluster (name or TOML path)"})
    model: str = field(default="llama-mini-300m", metadata={"help": "catalogue model; random weights cached"})
    # q4k: the papers' format, run from the file; predicted as closely as f32 and 5x faster to run
    # (experiments/results/validate_q4k_home_emu.md)
    quant: str = field(default="q4k", metadata={"help": "random weights: q4k (Q4_K_M GGUF, the default), f32 or f16 "
                                                    "(safetensors) or another GGUF quantisation the writer has (q8_0)"})
    memory_scale: float = field(default=0.0, metadata={
        "help": "multiply every emulated device's memory for weights (beyond its KV caches and activation reserve) "
                "by this (0 = the weight file's size over the f32 model's: a quantised model keeps the regime -- "
                "which devices stream -- of the f32 one)"})
    residency: str = field(default="planned", metadata={
        "help": "how a device short of memory holds its weights, run and simulated alike: planned (the worker "
                "keeps part of every layer, streams the rest) or lru (mmap + prefetch, the kernel's LRU decides)"})
    system: str = field(default="prima", metadata={"help": "planner: prima (Halda) or another system"})
    tokens: int = field(default=32, metadata={"help": "tokens generated"})
    prompt_tokens: int = field(default=16, metadata={"help": "prompt length"})
    n_ctx: int = field(default=1024, metadata={"help": "KV cache length the plan accounts for"})
    seed: int = field(default=0, metadata={"help": "prompt, sampling and jitter seed"})
    emulate: bool = field(default=True, metadata={"help": "emulate the devices' limits (root); else plain processes"})
    plan_options: tuple[tuple[str, Any], ...] = field(default=(), metadata={"help": "planner options"})
    out: str = field(default="", metadata={"help": "output directory (default runs/validate-<time>)"})
    timeout: float = field(default=300.0, metadata={"help": "s without progress before a run gives up"})
    draft: str = field(default="", metadata={"help": "speculative decoding: a draft checkpoint, or first:N (the "
                                                     "random-weight target's first N blocks); empty = none"})
    draft_tokens: int = field(default=4, metadata={"help": "tokens the draft proposes per pass (K)"})
    acceptance: str = field(default="", metadata={
        "help": "the prediction's acceptance model: a rate, rates per position or an acceptance log; empty = "
                "the log of a separate run of the runtime's speculative loop on the prompt (loop/validate/speculation.py)"})


@dataclass
class ValidateResult:
    config: ValidateConfig
    profile: ClusterProfile
    plan: Any
    predicted: Any
    measured: Any
    rows: list[Row]
    out: Path
    host: HostLoad
    seconds: dict[str, float]
    notes: list[str]

    @property
    def degraded(self) -> bool:
        return not self.profile.emulated

    def row(self, metric: str, device: str = "") -> Row:
        return next(r for r in self.rows if r.metric == metric and r.device == device)

    def summary(self) -> dict[str, Any]:
        pj = self.predicted.to_json()
        mj = self.measured.to_json()
        return {
            "command": "primasim validate", "config": dataclasses.asdict(self.config),
            "degraded": self.degraded, "limitations": self.profile.limitations, "notes": self.notes,
            "model": self.config.model, "cluster": self.profile.cluster.to_toml(),
            "plan": self.plan.to_json(),
            "comparison": [r.to_json() for r in self.rows],
            "predicted": {k: pj.get(k) for k in ("tpot_ms", "tpot_p50_ms", "tpot_p90_ms", "ttft_ms",
                                                 "throughput_tok_s", "memory_pressure", "disk_read_bytes",
                                                 "devices")},
            "measured": {k: mj.get(k) for k in ("tpot_ms", "tpot_p50_ms", "tpot_p90_ms", "ttft_ms",
                                                "throughput_tok_s", "memory_pressure", "disk_read_bytes",
                                                "token_ids", "emulation", "devices")},
            "speculation": {"predicted": self.predicted.extra.get("speculation"),
                            "measured": {k: v for k, v in self.measured.trace.meta.get("speculation", {}).items()
                                         if k != "pass_log"} or None},
            "host": {"other_processes_cpu_share": self.host.foreign_share, "load1": self.host.load1,
                     "cpus": len(os.sched_getaffinity(0))},
            "seconds": self.seconds,
            "files": {k: str(v) for k, v in self.files().items()},
        }

    def files(self) -> dict[str, Path]:
        return {"summary": self.out / "summary.json", "comparison": self.out / "comparison.csv",
                "figure": self.out / "validate.png", "predicted_trace": self.out / "predicted.trace.json",
                "measured_trace": self.out / "measured.trace.json", "cluster": self.out / "cluster-profiled.toml",
                "probes": self.out / "probes.json", "plan": self.out / "plan.json"}


def default_out() -> Path:
    return Path("runs") / f"validate-{time.strftime('%Y%m%d-%H%M%S')}"


def scale_memory(cluster: ClusterSpec, factor: float, reserves: dict[str, float] | None = None) -> ClusterSpec:
    """`cluster` with every emulated device's memory for the model (and its ram_avail) x `factor`,
    except `reserves[name]` bytes of it (the runtime's anonymous memory, which does not shrink with
    the weights), which stay as they are."""
    devs = []
    for d in cluster.devices:
        if d.emulate is None:
            devs.append(d)
            continue
        r = min((reserves or {}).get(d.name, 0.0), d.emulate.memory_limit)
        em = dataclasses.replace(d.emulate, memory_limit=r + (d.emulate.memory_limit - r) * factor)
        devs.append(d.replace(emulate=em, ram_avail=r + max(0.0, d.ram_avail - r) * factor))
    return dataclasses.replace(cluster, devices=tuple(devs), name=f"{cluster.name}-x{factor:.3g}")


def weight_share_reserves(cluster: ClusterSpec, model: ModelSpec, n_ctx: int) -> dict[str, float]:
    """Per emulated device, the runtime's anonymous memory that a smaller weight file does not shrink:
    the activation reserve and the f32 KV caches of the model's layers, shared by memory (as a plan
    shares the layers). Scaling only the rest keeps each device's share of the weights -- which
    devices stream -- as at f32; scaling all of it left most of a Q4_K_M home-emu's memory to the reserves."""
    em = [d for d in cluster.devices if d.emulate is not None]
    total = sum(d.emulate.memory_limit for d in em) or 1.0  # type: ignore[union-attr]
    kv = kv_bytes(model.n_layers, n_ctx, model.n_kv_heads, model.head_dim)
    return {d.name: ACT_RESERVE + kv * d.emulate.memory_limit / total for d in em}  # type: ignore[union-attr]


def validate(cfg: ValidateConfig = ValidateConfig(), progress: Progress | None = None) -> ValidateResult:
    """Profile -> plan -> simulate -> run -> compare, writing everything into `cfg.out`."""

    say = progress or (lambda _m, _f: None)
    secs: dict[str, float] = {}
    notes: list[str] = []
    out = Path(cfg.out) if cfg.out else default_out()
    check_out(out)
    if cfg.tokens < 2 or cfg.prompt_tokens < 1:
        raise SpecError("validate needs at least 2 tokens and a prompt of at least 1", where="--tokens",
                        fix="e.g. --tokens 32 --prompt-tokens 16")
    cluster = load_cluster(cfg.cluster)
    if not any(d.emulate for d in cluster.devices):
        raise SpecError(f"cluster {cluster.name} has no emulated devices", where="--cluster",
                        fix="give a cluster whose devices have [devices.emulate] tables (e.g. home-emu)")
    if any(d.address for d in cluster.devices):
        raise SpecError(f"cluster {cluster.name} has remote devices", where="--cluster",
                        fix="validate emulates every device on this host; profile real devices with `primasim profile`")
    model = load_model(cfg.model, cfg.quant)
    try:
        residency_mode(cfg.residency)
    except ValueError as exc:
        raise SpecError(str(exc), where="--residency", fix="use --residency lru or --residency planned") from None
    scale = cfg.memory_scale or model.total_bytes / load_model(cfg.model, "f32").total_bytes
    if not 0 < scale <= 64:
        raise SpecError(f"memory scale {scale:g} out of range", where="--memory-scale", fix="use e.g. 0.2 or 1")
    if scale != 1.0:
        cluster = scale_memory(cluster, scale, weight_share_reserves(cluster, model, cfg.n_ctx))
        notes.append(f"every device's memory for weights scaled by {scale:.3g} (the {model.quant} file over the f32 "
                     "model; KV caches and the activation reserve kept), so each keeps the share of the model it "
                     "has at f32")

    t = time.perf_counter()
    say("weights: random checkpoint (generated once, then cached)", 0.0)
    try:  # quantised random weights are GGUF files, as the papers' checkpoints
        weights = cached_random_weights(model, fmt="safetensors" if model.quant in ("f32", "f16") else "gguf")
    except CheckpointError as exc:
        raise SpecError(f"cannot write {model.quant} random weights: {exc.what}", where="--quant",
                        fix="use --quant f32, f16 or q8_0") from None
    draft_path, draft_model = (None, None)
    if cfg.draft:
        if cfg.draft_tokens < 1:
            raise SpecError(f"--draft-tokens must be >= 1, got {cfg.draft_tokens}", where="--draft-tokens",
                            fix="e.g. --draft-tokens 4")
        draft_path, draft_model = spv.draft_weights(cfg.draft, weights)
    secs["weights"] = time.perf_counter() - t

    t = time.perf_counter()
    prof = profile_cluster(cluster, weights, model, emulate=cfg.emulate, prompt_tokens=cfg.prompt_tokens,
                           max_seq=cfg.n_ctx, progress=lambda m, f: say(m, 0.05 + 0.55 * f))
    secs["profile"] = time.perf_counter() - t

    t = time.perf_counter()
    say("plan: Halda on the profiled cluster", 0.62)
    rmodel = runtime_model(model)
    prompt = prompt_ids(cfg.prompt_tokens, model.vocab, cfg.seed)
    draft = None
    if draft_path is not None and draft_model is not None:  # acceptance from a separate run, then the plan
        log = None
        if not cfg.acceptance:
            say("acceptance: a separate run of the runtime's speculative loop", 0.61)
            log = spv.measure_acceptance(weights, draft_path, prompt, cfg.tokens, cfg.draft_tokens, cfg.n_ctx)
            log.save(out / "acceptance.json")
        draft = spv.draft_spec(draft_model, cfg.draft_tokens, prof.cluster.head, spv.acceptance_model(cfg.acceptance, log))
        plan = spv.plan_with_draft(cfg.system, rmodel, prof.cluster, draft, n_ctx=cfg.n_ctx,
                                   prompt_tokens=cfg.prompt_tokens, options=dict(cfg.plan_options))
    else:
        outcome = make_plan(cfg.system, rmodel, prof.cluster, n_ctx=cfg.n_ctx, prompt_tokens=cfg.prompt_tokens,
                            **dict(cfg.plan_options))
        if not outcome.feasible or outcome.plan is None:
            raise PlanError(f"{cfg.system} cannot run {model.name} on the profiled {cluster.name}: {outcome.reason}",
                            where="validate", fix="give the emulated devices more memory or use a smaller model")
        plan = outcome.plan
    secs["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    say("simulate: the plan as the runtime executes it", 0.64)
    sim = predict(plan, model, prof.cluster, tokens=cfg.tokens, prompt_tokens=cfg.prompt_tokens, seed=cfg.seed,
                  residency=cfg.residency, draft=draft)
    if not sim.feasible:
        raise PlanError(f"the simulator cannot run the plan: {sim.reason}", where="validate", fix="see the reason")
    secs["simulate"] = time.perf_counter() - t

    t = time.perf_counter()
    say(f"run: {cfg.tokens} tokens on the emulated {cluster.name}", 0.66)
    # a model given as a config.json is not in the catalogue, so the runtime cannot compare the plan's
    # model with the weights by name (a GGUF file's is its stem): they were written from this very spec
    run_plan_ = plan if model.name in catalogue() else plan.replace(model=load_model(weights).name)
    run, host = measure(run_plan_, weights, cluster, tokens=cfg.tokens, prompt=prompt, seed=cfg.seed,
                        emulate=cfg.emulate, timeout=cfg.timeout, residency=cfg.residency,
                        draft=None if draft_path is None else str(draft_path), draft_tokens=cfg.draft_tokens)
    secs["run"] = time.perf_counter() - t
    if not prof.emulated:
        notes.append("degraded: not root, so the devices ran as plain processes without memory, CPU, disk or "
                     "link limits (profiled the same way); the comparison still holds for what ran")
    if host.foreign_share > 0.15:
        notes.append(f"other processes used {100 * host.foreign_share:.0f} % of the host's CPUs during the run; "
                     "the emulated devices share those CPUs, so measured times are slower than on a quiet host")

    t = time.perf_counter()
    say("compare: tables, figure, timelines", 0.95)
    rows = compare(sim, run, plan, cluster)
    if draft is not None:
        rows[1:1] = spv.speculation_rows(sim, run)
        notes.append(f"speculative decoding: draft {draft_model.name if draft_model else cfg.draft} on the head, "
                     f"K = {cfg.draft_tokens}; the prediction's acceptance: {draft.acceptance.describe()}"
                     + ("" if cfg.acceptance else " (measured by a separate run, acceptance.json)"))
    res = ValidateResult(cfg, prof, plan, sim, run, rows, out, host, secs, notes)
    write_outputs(res)
    secs["compare"] = time.perf_counter() - t
    atomic_write_text(res.files()["summary"], json.dumps(res.summary(), indent=1, default=str) + "\n")
    say("done", 1.0)
    return res


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "probe":
        try:
            return probe_main(args[1:])
        except PrimasimError as exc:
            print(f"primasim validate probe: error: {exc.message}", file=sys.stderr)
            return 2
    print("usage: python -m primasim.loop.validate probe ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
