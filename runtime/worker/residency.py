"""Where a worker's weights live while it runs: its memory budget, the residency decision
(`primasim.core.runtime_facts.plan_residency`, shared with the simulator) and carrying it out.

The budget is measured at LOAD, after the driver has limited the device's memory (an emulated
device's cgroup: the runtime's own footprint + the device's memory), before the KV caches are
allocated: the cgroup's limit minus what it holds, or, outside a limited cgroup, prima.cpp's
d_avail (MemAvailable x 0.8); minus the KV caches and the activation reserve.

A streaming device reads and evicts its weights page-exactly. Linux's page cache holds a file in
large folios (ext4 since 6.x: readahead builds them up to 2 MiB, naturally aligned), and
POSIX_FADV_DONTNEED drops only the folios wholly inside a range: a folio straddling a layer's
kept/streamed cut or the layer's end stayed resident after the eviction, up to two per layer,
filling the device's memory until reclaim took kept pages, and a token re-read 1.3-1.7x the
streamed bytes (measured 2026-12-07: llama-mini-300m Q4_K_M, 8 layers keeping 11 %, 27 MB for
files: 106.6 MB read per pass of 64.9 MB streamed; 1.00x with the reads below). So the window's
mappings are MADV_RANDOM (a fault reads its own page, no read-around that would build a large
folio) and the weights are read by MADV_WILLNEED over exactly the ranges (`checkpoint.prefetch`:
readahead of order-0 pages, in large requests): the kept part at LOAD, a layer's streamed part
just before it runs (`read_layer`, unless the prefetch thread already has).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from primasim.core.cgroups import UNLIMITED, own_group
from primasim.core.procfs import meminfo
from primasim.core.runtime_facts import HOST_AVAILABLE_SHARE, ResidencyPlan, plan_residency

from ..checkpoint import prefetch as read_ranges
from ..pages import Ranges, advise_random, drop_pages, mapped_spans, split_ranges, touch_pages
from .stage import Stage


def memory_budget(reserve: float) -> tuple[float, str]:
    """Bytes this process can give its weights, and how that was measured."""
    g = own_group("memory")
    if g is not None:
        limit = g.memory_max()
        if limit < UNLIMITED // 2:
            # what reclaim can take (file pages on the LRU lists) is room, as in MemAvailable
            used = g.held()
            return float(limit - used - reserve), (f"memory cgroup v{g.version}: limit {limit} - usage {used} "
                                                   f"(less evictable page cache) - reserve {reserve:.0f}")
    avail = meminfo().get("MemAvailable", 1 << 62)
    return (HOST_AVAILABLE_SHARE * avail - reserve,
            f"MemAvailable {avail} x {HOST_AVAILABLE_SHARE} - reserve {reserve:.0f}")


@dataclass
class Residency:
    """The residency a worker carries out: the plan, and per layer the ranges it streams."""

    plan: ResidencyPlan
    layer_stream: dict[int, Ranges] = field(default_factory=dict)  # evicted after every use
    layer_spans: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    output_stream: Ranges = field(default_factory=list)  # the head's output layer: the part it streams
    # the output computed in row blocks (plan.output_blocks > 1): (first row, end row, streamed ranges)
    output_blocks: list[tuple[int, int, Ranges]] = field(default_factory=list)
    kept: Ranges = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def streams(self) -> bool:
        return bool(self.layer_stream) and self.plan.streams

    def read_layer(self, i: int) -> None:
        """Start reading layer `i`'s streamed part (what is not in memory yet): the compute's
        faults then only wait for it, page by page, without read-around (see the module doc)."""
        read_ranges(self.layer_stream.get(i, []))

    def evict_layer(self, i: int) -> None:
        """Drop layer `i`'s streamed part from memory after use."""
        drop_pages(self.layer_stream.get(i, []), self.layer_spans.get(i))

    def read_output(self) -> None:
        """Start reading the part of the output layer that does not stay resident (if any)."""
        read_ranges(self.output_stream)

    def evict_output(self) -> None:
        drop_pages(self.output_stream)


def _intersect(ranges: Ranges, f: str, a: int, b: int) -> Ranges:
    out: Ranges = []
    for g, off, n in ranges:
        lo, hi = max(off, a), min(off + n, b)
        if g == f and hi > lo:
            out.append((g, lo, hi - lo))
    return out


