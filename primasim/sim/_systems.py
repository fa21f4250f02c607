"""The registry: one entry per system, naming its schedule, its help text and its fixed traits.

Software constants that are properties of a system (not of a device) live here, each with its
provenance; they are shared by every model and cluster the system runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from primasim.core.errors import SpecError

from ._context import SimContext, SimResult
from ._fitted import value
from ._ring import RingOptions, run_ring

Runner = Callable[[SimContext, "SystemEntry"], SimResult]


@dataclass(frozen=True)
class SystemEntry:
    name: str
    help: str
    schedule: str  # ring | tp | offload | batch
    runner: Runner
    ring: RingOptions | None = None
    params: dict[str, Any] = field(default_factory=dict)


SYSTEMS: dict[str, SystemEntry] = {}


def register(entry: SystemEntry) -> SystemEntry:
    if entry.name in SYSTEMS:
        raise ValueError(f"system {entry.name!r} registered twice")
    SYSTEMS[entry.name] = entry
    return entry


def get_system(name: str) -> SystemEntry:
    _load_all()
    try:
        return SYSTEMS[name]
    except KeyError:
        raise SpecError(f"unknown system {name!r}", where="--system",
                        fix=f"use one of {', '.join(sorted(SYSTEMS))}") from None


def system_names() -> list[str]:
    _load_all()
    return list(SYSTEMS)


def _ring_runner(ctx: SimContext, entry: SystemEntry) -> SimResult:
    assert entry.ring is not None and ctx.plan is not None
    opts = entry.ring
    if ctx.plan.options.get("output_on_gpu"):
        opts = dataclasses.replace(opts, output_on_gpu=True)
    if entry.name == "exo":
        opts = dataclasses.replace(opts, compute_scale=value("exo_compute_scale"))
    return run_ring(ctx, opts)


# exo (Python, asyncio + gRPC): every hop is a SendTensor RPC with numpy (de)serialisation, and
# each shard call broadcasts an opaque start/end status to every peer (fire-and-forget tasks); the
# last shard broadcasts the result (exo/orchestration/standard_node.py). 4 ms per RPC is an
# estimate for gRPC-in-Python plus tensor serialisation on laptop-class CPUs (not fitted).
EXO_RPC_OVERHEAD = 4e-3
# The fitted constants of these engines live in _fitted.py with the cells they were fitted on:
# exo_compute_scale (exo's engines' per-layer time relative to llama.cpp's, exo 8B), and MDI-LLM's
# per-message (pickling in one Python process, which blocks its compute: reference C.3) and
# per-block (eager PyTorch dispatch on the TX2) costs, fitted on NanoLlama on 1 and 3 nodes.

_LOADED = False


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    ring = RingOptions()
    for name, help in (
        ("prima", "prima.cpp: Halda plan, piped ring (k laps, windows, GPU/CPU split), mmap + prefetch"),
        ("prima-no-prefetch", "prima.cpp without prefetching the next window (page faults not hidden)"),
        ("prima-no-halda", "prima.cpp with the memory-ratio split instead of Halda (§2.5 fallback)"),
        ("memsched", "MemSched heuristic (RAM/VRAM ratio split) run in prima.cpp's ring"),
        ("perfsched", "PerfSched heuristic (compute-proportional split, OOM migration) in prima.cpp's ring"),
        ("even", "even layer split with a fixed k in prima.cpp's ring (paper Fig. 2)"),
        ("llama.cpp", "llama.cpp on one device: -ngl layers on the GPU, the rest mmap'd on the CPU"),
    ):
        register(SystemEntry(name, help, "ring", _ring_runner, ring))
    register(SystemEntry("exo", "exo: memory-ratio ring, weights pinned (OOM when a slice does not fit), "
                         "an RPC per hop and O(N) status/result broadcasts per token", "ring", _ring_runner,
                         RingOptions(msg_overhead=EXO_RPC_OVERHEAD, status_broadcasts=2, result_broadcast=True)))
    from ._tp import run_tp

    register(SystemEntry("dllama", "distributed-llama: tensor parallel on 2^n CPUs, two all-reduces per layer "
                         "(all-to-all over the network), weights pinned", "tp", run_tp))
    register(SystemEntry("mdi-llm", "MDI-LLM: recurrent pipeline, S sequences circulating the ring "
                         "(S = 1: plain pipeline)", "ring", _mdi_runner,
                         RingOptions(overhead_on_compute=True)))
    from ._offload import run_offload

    register(SystemEntry("pipo", "PIPO: barrier-free offload pipeline (weight loads, KV loads/saves, "
                         "compute) on one GPU device", "offload", run_offload, params={"barrier": False}))
    register(SystemEntry("flexgen", "FlexGen: the same offload pipeline with a barrier after every layer",
                         "offload", run_offload, params={"barrier": True}))
    from ._batch import run_batch

    register(SystemEntry("bud", "Bud: CPU request batching with a paged (tiled) KV pool and admission by memory; "
                         "kv=prealloc reserves max_len per request, batch=1 is one request at a time", "batch",
                         run_batch))


def _mdi_runner(ctx: SimContext, entry: SystemEntry) -> SimResult:
    assert entry.ring is not None and ctx.plan is not None
    S = ctx.cfg.S or int(ctx.plan.options.get("S", len(ctx.plan.active)))
    over = float(ctx.plan.options.get("msg_overhead_s", 0.0)) or value("mdi_msg_overhead_s")
    return run_ring(ctx, dataclasses.replace(entry.ring, sequences=S, msg_overhead=over,
                                             layer_overhead=value("mdi_layer_overhead_s")))
