"""SimConfig: the knobs of one simulation run (workload, fidelity and calibration)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from primasim.core.errors import SpecError
from primasim.core.runtime_facts import SCHED_TICK


def _h(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SimConfig:
    """How to simulate: workload, randomness, fidelity and the few calibrated factors."""

    tokens: int = _h(32, "tokens generated per sequence (TPOT is measured over them)")
    prompt_tokens: int = _h(16, "prompt length; the prompt is prefilled as one batch (TTFT)")
    seed: int = _h(0, "seed of every random draw (network jitter, request lengths)")
    jitter: bool = _h(True, "draw per-message latency from the cluster's jitter (P50/P90 differ)")
    chunks_per_layer: int = _h(4, "page-cache granularity: a layer's weights are this many chunks")
    warmup: bool = _h(True, "run one untimed decode pass first (llama.cpp's warm-up): the page cache "
                      "starts in its steady state, as in the paper's measurements")
    prefetch: bool | None = _h(None, "override the plan's prefetch flag (None: keep the plan's)")
    # --- calibration (see data/clusters/prima-d1-d6.toml [devices.sources] and README material)
    fault_efficiency: float = _h(1.0, "demand-paging read throughput as a fraction of the disk's "
                                 "(small synchronous readahead windows on page faults)")
    sample_cost_per_vocab: float = _h(0.0, "host seconds per vocabulary entry to sample a token "
                                      "(softmax + sampler chain over V logits); 0 = as the cost model")
    kv_read: Literal["ctx", "filled"] = _h("filled", "attention per layer and step: over the filled positions, "
                                           "padded to 32 as llama.cpp does (KV traffic grows per token, prefill is "
                                           "quadratic), or the cost model's accounting (the whole n_ctx cache read, "
                                           "FLOPs at 256 positions)")
    roofline: bool = _h(True, "a GPU layer takes the longer of its compute and its memory traffic (the kernel "
                        "overlaps them); False: their sum, prima.cpp's cost model (CPU layers always add them)")
    wifi_frames: bool = _h(True, "Wi-Fi airtime per transmission opportunity (contention, preamble, block ack; "
                           "NetworkSpec.airtime) on top of the payload (False: bytes / bandwidth)")
    runtime: bool = _h(False, "model primasim's own runtime (runtime/) instead of the system's engine: its "
                       "residency plan (keep part of every layer, stream the rest), per-call costs, f32 KV "
                       "cache and cold start (primasim/sim/_runtime.py); for comparisons with `primasim run`")
    residency: str = _h("planned", "runtime: how a device short of memory holds its weights -- planned (keep part of "
                        "every layer, stream the rest) or lru (the OS page cache decides; prefetch of the next "
                        "window), as `primasim run --residency`")
    cpu_quota_bursts: bool = _h(True, "runtime: an emulated CPU quota refills every CFS period, so short calls "
                                "after a wait run at full speed (False: every call at the profiled average rate)")
    quota_ticks: bool = _h(True, "runtime: the kernel charges an emulated CPU quota at scheduler ticks "
                           "(runtime_facts.SCHED_TICK), so a call runs on past a spent quota until the next tick and "
                           "repays the overrun from the next refills (False: throttled the moment the quota is spent)")
    disk_slices: bool = _h(True, "runtime: a throttled disk grants bytes per blk-throttle slice (False: a plain "
                           "rate at the sustained throughput)")
    host_cpus: int = _h(0, "runtime on an emulated cluster: the host CPUs its single-thread devices are pinned to "
                        "(device i of the cluster on CPU i mod host_cpus, runtime_facts.emulated_cpu); devices on "
                        "one CPU share it while they compute at once (0: every device has its own CPUs)")
    host_contention: bool = _h(True, "runtime on an emulated cluster (host_cpus): while devices on different host "
                               "CPUs compute at once, each window takes runtime_facts.HOST_CONTENTION times the CPU time "
                               "(the CPUs share the memory system; False: host CPUs independent)")
    link_buckets: bool = _h(True, "a link with a shaper's bucket (`burst_kb`, tc tbf) lets that much through at once "
                            "after an idle spell (False: every message at the link's rate)")
    # --- schedule-specific workload knobs
    S: int | None = _h(None, "mdi-llm: sequences in flight (default: number of nodes)")
    batch: int | None = _h(None, "bud: max batch / pipo, flexgen: batch size (default per system)")
    requests: int = _h(100, "bud: number of requests in the workload")
    max_len: int = _h(2048, "bud: max sequence length a max-length KV preallocation reserves")
    draft: Any = _h(None, "speculative decoding: a primasim.core.speculation.DraftSpec (draft model, tokens per "
                    "pass K, device, acceptance model); None = plain decoding (primasim/sim/_speculative.py)")
    # --- output
    record_spans: bool = _h(True, "keep per-resource busy intervals in the trace (timeline)")
    max_sim_time: float = _h(1e6, "safety stop for the simulated clock, seconds")

    @property
    def sched_tick(self) -> float:
        """Seconds between the scheduler ticks an emulated CPU quota is charged at (0: at once)."""
        return SCHED_TICK if self.quota_ticks else 0.0

    def replace(self, **changes: Any) -> SimConfig:
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise SpecError(f"tokens must be >= 1, got {self.tokens}", where="--tokens", fix="generate at least one token")
        if self.prompt_tokens < 1:
            raise SpecError(f"prompt tokens must be >= 1, got {self.prompt_tokens}", where="--prompt-tokens",
                            fix="use a prompt of at least one token")
        if self.residency not in ("planned", "lru", "plan", "kernel"):
            raise SpecError(f"unknown residency {self.residency!r}", where="--residency", fix="use planned or lru")
        if self.chunks_per_layer < 1:
            raise SpecError("chunks_per_layer must be >= 1", where="SimConfig", fix="use 1..16")
        if not 0 < self.fault_efficiency <= 1:
            raise SpecError("fault_efficiency must be in (0, 1]", where="SimConfig", fix="use e.g. 0.8")
        if self.S is not None and self.S < 1:
            raise SpecError(f"S must be >= 1, got {self.S}", where="--S", fix="put at least one sequence in flight")
        if self.batch is not None and self.batch < 1:
            raise SpecError(f"batch must be >= 1, got {self.batch}", where="--batch", fix="use a batch of at least 1")


def config_help() -> list[tuple[str, str]]:
    return [(f.name, f.metadata["help"]) for f in dataclasses.fields(SimConfig)]