def output_blocks(stage: Stage, streamed: Ranges, n: int) -> list[tuple[int, int, Ranges]]:
    """The output matrix's vocabulary rows in `n` blocks of equal rows, each with the part of it
    that is streamed (read before the block's call, evicted after; the kept rows stay)."""
    (f, off, _), rows, row_bytes = stage.output_matrix()
    per = -(-rows // n)
    out = []
    for a in range(0, rows, per):
        b = min(rows, a + per)
        out.append((a, b, _intersect(streamed, f, off + a * row_bytes, off + b * row_bytes)))
    return out


def split_streams(res: Residency, lay_ranges: dict[int, Ranges], keep: dict[int, float], also_kept: Ranges,
                  read: bool = True) -> int:
    """Planned streaming: keep the first `keep[i]` bytes of every layer `i` (and `also_kept`, the
    head's output) resident, stream the rest; read what is kept now (unless not `read`: `load`
    reads it later). The layers' mappings become MADV_RANDOM and every read is an exact
    MADV_WILLNEED (module doc). Returns bytes touched."""
    advise_random([r for rs in lay_ranges.values() for r in rs])
    kept: Ranges = list(also_kept)
    for i, rs in lay_ranges.items():
        k, st = split_ranges(rs, keep[i])
        kept += k
        res.layer_stream[i] = st
        res.layer_spans[i] = mapped_spans(st)
    res.kept = kept
    if not read:
        return 0
    read_ranges(kept)
    return touch_pages(kept)


def load(stage: Stage, mode: str, budget: float, *, pinned: bool, prefetch: bool, ring: int,
         how: str = "", before_reading: Callable[[Residency], None] | None = None) -> Residency:
    """Decide and carry out the residency of `stage`'s weights within `budget` bytes: touch what
    stays resident (in compute order), split what is streamed (planned mode). lru mode reads the
    window in order too, like llama.cpp's load, and the kernel keeps what fits.
    `before_reading(res)`: called once the residency is decided, before any weight page is read
    (a server's warm-up, whose temporaries must not evict weights: Session.load)."""
    t0 = time.time()
    layers = stage.layers
    lay_ranges = {i: stage.layer_ranges(i) for i in layers}
    lay_bytes = {i: float(sum(r[2] for r in rs)) for i, rs in lay_ranges.items()}
    out = stage.output_ranges()
    out_b = float(sum(r[2] for r in out))
    plan = plan_residency(mode, budget, lay_bytes, out_b, pinned=pinned, prefetch=prefetch, ring=ring)
    res = Residency(plan)
    if stage.head and not pinned:
        # one embedding row is read per token: without MADV_RANDOM each row's page fault reads
        # the disk's whole readahead window around it (8 MiB here), filling the budget
        advise_random(stage.input_ranges())
    window = [r for i in layers for r in lay_ranges[i]]
    if plan.state == "fits":
        # the embedding (one row read per token) is loaded too only if it also fits: touching it
        # past the budget made the kernel evict the window, which the first token re-read
        inp = stage.input_ranges()
        if plan.resident_bytes + sum(r[2] for r in inp) > budget:
            inp = []
        res.kept = window + out + inp
    elif plan.state == "streams":
        out_keep, res.output_stream = split_ranges(out, out_b - plan.output_streamed)
        if plan.output_blocks > 1:
            advise_random(res.output_stream)  # its blocks are read exactly, like a layer's streamed part
            res.output_blocks = output_blocks(stage, res.output_stream, plan.output_blocks)
        split_streams(res, lay_ranges, {i: plan.keep_fraction * lay_bytes[i] for i in layers}, out_keep, read=False)
    if before_reading is not None:
        tw = time.time()
        before_reading(res)
        t0 += time.time() - tw  # load_s: the weights' part only
    touched = 0
    if plan.state == "fits":
        touched = touch_pages(res.kept)
    elif plan.state == "lru":
        touched = touch_pages(window + out)  # the kernel keeps what fits, evicting as it goes
    elif plan.state == "streams":
        read_ranges(res.kept)
        touched = touch_pages(res.kept)
    res.info = {"window_bytes": float(sum(lay_bytes.values())), "output_bytes": out_b, "budget": budget,
                "budget_how": how, "residency": plan.state, "mode": plan.mode,
                "resident_bytes": float(sum(r[2] for r in res.kept)) if plan.state == "streams" else plan.resident_bytes,
                "keep_fraction": plan.keep_fraction,
                "stream_prefetch": plan.stream_prefetch, "window_prefetch": plan.window_prefetch,
                "streamed_bytes": float(sum(r[2] for st in res.layer_stream.values() for r in st)),
                "output_streamed_bytes": float(sum(r[2] for r in res.output_stream)),
                "output_blocks": float(max(1, len(res.output_blocks))),
                "touched": touched, "load_s": time.time() - t0}
    return res
