"""What primasim's runtime does that the simulator models: one place for both to import.

- the memory a worker reserves besides weights: its KV caches (f32, `max_seq` positions per
  sequence in flight) and `ACT_RESERVE` for activations and the allocator; with a draft model
  (speculative decoding) the head also pins the draft (`draft_reserve`);
- the attention span buckets (`attention_span`): attention reads the cache positions in use,
  rounded up to a power of two of at least `MIN_SPAN`;
- batched decode (runtime/batch.py, runtime/_kvcache.py): batches padded to `BATCH_BUCKETS`, KV in
  blocks of `BLOCK_TOKENS`, the pool sized to `KV_POOL_SHARE` of the room a memory limit leaves;
- outside a memory cgroup a worker budgets prima.cpp's d_avail, MemAvailable x `HOST_AVAILABLE_SHARE`;
- a worker's background threads take `BACKGROUND_CPU` of its device's CPU quota;
- every byte a planned-streaming worker reads and evicts costs `STREAM_CPU_PER_BYTE` of its CPU;
- an emulated CPU quota is enforced at the host's scheduler ticks (`SCHED_TICK`);
- the host's CPUs slow each other's decode windows while both compute (`HOST_CONTENTION`);
- `runtime_model`: a ModelSpec as the runtime holds it (f32 KV, the activation reserve), for plans
  and simulations compared with the runtime;
- residency (`plan_residency`): how a worker with a memory budget holds its weights, in either
  mode a run can pick (`RESIDENCY_MODES`):

  ``planned``  the worker decides. Weights that fit the budget are loaded and stay; otherwise it
               keeps the same fraction r of every layer resident and streams the rest of each layer
               from disk each time the layer runs, evicting it right after use (MADV_DONTNEED +
               POSIX_FADV_DONTNEED), so a token re-reads about the bytes that do not fit, no more
               (reads and evictions are page-exact: runtime/worker/residency.py). r is the
               largest fraction with r * window + c * (1 - r) * layer <= budget (c = 2 with prefetch:
               room for the next layer's streamed part read in the background, else 1).
  ``lru``      the kernel decides, as llama.cpp and prima.cpp leave it: every weight is mmap'd, read
               on demand, kept or evicted by the page cache's LRU lists; with prefetch, the next
               window is madvise(WILLNEED)'d while the rest of the ring computes (prima.cpp's
               prefetch, only when there is a ring and the weights do not all fit: otherwise every
               page is resident and the hint only costs CPU).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .model import ModelSpec
from .units import MiB

# activations, the allocator and the warm-up: the worker measures its budget at LOAD before it runs
# every compiled shape once (XLA's first executions allocate), and those allocations then come out of
# the weights' room. Measured 2026-12-07 on llama-mini-300m (fidelity study, home-emu): 7.3-10.8 MB of
# anonymous memory beyond the KV caches after the budget was taken; with 8 MiB reserved, devices
# without prefetch sat at their cgroup's limit and the kernel's LRU evicted resident weights on a
# cyclic scan (desktop re-read 617 MB/token where the plan streams 379). 16 MiB keeps ~5 MB of margin.
ACT_RESERVE = 16 * MiB
# What of ACT_RESERVE a worker's activations and allocator really hold (anonymous memory after
# LOAD and the warm-up, less the runtime's footprint and the KV caches): measured 4-11 MiB, median
# 8.8 MiB over the 208 device runs of the Q4_K_M streaming study (fidelity_stream_q4k/run1,
# anon_peak - load_setup_anon - kv). The residency budget keeps the whole reserve; the kernel does
# not: under a memory limit the page cache gets what anonymous memory leaves (lru_room).
ACT_IN_USE = int(8.8 * MiB)
# a speculative run's draft: what it holds beside its weights + KV after its warm-up and a heap trim
# (XLA's first executions of its 7 step shapes allocate, and not all of it goes back). Measured
# 2026-12-07 on llama-mini-300m's prefix drafts (Draft.load + warm, RssAnon): first:2 18.9 MiB,
# first:4 20.7 MiB outside a cgroup; first:4 on the emulated head 19.5 MiB (anon at the budget's
# measurement minus SETUP's). It was 8 MiB (6 MiB measured before the fused-block kernels), and
# the simulator then gave the memory-short head a 12.8 MB larger budget than the runtime measured:
# 18 MB more streamed per pass (164.6 predicted vs 182.5 planned by the worker).
DRAFT_ACT_RESERVE = 20 * MiB
# a worker's background threads, on the device's CPU quota beside its compute: the memory sampler
# (prima.cpp's memory pressure, every MEM_SAMPLE_INTERVAL s: cgroup memory.stat + /proc/self/status)
# and the control and zmq I/O threads. Measured 2026-12-07 (spec_validation short/first4/K5, 48 tokens
# in ~23.5 s, thread CPU times since GENERATE): the sampler 0.198-0.227 s on each of the four devices,
# control + zmq + sender 0.045-0.06 s: ~10 ms of CPU per second of the run, whatever the device computes.
MEM_SAMPLE_INTERVAL = 0.05
BACKGROUND_CPU = 0.010  # CPU-seconds per second a worker spends outside its compute and reads
# the kernel work of streaming, in the worker's own threads (so on its CPU quota): MADV_WILLNEED
# (page-cache allocation + I/O submission), the compute's first touch (page-table mapping) and the
# eviction (MADV_DONTNEED + POSIX_FADV_DONTNEED frees the pages). `python experiments/stream_cpu.py`,
# 195 MB, one CPU of this host (AMD EPYC), no cgroup: 0.39 ms/MB (willneed 0.15, touch 0.05, evict
# 0.19; load 2.1) and 0.36 (0.16 / 0.05 / 0.15; load ~2), 2026-12-07. A host-CPU figure, not a disk one.
STREAM_CPU_PER_BYTE = 0.37e-3 / 1e6  # CPU-seconds per streamed byte (read ahead, touched, evicted)
# the scheduler tick of the host the emulated devices run on: CFS bandwidth control charges a
# running thread's time to its group's pool at a tick (or a system call, a wake-up), so a thread in
# one long XLA call runs past an exhausted CPU quota until the next tick and repays the overrun
# from the next refills. CONFIG_HZ=250 on this host's kernel (6.18, /proc/config.gz): 4 ms.
SCHED_TICK = 0.004
# the host's two CPUs share the memory bandwidth a decode window streams its weights through: while
# both compute, a window takes more CPU time than alone. `experiments/host_contention.py` (windows
# of 4 f32 blocks of llama-mini-300m, one token, back to back on CPU 0 alone, on CPU 1 alone, then
# on both at once) under the measurement lock, 2026-12-07 22:11 and 22:44 (12 CPU x round pairs),
# and `experiments/host_modes.py` 2026-12-08 01:18 (30 pairs): together / alone 0.85-2.29, bimodal
# (~1.0 or 1.3-2.3), mean 1.35 over the 42 pairs. What decides the mode is outside the guest:
# a plain memory stream slows with the window while in-core and L2-resident work mostly do not (not
# SMT siblings), no steal time (no time-sharing), the guest sees no topology to pin by, and the mode
# switches within seconds, as the speed of one CPU alone moves (most likely the host's other
# guests' memory traffic; not observable from inside). A run of tens of seconds meets both modes: the mean is taken (the expected slow-down),
# for prompt and decode work alike (the recurrent pipeline's concurrent prompts confirm it);
# experiments/results/host_contention.md.
HOST_CONTENTION = 1.35
MIN_SPAN = 256  # smallest attention span bucket (positions)
HOST_AVAILABLE_SHARE = 0.8  # outside a memory cgroup a worker budgets MemAvailable x 0.8 (prima.cpp's d_avail)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)  # batched decode pads the running requests to one of these
BLOCK_TOKENS = 16  # tokens per paged-KV block unless the plan sets Bud's `tile_tokens`
KV_POOL_SHARE = 0.5  # a batch's KV pool takes this share of the room a memory limit leaves
RESIDENCY_MODES = ("planned", "lru")
_ALIASES = {"plan": "planned", "kernel": "lru"}


def emulated_cpus(index: int, threads: int, quota: float, avail: list[int]) -> list[int]:
    """The host CPUs runtime/emulate.py pins emulated device `index` of a cluster to: `threads`
    of them (0: ceil(quota), at least one), consecutive from index x threads, wrapping around the
    host's CPUs `avail`. Devices whose CPUs overlap share them when they compute at once."""
    n = threads or max(1, int(-(-quota // 1)) if quota > 0 else len(avail))
    n = min(n, len(avail))
    return [avail[(index * n + j) % len(avail)] for j in range(n)]


def residency_mode(name: str) -> str:
    """A residency mode by name (`planned`, `lru`; the older `plan` and `kernel` are aliases)."""
    mode = _ALIASES.get(name, name)
    if mode not in RESIDENCY_MODES:
        raise ValueError(f"unknown residency mode {name!r} (use {' or '.join(RESIDENCY_MODES)})")
    return mode


def attention_span(need: int, max_seq: int, quantum: int = 1) -> int:
    """How many cached positions a step attends over: the next power of two >= need (at least
    MIN_SPAN), in whole blocks of `quantum`, at most the cache. Attention then costs what the
    sequences use, not what the cache could hold, at one compilation per bucket."""
    span = max(MIN_SPAN, 1 << max(need - 1, 0).bit_length())
    cap = -(-max_seq // quantum) * quantum
    return min(-(-span // quantum) * quantum, cap)


def kv_bytes(n_layers: int, max_seq: int, n_kv_heads: int, head_dim: int, sequences: int = 1) -> int:
    """The runtime's KV reservation: f32 K and V for `n_layers`, `max_seq` positions per sequence."""
    return 2 * n_layers * max_seq * n_kv_heads * head_dim * 4 * max(1, sequences)


def anon_reserve(n_layers: int, max_seq: int, n_kv_heads: int, head_dim: int, sequences: int = 1) -> int:
    """Anonymous memory a worker allocates besides weights: KV caches + the activation reserve."""
    return kv_bytes(n_layers, max_seq, n_kv_heads, head_dim, sequences) + ACT_RESERVE


def lru_room(budget: float) -> float:
    """Bytes the kernel's page cache can hold of a worker's weights in lru mode: its budget plus the
    part of the activation reserve the activations leave unused (the kernel reclaims by the cgroup's
    limit, not by the worker's budget)."""
    return budget + ACT_RESERVE - ACT_IN_USE


def draft_reserve(draft: ModelSpec, max_seq: int) -> int:
    """What a speculative run's draft holds on the head worker (runtime/worker/speculation.py): its
    weights copied into anonymous memory (pinned, as prima.cpp mlocks the draft), its f32 KV cache
    of `max_seq` + 1 positions and `DRAFT_ACT_RESERVE` (measured: llama-mini-300m's 2- and 4-block
    drafts hold their weights + KV + 19-21 MiB after their warm-up and a heap trim)."""
    return int(draft.total_bytes) + kv_bytes(draft.n_layers, max_seq + 1, draft.n_kv_heads,
                                             draft.head_dim) + DRAFT_ACT_RESERVE


def batch_bucket(n: int) -> int:
    """The padded batch a step of `n` running requests computes."""
    for b in BATCH_BUCKETS:
        if n <= b:
            return b
    return n


def runtime_model(model: ModelSpec) -> ModelSpec:
    """`model` as the runtime holds it: f32 KV caches and, in place of llama.cpp's compute buffer,
    the worker's activation reserve. Plans and simulations compared with the runtime use this."""
    return dataclasses.replace(model, kv_dtype="f32", buffer_bytes=float(ACT_RESERVE))


@dataclass(frozen=True)
class ResidencyPlan:
    """How one device holds its weights within `budget` bytes (see the module docstring).

    `state`: pinned (anonymous copies), fits (everything resident), streams (planned: a fraction
    of every layer kept, the rest streamed), lru (the kernel decides, more than fits), none."""

    mode: str
    state: str
    budget: float
    keep_fraction: float = 1.0
    stream_prefetch: bool = False  # planned: the next layer's streamed part is read in the background
    window_prefetch: bool = False  # lru: the next window is madvise(WILLNEED)'d
    streamed: dict[int, float] = field(default_factory=dict)  # layer -> bytes streamed per use (planned)
    resident_bytes: float = 0.0  # weight bytes kept resident (planned/fits/pinned; lru: what fits)
    output_streamed: float = 0.0  # planned, head: bytes of the output layer streamed per token
    output_blocks: int = 1  # planned, head: calls the output layer is computed in (row blocks, see plan_residency)

    @property
    def streams(self) -> bool:
        return self.state == "streams" and any(v > 0 for v in self.streamed.values())


def keep_fraction(avail: float, window: float, layer: float, c: float) -> float:
    """Largest r with r * window + c * (1 - r) * layer <= avail (0 when even c layers do not fit)."""
    if window <= c * layer:
        return 0.0
    spare = avail - c * layer
    if spare <= 1e-9 * c * layer:  # rounding of avail = c * layer (the output took the rest): keep none
        return 0.0
    return min(1.0, spare / (window - c * layer))


def plan_residency(mode: str, budget: float, layer_bytes: dict[int, float], output_bytes: float = 0.0, *,
                   pinned: bool = False, prefetch: bool = False, ring: int = 1) -> ResidencyPlan:
    """The worker's residency decision (runtime/worker/residency.py) and the simulator's, from the
    same inputs: `budget` = memory for weights (the device's room minus `anon_reserve`),
    `layer_bytes` of the device's blocks, the head's output layer (planned mode keeps it resident --
    it is read whole every token -- as far as it fits beside c layers' streamed parts, and streams
    the rest), prefetch on, and the number of devices in the ring."""
    mode = residency_mode(mode)
    window = float(sum(layer_bytes.values()))
    total = window + output_bytes
    if pinned:
        return ResidencyPlan(mode, "pinned", budget, resident_bytes=total)
    if not layer_bytes:
        return ResidencyPlan(mode, "none", budget, resident_bytes=output_bytes)
    if total <= budget:
        return ResidencyPlan(mode, "fits", budget, resident_bytes=total)
    if mode == "lru":
        return ResidencyPlan(mode, "lru", budget, window_prefetch=prefetch and ring > 1,
                             resident_bytes=max(0.0, min(total, budget)))
    big = max(layer_bytes.values())
    pre = prefetch and keep_fraction(budget - output_bytes, window, big, 2.0) > 0.0
    c = 2.0 if pre else 1.0
    # the head's output layer stays beside room for c layers' streamed parts; what of it does not
    # fit streams too (read before its call, evicted after): kept whole past the budget, the kernel
    # evicted it at the device's limit and a token re-read it by faults (fidelity study 2026-12-07:
    # a 27 MB output on a head with a 12 MB budget, 157 MB read per pass of 117 planned)
    out_keep = min(output_bytes, max(0.0, budget - c * big))
    r = keep_fraction(budget - out_keep, window, big, c)
    streamed = {i: (1.0 - r) * b for i, b in layer_bytes.items()}
    # one output call needs its whole streamed part in memory at once; when that is more than the
    # kernel leaves it (the streamed layers' room, c streamed parts, and the activation reserve's
    # unused part: lru_room), the head computes the output in row blocks of at most the streamed
    # layers' room, each read before its call and evicted after (fidelity study 2026-12-07: Halda's
    # stream-2 head streamed 24 MB of output into ~16 MB and read 184 MB a token where 142 were planned)
    out_streamed = output_bytes - out_keep
    room = c * (1.0 - r) * big
    blocks = math.ceil(out_streamed / room) if room > 0 and out_streamed > lru_room(room) else 1
    return ResidencyPlan(mode, "streams", budget, r, pre, False, streamed, r * window + out_keep,
                         out_streamed, blocks)
