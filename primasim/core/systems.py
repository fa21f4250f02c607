"""The registry of systems: every system primasim plans, simulates and runs, once.

A `System` names what the three halves share: its help line, the schedule its plans have, and
whether primasim's runtime executes that schedule. Each half keys its implementation by these
names: the planners (primasim/plan/planners.py `PLANNERS`: how the system splits a model), the
simulator (primasim/sim/_systems.py: its schedule on simulated devices) and the runtime
(`RUNTIME_SCHEDULES`, the schedules runtime/head.py executes). tests/test_planners.py checks that
every half covers exactly this registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import lookup

RUNTIME_SCHEDULES = ("ring", "rpp", "batch")  # what primasim's runtime executes (runtime/head.py)


@dataclass(frozen=True)
class System:
    name: str
    help: str  # one line: what the system is and how it runs a model
    schedule: str  # of its plans: ring (piped ring), rpp (recurrent pipeline), tp, offload, batch
    family: str  # prima (prima.cpp and its ablations), baseline (another system), planner (a split heuristic)

    @property
    def runs_on_runtime(self) -> bool:
        """Whether primasim's runtime executes this system's plans (else they are simulated only)."""
        return self.schedule in RUNTIME_SCHEDULES


SYSTEMS: dict[str, System] = {s.name: s for s in (
    System("prima", "prima.cpp: Halda plan, piped ring (k laps, windows, GPU/CPU split), mmap + prefetch",
           "ring", "prima"),
    System("prima-no-prefetch", "prima.cpp without prefetching the next window (page faults not hidden)",
           "ring", "prima"),
    System("prima-no-halda", "prima.cpp with the memory-ratio split instead of Halda (§2.5 fallback)", "ring", "prima"),
    System("memsched", "MemSched heuristic (RAM/VRAM ratio split) run in prima.cpp's ring", "ring", "planner"),
    System("perfsched", "PerfSched heuristic (compute-proportional split, OOM migration, CPU fallback; Galaxy) "
           "in prima.cpp's ring", "ring", "planner"),
    System("even", "even layer split with a fixed k in prima.cpp's ring (paper Fig. 2)", "ring", "planner"),
    System("llama.cpp", "llama.cpp on one device: -ngl layers on the GPU (as many as fit), the rest mmap'd on "
           "the CPU", "ring", "baseline"),
    System("exo", "exo: memory-ratio ring, weights pinned (OOM when a slice does not fit), an RPC per hop and "
           "O(N) status/result broadcasts per token", "ring", "baseline"),
    System("dllama", "distributed-llama: tensor parallel on 2^n CPUs, two all-reduces per layer (all-to-all over "
           "the network), weights pinned", "tp", "baseline"),
    System("mdi-llm", "MDI-LLM: static split table, recurrent pipeline with S sequences circulating the ring "
           "(S = 1: plain pipeline)", "rpp", "baseline"),
    System("pipo", "PIPO: barrier-free offload pipeline (weight loads, KV loads/saves, compute) on one GPU device",
           "offload", "baseline"),
    System("flexgen", "FlexGen: the same offload pipeline with a barrier after every layer", "offload", "baseline"),
    System("bud", "Bud: CPU request batching with a paged (tiled) KV pool and admission by memory; kv=prealloc "
           "reserves max_len per request, batch=1 is one request at a time", "batch", "baseline"),
)}


def get_system(name: str) -> System:
    """The system called `name`; an unknown name is a SpecError listing the known ones."""
    return lookup(SYSTEMS, name, what="system", where="--system", fix=f"use one of {', '.join(SYSTEMS)}")


def system_names() -> list[str]:
    return list(SYSTEMS)
