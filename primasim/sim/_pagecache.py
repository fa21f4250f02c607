"""The OS page cache of one device, at chunk granularity (a chunk = a slice of one layer's weights).

mmap'd weights live here; a chunk that is not resident must be read from disk before compute can
use it (a page fault), and room for it is made by the OS's reclaim policy. Policies per OS follow
prima.cpp's analysis (reference section 1.2-1.3) but are *mechanisms*, not formulas: what a token
reloads emerges from the access pattern (layer order, laps, prefetch) meeting the policy.

- linux: two LRU lists as in mm/vmscan.c. A page enters the inactive list; a second access while
  inactive promotes it to the active list; reclaim evicts the inactive list's oldest page and
  deactivates active pages when the inactive list is too small (inactive_ratio = isqrt(10 * GB)).
  Refault detection (mm/workingset.c): an evicted page that faults back within the workingset size
  (the active list plus the other processes' anonymous memory that could be swapped out) comes
  back active, and the kernel makes room for it by swapping those anonymous pages out. Result:
  a small shortfall is absorbed ("gradual reclamation": only the shortfall is re-read), a large
  one degenerates into a full re-read per token (LRU thrashing of a cyclic scan).
- android: Linux underneath, but low-memory handling swaps other apps' cold pages out *first*
  (d^swapout), whatever the access pattern; only then are mmap'd pages dropped.
- macos: the compressor squeezes other processes first (the same `swappable` budget); then, for
  pages mapped by Metal, eviction is all-or-nothing: the whole Metal working set is dropped at
  once, so an oversized GPU slice is reloaded entirely every token. CPU-only mappings behave like
  Linux's lists (macOS reads them at random-read speed; that is the disk's business).

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
    swapped_out_bytes: float = 0.0  # other processes' pages pushed to swap / compressor
    metal_flushes: int = 0


class PageCache:
    """Resident set of one device's mmap'd weight chunks under a per-OS reclaim policy."""

    def __init__(self, *, os: str, capacity: float, swappable: float = 0.0, metal: bool = False) -> None:
        if os not in ("linux", "android", "macos"):
            raise ValueError(os)
        self.os = os
        self.capacity = max(0.0, capacity)
        self.swappable = max(0.0, swappable)
        self.metal = metal
        self.size: dict[int, float] = {}
        self.is_metal: dict[int, bool] = {}
        self.inactive: OrderedDict[int, bool] = OrderedDict()  # cid -> referenced since insertion
        self.active: OrderedDict[int, None] = OrderedDict()
        self.inactive_bytes = 0.0
        self.active_bytes = 0.0
        self.locked: set[int] = set()
        self.unused_prefetch: set[int] = set()
        self.shadow: dict[int, float] = {}  # cid -> evicted-bytes clock at its eviction
        self.clock = 0.0  # total bytes evicted so far (the refault-distance clock)
        self.x_used = 0.0  # bytes of other processes' memory swapped out to make room
        self.stats = PageCacheStats()
        gb = (capacity + swappable) / 1e9
        self.inactive_ratio = max(1, math.isqrt(int(10 * gb))) if gb >= 1 else 1

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

    # ---------------------------------------------------------------- accesses
    def touch(self, cid: int) -> None:
        """Compute read a resident chunk (sets the accessed state, may promote)."""
        self.unused_prefetch.discard(cid)
        if cid in self.active:
            self.active.move_to_end(cid)
            return
        if self.inactive.get(cid):
            # second access while on the inactive list: activate (mark_page_accessed)
            del self.inactive[cid]
            n = self.size[cid]
            self.inactive_bytes -= n
            self.active[cid] = None
            self.active_bytes += n
        elif cid in self.inactive:
            self.inactive[cid] = True

    def admit(self, cid: int, *, demand: bool) -> None:
        """Make room for `cid` and insert it, locked (its read is about to start).

        Demand faults count as one access (the faulting instruction); prefetched chunks are
        inserted unreferenced, like readahead pages.
        """
        n = self.size[cid]
        hot = False
        if cid in self.shadow:
            distance = self.clock - self.shadow.pop(cid)
            hot = distance <= self.active_bytes + (self.swappable - self.x_used)
        self._make_room(n, hot=hot, keep=cid)
        if hot and self.os != "macos":
            self.active[cid] = None
            self.active_bytes += n
        else:
            self.inactive[cid] = demand
            self.inactive_bytes += n
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
        hot = cid in self.shadow and self.clock - self.shadow[cid] <= self.active_bytes + (self.swappable - self.x_used)
        if self.os in ("android", "macos") or hot:
            short -= self.swappable - self.x_used
        locked = sum(self.size[c] for c in self.locked)
        return short <= self.used - locked

    # ---------------------------------------------------------------- reclaim
    def _make_room(self, n: float, *, hot: bool, keep: int) -> None:
        short = self.used + n - self.limit
        if short <= 0:
            return
        # Other processes' memory goes first where the OS prefers that (Android always; macOS via
        # the compressor; Linux only for refaulting pages that belong to the workingset).
        if self.os in ("android", "macos") or hot:
            grow = min(short, self.swappable - self.x_used)
            if grow > 0:
                self.x_used += grow
                self.stats.swapped_out_bytes += grow
                short -= grow
        if short <= 0:
            return
        if self.os == "macos" and self.metal:
            victims = [c for c in list(self.inactive) + list(self.active)
                       if self.is_metal.get(c) and c not in self.locked and c != keep]
            if victims:
                # Metal's all-or-nothing: the whole mapped working set goes at once.
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

    def _victim(self, keep: int) -> int | None:
        # Keep the inactive list at least 1/(ratio+1) of the file LRU (inactive_is_low).
        while self.active and self.inactive_bytes * self.inactive_ratio < self.active_bytes:
            c, _ = self.active.popitem(last=False)
            n = self.size[c]
            self.active_bytes -= n
            self.inactive[c] = False
            self.inactive_bytes += n
        for c in self.inactive:
            if c not in self.locked and c != keep:
                return c
        for c in self.active:
            if c not in self.locked and c != keep:
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
        self.clock += n
        self.shadow[cid] = self.clock
        self.stats.evicted_bytes += n
        if cid in self.unused_prefetch:
            self.unused_prefetch.discard(cid)
            self.stats.wasted_prefetch_bytes += n
