"""The OS page cache of one device, at chunk granularity (a chunk = a slice of one layer's weights).

mmap'd weights live here; a chunk that is not resident must be read from disk before compute can
use it (a page fault), and room for it is made by the OS's reclaim policy. Nothing here is a
formula for what a token re-reads: that emerges from the access pattern (layer order, laps,
prefetch) meeting the policy. The policies are the kernels' own rules, each with its source:

- linux (mm/vmscan.c, mm/workingset.c, v5.9+ two-list LRU):
  - a page enters the inactive list (a demand fault maps it with its PTE accessed bit set; a
    readahead or madvise(WILLNEED) page enters unmapped, not accessed);
  - reclaim scans the inactive tail (folio_check_references): a mapped page whose accessed bit is
    set is rotated once with PG_referenced set, and activated if it is found accessed again; a
    page not accessed since the last scan is evicted, leaving a shadow entry with the
    "nonresident age" (bytes evicted or activated so far). `large_folios` (an option, off by
    default and in the runtime model) activates a chunk found with accessed PTEs at its first
    scan instead, as if every PTE of a large folio counted (ext4 on 6.x reads ahead in folios of up
    to 2 MiB): it reproduces the knife edge of one replay (experiments/lru_readaround.py: a 36.5 MB
    window reads 1.4x a pass in 37 MB of room and 0.23x in 38; rotated once, the model thrashes up
    to ~45 MB) but not the runtime's lru devices traced on cold starts (PRIMASIM_PAGE_TRACE,
    2026-12-08: 0.1-0.2 MB on the active list, one fault and 25 MB read per one-layer window; with
    the option the model faulted twice a window and read 145 MB a token where they read 100);
  - a page whose read is still in flight is locked; reclaim cannot take it (shrink_folio_list:
    folio_trylock fails -> `keep`) and puts it back at the inactive list's head
    (move_folios_to_lru -> lruvec_add_folio), so read-ahead pages a scan will use soon get a
    whole trip down the list again instead of being the first to go once their read completes;
  - the active list is kept at most `inactive_ratio = isqrt(10 x GB)` times the inactive list
    (inactive_is_low); deactivated pages go to the inactive head;
  - a refault whose distance (age now - age at eviction) is at most the workingset size -- the
    active file list, plus every other process's anonymous memory while swap has room -- comes
    back active (workingset_refault), and the reclaim cost it records makes the kernel swap idle
    anonymous memory out instead of dropping file pages (lru_note_cost): `swappable` bytes of
    other processes' idle memory can make room that way.
  Consequences that are *not* coded: a loop that fits is read once; a loop a little larger than
  the cache is absorbed by swapping idle memory out when there is some; a loop larger than the
  cache plus what can be swapped is never detected as a workingset (its refault distance exceeds
  it) and is re-read in full every pass (the LRU pathology of cyclic access: "in cases where the
  average access distance between thrashing pages is bigger than the size of memory there is
  nothing that can be done", mm/workingset.c).
- android: the Linux kernel, but low memory is handled by lmkd (killing cached background apps)
  and zram (compressing other apps' cold pages) *before* the page cache of the foreground app is
  dropped (prima.cpp reference 1.2, "swap-out of other apps' cold pages is preferred"); the bytes
  this frees are the device's `swappable` (primasim.core.device.DeviceSpec.os_swappable).
- macos: the compressor squeezes other processes first (the same `swappable` budget); file pages
  are reclaimed from the inactive queue with a reference bit (vm_pageout_scan reactivates
  referenced pages), with no refault detection; pages mapped by Metal go last and all-or-nothing
  (prima.cpp's Eq. 16: once memory is exhausted, the whole mapped slice is dropped).

Sizes are bytes. "Loading" chunks (reads in flight) are locked and never evicted.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class PageCacheStats:
    faults: int = 0
    fault_bytes: float = 0.0
    prefetch_bytes: float = 0.0
    evicted_bytes: float = 0.0
    wasted_prefetch_bytes: float = 0.0  # prefetched, then evicted before any use
    swapped_out_bytes: float = 0.0  # other processes' pages pushed to swap / compressor / killed
    metal_flushes: int = 0
    activations: int = 0  # pages promoted to the active list (second reference or workingset refault)
    refault_activations: int = 0


class PageCache:
    """Resident set of one device's mmap'd weight chunks under a per-OS reclaim policy.

    `capacity`: bytes the page cache can hold for these weights before anything else must give
    way (the OS's available memory minus the process's anonymous memory); `swappable`: bytes of
    other processes' memory the OS frees first (Android, macOS) or when the file workingset
    refaults (Linux); `anon_ws`: other processes' anonymous memory, which counts in Linux's
    workingset size while swap has room (mm/workingset.c)."""

    def __init__(self, *, os: str, capacity: float, swappable: float = 0.0, metal: bool = False,
                 anon_ws: float | None = None, large_folios: bool = False) -> None:
        if os not in ("linux", "android", "macos"):
            raise ValueError(os)
        self.os = os
        self.capacity = max(0.0, capacity)
        self.swappable = max(0.0, swappable)
        self.anon_ws = self.swappable if anon_ws is None else max(self.swappable, anon_ws)
        self.metal = metal
        self.size: dict[int, float] = {}
        self.is_metal: dict[int, bool] = {}
        self.inactive: OrderedDict[int, None] = OrderedDict()  # first = tail (oldest)
        self.active: OrderedDict[int, None] = OrderedDict()
        self.inactive_bytes = 0.0
        self.active_bytes = 0.0
        self.young: set[int] = set()  # PTE accessed bit: touched since the last scan
        self.referenced: set[int] = set()  # PG_referenced
        self.locked: set[int] = set()
        self.unused_prefetch: set[int] = set()
        self.shadow: dict[int, float] = {}  # cid -> nonresident age at its eviction
        self.clock = 0.0  # nonresident age: bytes evicted + bytes activated (workingset_age_nonresident)
        self.x_used = 0.0  # bytes of other processes' memory pushed out to make room
        self.large_folios = large_folios and os != "macos"  # (XNU: 16 KiB pages, a reference bit)
        # reclaim puts a page whose read is in flight back at the inactive list's head (below);
        # False: it keeps its place at the tail and goes as soon as its read completes (the model
        # before 2026-12-07 22:30; an ablation)
        self.rotate_locked = True
        self.stats = PageCacheStats()

    # ---------------------------------------------------------------- queries
    def register(self, cid: int, nbytes: float, *, metal: bool = False) -> None:
        self.size[cid] = float(nbytes)
        self.is_metal[cid] = metal

    def resident(self, cid: int) -> bool:
        return cid in self.inactive or cid in self.active

    @property
    def used(self) -> float:
        return self.inactive_bytes + self.active_bytes

    @property
    def limit(self) -> float:
        return self.capacity + self.x_used

    @property
    def inactive_ratio(self) -> int:
        gb = int(self.used / 2**30)  # inactive_is_low: gb = (inactive + active) >> (30 - PAGE_SHIFT)
        return max(1, math.isqrt(10 * gb)) if gb else 1

    def workingset(self) -> float:
        """Linux's workingset size for a file refault: the active file list, plus anonymous memory
        while swap has room (mm/workingset.c workingset_test_recent)."""
        return self.active_bytes + (self.anon_ws if self.swappable - self.x_used > 0 else 0.0)

    # ---------------------------------------------------------------- accesses
    def touch(self, cid: int) -> None:
        """Compute read a resident chunk through its mapping: sets the PTE accessed bit."""
        self.unused_prefetch.discard(cid)
        self.young.add(cid)
        if cid in self.active:  # (the active list's order only matters for deactivation)
            self.active.move_to_end(cid)

    def _is_hot(self, cid: int) -> bool:
        if self.os == "macos" or cid not in self.shadow:
            return False  # XNU keeps no shadow entries: no refault detection
        return self.clock - self.shadow[cid] <= self.workingset()

    def admit(self, cid: int, *, demand: bool) -> None:
        """Make room for `cid` and insert it, locked (its read is about to start).

        A demand fault maps the page with its accessed bit set (the faulting access); readahead
        and madvise(WILLNEED) pages enter unmapped and unaccessed."""
        n = self.size[cid]
        hot = self._is_hot(cid)
        self.shadow.pop(cid, None)
        self._make_room(n, hot=hot, keep=cid)
        if hot:
            self.active[cid] = None
            self.active_bytes += n
            self.clock += n  # an activation ages the nonresident clock
            self.stats.activations += 1
            self.stats.refault_activations += 1
        else:
            self.inactive[cid] = None
            self.inactive_bytes += n
        self.referenced.discard(cid)
        if demand:
            self.young.add(cid)
        else:
            self.young.discard(cid)
        self.locked.add(cid)
        if demand:
            self.stats.faults += 1
            self.stats.fault_bytes += n
        else:
            self.stats.prefetch_bytes += n
            self.unused_prefetch.add(cid)

    def unlock(self, cid: int) -> None:
        self.locked.discard(cid)

    def can_admit(self, cid: int) -> bool:
        """Whether `cid` can be inserted without evicting a page whose read is still in flight."""
        n = self.size[cid]
        short = self.used + n - self.limit
        if short <= 0:
            return True
        if self.os in ("android", "macos") or self._is_hot(cid):
            short -= self.swappable - self.x_used
        locked = sum(self.size[c] for c in self.locked)
        return short <= self.used - locked

    # ---------------------------------------------------------------- reclaim
    def _make_room(self, n: float, *, hot: bool, keep: int) -> None:
        short = self.used + n - self.limit
        if short <= 0:
            return
        # Other processes' memory goes first where the OS prefers that (Android's lmkd + zram,
        # macOS's compressor; Linux only when the file workingset refaults).
        if self.os in ("android", "macos") or hot:
            grow = min(short, self.swappable - self.x_used)
            if grow > 0:
                self.x_used += grow
                self.stats.swapped_out_bytes += grow
                short -= grow
        if short <= 0:
            return
        if self.os == "macos" and self.metal:
            # pages the GPU uses are the last to go: other file pages first (the CPU layers) ...
            while short > 0:
                victim = self._victim(keep, metal=False)
                if victim is None:
                    break
                short -= self.size[victim]
                self._evict(victim)
            victims = [c for c in list(self.inactive) + list(self.active)
                       if self.is_metal.get(c) and c not in self.locked and c != keep] if short > 0 else []
            if victims:
                # ... then Metal's all-or-nothing: the whole mapped working set goes at once
                self.stats.metal_flushes += 1
                for c in victims:
                    self._evict(c)
                short = self.used + n - self.limit
        while short > 0:
            victim = self._victim(keep)
            if victim is None:
                break  # everything left is locked: overcommit briefly (reads in flight)
            short -= self.size[victim]
            self._evict(victim)

    def _deactivate_if_low(self) -> None:
        ratio = self.inactive_ratio
        while self.active and self.inactive_bytes * ratio < self.active_bytes:
            c, _ = self.active.popitem(last=False)
            n = self.size[c]
            self.active_bytes -= n
            self.young.discard(c)  # shrink_active_list's folio_referenced clears the accessed bits
            self.inactive[c] = None
            self.inactive_bytes += n

    def _activate(self, c: int) -> None:
        del self.inactive[c]
        n = self.size[c]
        self.inactive_bytes -= n
        self.active[c] = None
        self.active_bytes += n
        self.clock += n
        self.stats.activations += 1

    def _victim(self, keep: int, metal: bool | None = None) -> int | None:
        """The next page the inactive scan reclaims (folio_check_references on the tail); with
        `metal=False`, only among pages no GPU maps."""
        for _ in range(3):  # a full rotation clears every accessed bit: the next pass finds one
            self._deactivate_if_low()
            for c in list(self.inactive):
                if c == keep or (metal is False and self.is_metal.get(c)):
                    continue
                if c in self.locked:
                    # a folio whose read is in flight is locked: shrink_folio_list cannot take it
                    # (folio_trylock fails -> `keep`) and puts it back at the list's head
                    # (move_folios_to_lru -> lruvec_add_folio), a full trip from the tail again
                    if self.rotate_locked:
                        self.inactive.move_to_end(c)
                    continue
                if c in self.young:
                    self.young.discard(c)
                    if c in self.referenced or self.large_folios:
                        self.referenced.discard(c)
                        self._activate(c)  # accessed again since its last scan
                    else:
                        self.referenced.add(c)
                        self.inactive.move_to_end(c)  # one more trip around the inactive list
                    continue
                return c
            for c in self.active:  # inactive list exhausted (all locked or just activated)
                if c not in self.locked and c != keep and not self.inactive and not (metal is False and self.is_metal.get(c)):
                    return c
        for c in list(self.inactive) + list(self.active):
            if c not in self.locked and c != keep and not (metal is False and self.is_metal.get(c)):
                return c
        return None

    def _evict(self, cid: int) -> None:
        n = self.size[cid]
        if cid in self.inactive:
            del self.inactive[cid]
            self.inactive_bytes -= n
        else:
            del self.active[cid]
            self.active_bytes -= n
        self.young.discard(cid)
        self.referenced.discard(cid)
        self.clock += n
        if self.os != "macos":
            self.shadow[cid] = self.clock
        self.stats.evicted_bytes += n
        if cid in self.unused_prefetch:
            self.unused_prefetch.discard(cid)
            self.stats.wasted_prefetch_bytes += n
