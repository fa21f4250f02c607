"""The registry: one entry per system, naming its schedule, its help text and its fixed traits.

Software constants that are properties of a system (not of a device) live here, each with its
provenance; they are shared by every model and cluster the system runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from primasim.core import systems
from primasim.core.systems import System

from ._batch import run_batch
from ._context import SimContext, SimResult
from ._fitted import value
from ._offload import run_offload
from ._ring import RingOptions, run_ring
from ._tp import run_tp

Runner = Callable[[SimContext, "SystemEntry"], SimResult]


@dataclass(frozen=True)
class SystemEntry:
    """How the simulator runs one system of the registry (primasim.core.systems)."""

    name: str
    schedule: str  # the simulated engine: ring | tp | offload | batch (MDI-LLM's RPP runs on the ring engine)
    runner: Runner
    ring: RingOptions | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def system(self) -> System:
        return systems.SYSTEMS[self.name]

    @property
    def help(self) -> str:
        return self.system.help


SYSTEMS: dict[str, SystemEntry] = {}


def register(entry: SystemEntry) -> SystemEntry:
    if entry.name in SYSTEMS:
        raise ValueError(f"system {entry.name!r} registered twice")
    SYSTEMS[entry.name] = entry
    return entry


def get_system(name: str) -> SystemEntry:
    systems.get_system(name)  # an unknown name fails here, with the list
    _load_all()
    return SYSTEMS[name]


def system_names() -> list[str]:
    return systems.system_names()


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
    for name in ("prima", "prima-no-prefetch", "prima-no-halda", "memsched", "perfsched", "even", "llama.cpp"):
        register(SystemEntry(name, "ring", _ring_runner, ring))
    register(SystemEntry("exo", "ring", _ring_runner,
                         RingOptions(msg_overhead=EXO_RPC_OVERHEAD, status_broadcasts=2, result_broadcast=True)))
    register(SystemEntry("dllama", "tp", run_tp))
    register(SystemEntry("mdi-llm", "ring", _mdi_runner,
                         RingOptions(overhead_on_compute=True)))
    register(SystemEntry("pipo", "offload", run_offload, params={"barrier": False}))
    register(SystemEntry("flexgen", "offload", run_offload, params={"barrier": True}))
    register(SystemEntry("bud", "batch",
                         run_batch))


def _mdi_runner(ctx: SimContext, entry: SystemEntry) -> SimResult:
    assert entry.ring is not None and ctx.plan is not None
    S = ctx.cfg.S or int(ctx.plan.options.get("S", len(ctx.plan.active)))
    over = float(ctx.plan.options.get("msg_overhead_s", 0.0)) or value("mdi_msg_overhead_s")
    return run_ring(ctx, dataclasses.replace(entry.ring, sequences=S, msg_overhead=over,
                                             layer_overhead=value("mdi_layer_overhead_s")))
