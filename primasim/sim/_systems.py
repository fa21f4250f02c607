"""The registry: one entry per system, naming its schedule, its help text and its fixed traits.

Software constants that are properties of a system (not of a device) live here, each with its
provenance; they are shared by every model and cluster the system runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._errors import SpecError
from ._context import SimContext, SimResult
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
        opts = RingOptions(**{**opts.__dict__, "output_on_gpu": True})
    return run_ring(ctx, opts)


# exo (Python, asyncio + gRPC): every hop is a SendTensor RPC with numpy (de)serialisation, and
# each shard call broadcasts an opaque start/end status to every peer (fire-and-forget tasks); the
# last shard broadcasts the result (exo/orchestration/standard_node.py). 4 ms per RPC is an
# estimate for gRPC-in-Python plus tensor serialisation on laptop-class CPUs (not fitted).
EXO_RPC_OVERHEAD = 4e-3
# exo's engines (tinygrad on Linux, MLX on macOS) are slower per layer than llama.cpp's kernels.
# FITTED to the paper's only exo number (Table 4, Llama 3-8B: 263 ms on D1-D3); a factor of 6 is
# consistent with tinygrad loading the fp16 Hugging Face weights (3.3x the Q4K bytes) at roughly
# half of llama.cpp's kernel efficiency, and with exo's 42-51 % memory pressure on D2/D3 (Table 5).
EXO_COMPUTE_SCALE = 6.0
# MDI-LLM (Python threads + pickled dicts over TCP, reference C.3): each message is pickled and
# queued by the node's Python process, which blocks its processing loop (GIL). FITTED to the
# README's 3-node NanoLlama throughput (30.3 tok/s), the way reference C.6 suggests; the 2-node
# value (25.9 tok/s) is then a prediction.
MDI_MSG_OVERHEAD = 9.5e-3
# MDI-LLM runs litGPT blocks in eager PyTorch: every block issues a few dozen small kernels (norms,
# q/k/v/o and MLP projections, RoPE, KV-cache index updates, attention, residual adds), each paid in
# Python dispatch + a CUDA launch on the TX2's Cortex-A57 cores (~50-100 us per op), whatever the
# block's size. FITTED to the README's 1-node NanoLlama throughput (17.9 tok/s) with the TX2's GPU
# streaming an estimated 40 GB/s; the TinyLlama values (2 and 3 nodes) are then predictions. Without
# this term a single bandwidth fitted on NanoLlama predicted TinyLlama 40 % slow.
MDI_LAYER_OVERHEAD = 2.45e-3

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
                         RingOptions(msg_overhead=EXO_RPC_OVERHEAD, status_broadcasts=2, result_broadcast=True,
                                     compute_scale=EXO_COMPUTE_SCALE)))
    from ._tp import run_tp

    register(SystemEntry("dllama", "distributed-llama: tensor parallel on 2^n CPUs, two all-reduces per layer "
                         "(all-to-all over the network), weights pinned", "tp", run_tp))
    register(SystemEntry("mdi-llm", "MDI-LLM: recurrent pipeline, S sequences circulating the ring "
                         "(S = 1: plain pipeline)", "ring", _mdi_runner,
                         RingOptions(msg_overhead=MDI_MSG_OVERHEAD, overhead_on_compute=True,
                                     layer_overhead=MDI_LAYER_OVERHEAD)))
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
    over = float(ctx.plan.options.get("msg_overhead_s", 0.0)) or entry.ring.msg_overhead
    return run_ring(ctx, RingOptions(**{**entry.ring.__dict__, "sequences": S, "msg_overhead": over}))
