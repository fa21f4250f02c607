"""The page cache at chunk granularity: per-OS reclaim policies, and the prefetch-release conflict
of plain pipelining + prefetch emerging from LRU-ish eviction and background reads."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from primasim import load_model
from primasim.core.plan import DevicePlan, Plan
from primasim.sim import PageCache, SimConfig, simulate
from primasim.sim._testbeds import prefetch_pair

MB = 1e6


def _scan(pc: PageCache, ids: list[int], passes: int) -> list[int]:
    """Access `ids` cyclically; return the number of faults in each pass."""
    out = []
    for _ in range(passes):
        faults = 0
        for c in ids:
            if pc.resident(c):
                pc.touch(c)
            else:
                pc.admit(c, demand=True)  # the faulting access is the chunk's first reference
                pc.unlock(c)
                faults += 1
        out.append(faults)
    return out


def _cache(os: str, n: int, capacity_chunks: float, swappable_chunks: float = 0.0, metal: bool = False) -> PageCache:
    pc = PageCache(os=os, capacity=capacity_chunks * MB, swappable=swappable_chunks * MB, metal=metal)
    for c in range(n):
        pc.register(c, MB, metal=metal)
    return pc


@pytest.mark.parametrize("os", ["linux", "android", "macos"])
def test_a_working_set_that_fits_faults_once(os: str) -> None:
    pc = _cache(os, 40, 50)
    assert _scan(pc, list(range(40)), 4) == [40, 0, 0, 0]


def test_linux_cyclic_scan_larger_than_memory_thrashes() -> None:
    """LRU meets a cyclic scan: every chunk is evicted before its next use (llama.cpp >= 60B)."""
    pc = _cache("linux", 60, 40)
    faults = _scan(pc, list(range(60)), 5)
    assert faults[1:] == [60, 60, 60, 60]
    assert pc.used <= 40 * MB + 1e-6


def test_linux_small_shortfall_is_absorbed_by_swapping_idle_memory() -> None:
    """Refaults within the workingset come back active and push idle anonymous memory to swap:
    after a transition, nothing is re-read (the gradual regime of a small overflow)."""
    pc = _cache("linux", 50, 40, swappable_chunks=15)
    faults = _scan(pc, list(range(50)), 5)
    assert faults[0] == 50 and faults[-1] == 0 and faults[-2] == 0
    assert pc.x_used == pytest.approx(10 * MB)  # exactly the shortfall went to swap


def test_linux_large_shortfall_is_not_absorbed() -> None:
    """A refault distance beyond the workingset is not activated: no swapping, full thrash."""
    pc = _cache("linux", 100, 40, swappable_chunks=15)
    faults = _scan(pc, list(range(100)), 4)
    assert faults[1:] == [100, 100, 100]
    assert pc.x_used == 0


def test_android_swaps_other_apps_first() -> None:
    """Android (Termux): other apps' cold pages go to swap before any mmap'd page is dropped."""
    pc = _cache("android", 50, 40, swappable_chunks=15)
    faults = _scan(pc, list(range(50)), 3)
    assert faults == [50, 0, 0]  # absorbed during the very first pass
    assert pc.stats.evicted_bytes == 0 and pc.x_used == pytest.approx(10 * MB)


def test_metal_evicts_all_or_nothing() -> None:
    """macOS with Metal: once the GPU working set overflows, the whole mapped slice is dropped, so
    an oversized slice is re-read entirely every token (not just the shortfall)."""
    pc = _cache("macos", 50, 40, metal=True)
    faults = _scan(pc, list(range(50)), 4)
    assert faults[1:] == [50, 50, 50]
    assert pc.stats.metal_flushes >= 3
    lin = _cache("linux", 50, 40, swappable_chunks=15)
    assert sum(_scan(lin, list(range(50)), 4)[1:]) < sum(faults[1:])


def test_prefetched_chunks_evicted_unused_are_counted() -> None:
    pc = _cache("linux", 10, 4)
    for c in range(10):  # madvise(WILLNEED) of 10 chunks into room for 4
        pc.admit(c, demand=False)
        pc.unlock(c)
    assert pc.stats.wasted_prefetch_bytes == pytest.approx(6 * MB)
    assert pc.stats.prefetch_bytes == pytest.approx(10 * MB)


# ------------------------------------------------------------------ the prefetch-release conflict
def test_prefetch_release_conflict_emerges_in_plain_pipeline() -> None:
    """Plain pipeline (k = 1): B owns 6 layers but has memory for ~3. Prefetching its window runs
    past memory, evicting what it just read; at compute time the *last* layers are resident and
    computing the first ones faults and evicts them again: every layer is read twice, prefetch
    buys nothing. The piped ring (k = 2, windows of 3) prefetches only what fits: each layer is
    read once and prefetching lowers TPOT. Nothing of this is a rule in the simulator."""
    m = load_model("llama3-8b", "q4k")
    cl = prefetch_pair(m, window_layers=6, fits_layers=3.4)
    cfg = SimConfig(tokens=6, jitter=False, chunks_per_layer=4)
    pp = Plan("prima", m.name, 32, 1, (DevicePlan("A", 26), DevicePlan("B", 6)), quant="q4k")
    prp = Plan("prima", m.name, 32, 2, (DevicePlan("A", 13), DevicePlan("B", 3)), quant="q4k")
    window = 6 * m.layer_bytes  # what B must read per token if nothing stays resident
    res = {}
    for name, plan in (("pp", pp), ("prp", prp)):
        for pf in (False, True):
            res[(name, pf)] = simulate("prima", m, cl, plan=plan.replace(prefetch=pf), config=cfg)
    disk = {k: r.extra["disk_read_bytes_per_token"]["B"] for k, r in res.items()}
    tpot = {k: r.tpot_ms for k, r in res.items()}
    # PP: without prefetch each layer faults once; with prefetch each is read twice
    assert disk[("pp", False)] == pytest.approx(window, rel=0.05)
    assert disk[("pp", True)] == pytest.approx(2 * window, rel=0.1)
    assert res[("pp", True)].trace.device_stats["B"]["cache_wasted_prefetch_bytes"] > 0.5 * window
    assert tpot[("pp", True)] >= 0.97 * tpot[("pp", False)]  # no benefit (the conflict)
    # PRP: windows fit, every layer read once, prefetch overlaps the reads with A's work
    assert disk[("prp", True)] == pytest.approx(window, rel=0.1)
    assert res[("prp", True)].trace.device_stats["B"]["cache_wasted_prefetch_bytes"] == 0
    assert tpot[("prp", True)] < 0.9 * tpot[("prp", False)]
    assert tpot[("prp", True)] < tpot[("pp", True)]


# ------------------------------------------------------------------ madvise(WILLNEED) semantics
def _device(capacity: float, disk: float = 1e9) -> tuple:
    import simpy

    from primasim.core.device import DeviceSpec
    from primasim.core.trace import Trace
    from primasim.sim import Recorder
    from primasim.sim._devices import SimDevice

    env = simpy.Environment()
    spec = DeviceSpec(name="B", os="linux", cores=4, ram_total=16e9, ram_avail=capacity, ram_bw=20e9,
                      cpu_flops={"f32": 1e11}, disk_seq=disk)
    dev = SimDevice(env, spec, load_model("llama-tiny", "f32"), recorder=Recorder(Trace(source="sim", system="test")))
    dev.setup_memory(0.0, mmap=True)
    ids = [dev.register_chunks(i, MB, 1, metal=False, base=i)[0] for i in range(10)]
    return env, dev, ids


def test_madvise_allocates_the_whole_window_at_once_and_evicts_its_own_pages() -> None:
    """madvise(WILLNEED) submits the whole range: pages are allocated up front (as many as memory
    allows, their reads in flight), the reads complete in order at the disk's rate, and allocating
    the rest evicts the window's own pages read a moment ago -- never one whose read is in flight.
    A window of 10 MB into 4 MB leaves the last 4 chunks resident and wastes the first 6."""
    env, dev, ids = _device(4 * MB, disk=1e9)
    pc = dev.cache
    env.process(dev.prefetch(ids))
    seen: list[tuple[float, int, float]] = []

    def monitor():
        while True:
            seen.append((env.now, len(pc.locked), pc.used))
            yield env.timeout(0.25e-3)

    env.process(monitor())
    env.run(until=0.05)
    assert seen[0][1] == 4  # at t = 0 four reads are already in flight (allocated ahead of completion)
    assert max(u for _, _, u in seen) <= 4 * MB + 1e-6  # never more than memory: in-flight pages are kept
    assert [c for c in ids if pc.resident(c)] == ids[6:]
    assert pc.stats.prefetch_bytes == pytest.approx(10 * MB)
    assert pc.stats.wasted_prefetch_bytes == pytest.approx(6 * MB)
    assert dev.disk_bytes == pytest.approx(10 * MB)


def test_madvise_of_a_window_that_fits_reads_each_page_once() -> None:
    env, dev, ids = _device(12 * MB, disk=1e9)
    env.process(dev.prefetch(ids))
    env.run(until=1e-9)
    pending = list(dev.loading.values())
    assert len(pending) == 10  # the whole window is in flight at once
    done = env.all_of(pending)
    env.run(until=done)
    assert env.now == pytest.approx(10e-3)  # 10 MB at 1 GB/s, back to back
    assert all(dev.cache.resident(c) for c in ids)
    assert dev.cache.stats.wasted_prefetch_bytes == 0
    assert dev.disk_bytes == pytest.approx(10 * MB)


# ------------------------------------------------------------------ mmap readahead (default advice)
def _ra_device(capacity: float, read_ahead_chunks: int, own: list[int], n_file: int) -> tuple:
    """A device whose file has `n_file` 1 MB chunks in file order, of which `own` are its layers'
    (one chunk a layer); readahead `read_ahead_chunks` MB."""
    import simpy

    from primasim.core.device import DeviceSpec
    from primasim.core.trace import Trace
    from primasim.sim import Recorder
    from primasim.sim._devices import SimDevice

    env = simpy.Environment()
    spec = DeviceSpec(name="B", os="linux", cores=4, ram_total=16e9, ram_avail=capacity, ram_bw=20e9,
                      cpu_flops={"f32": 1e11}, disk_seq=1e9, read_ahead=read_ahead_chunks * MB)
    dev = SimDevice(env, spec, load_model("llama-tiny", "f32"), recorder=Recorder(Trace(source="sim", system="test")))
    dev.setup_memory(0.0, mmap=True)
    for j in range(n_file):
        if j in own:
            dev.register_chunks(j, MB, 1, metal=False, base=j)
        else:
            dev.cache.register(j, MB)
    dev.set_file_layout(list(range(n_file)), MB)
    return env, dev


def test_a_fault_reads_around_the_page_and_a_scan_reads_ahead_past_the_window() -> None:
    """Linux's read-around on a fault (half the readahead window behind the faulting page) and the
    sequential readahead that follows a scan: a 4-layer window in the middle of a 20 MB file read
    with an 8 MB window reads the 4 MB behind it and runs 8-16 MB past its end -- its neighbours'
    bytes, never computed with here. Without a readahead window it reads exactly its layers."""
    own = [8, 9, 10, 11]
    env, dev = _ra_device(64 * MB, 8, own, 20)
    env.process(dev.run_layers(dev.cpu, own, 1e-3, name="w"))
    env.run()
    read = {c for c in range(20) if dev.cache.resident(c)}
    assert set(own) <= read
    assert {4, 5, 6, 7} <= read  # behind the first fault
    assert dev.disk_bytes >= (4 + 4 + 8) * MB  # behind + own + at least one window ahead
    assert dev.disk_bytes <= 20 * MB
    env0, dev0 = _ra_device(64 * MB, 0, own, 20)
    dev0.set_file_layout(list(range(20)), MB)
    env0.process(dev0.run_layers(dev0.cpu, own, 1e-3, name="w"))
    env0.run()
    assert dev0.disk_bytes == pytest.approx(4 * MB)


def test_readahead_into_a_small_memory_evicts_pages_before_use_and_rereads_them() -> None:
    """Pages read ahead of a scan enter unaccessed and go first when memory runs out: with room
    for less than the readahead keeps in flight, a window is read more than once a pass -- the
    thrashing the fidelity study measured on emulated devices with an 8 MiB window
    (experiments/results/lru_readaround.md). With room for the window and its overshoot, a second
    pass reads nothing."""
    own = list(range(4, 12))
    tight_env, tight = _ra_device(6 * MB, 8, own, 24)
    roomy_env, roomy = _ra_device(40 * MB, 8, own, 24)
    for env, dev in ((tight_env, tight), (roomy_env, roomy)):
        def two_passes(env=env, dev=dev):
            yield from dev.run_layers(dev.cpu, own, 1e-3, name="w")
            yield env.timeout(1.0)  # the readahead past the window completes
            dev.disk_bytes = 0.0
            yield from dev.run_layers(dev.cpu, own, 1e-3, name="w")
        env.process(two_passes())
        env.run()
    assert roomy.disk_bytes == 0
    assert tight.disk_bytes > len(own) * MB


def test_large_folios_go_active_at_their_first_scan_and_a_window_that_fits_stays() -> None:
    """The option PageCache.large_folios (off in the runtime model since lru devices were traced
    keeping almost nothing on the active list, sim/_runtime.py): a chunk found with accessed PTEs at
    its first reclaim scan is activated at once, not rotated once with PG_referenced; so a cyclic
    window a little smaller than its room stays resident while the read-around's unused bytes go
    (the kernel: a 36.5 MB window reads 0.23x a pass in 38 MB of room, experiments/lru_readaround.py),
    where one-reference rotation lets the read-around evict part of the window."""
    own = list(range(8))
    last = {}
    for large in (True, False):
        env, dev = _ra_device(9 * MB, 4, own, 24)  # an 8 MB window, 9 MB of room, 4 MB readahead
        dev.cache.large_folios = large
        per: list[float] = []

        def scan(env=env, dev=dev, per=per):
            for _ in range(4):
                b0 = dev.disk_bytes
                yield from dev.run_layers(dev.cpu, own, 1e-3, name="w")
                yield env.timeout(1.0)
                per.append(dev.disk_bytes - b0)
        env.process(scan())
        env.run()
        last[large] = per[-1]
    assert last[True] < len(own) * MB / 2  # the window stays: only read-around bytes are read
    assert last[False] > last[True]  # (with locked pages rotated too: 4 MB a pass against 8 kept in place)


def test_lru_fault_bytes_cost_the_faulting_compute_cpu() -> None:
    """Every byte a fault or its readahead brings in costs the faulting thread the kernel's work
    (SimDevice.fault_cpu_per_byte; the runtime model sets STREAM_CPU_PER_BYTE): the scan computes
    longer by at most the bytes read times that cost, and reads the same bytes."""
    own = list(range(8, 12))
    busy, reads = [], []
    for per_byte in (0.0, 1e-9):  # 1 ms per MB
        env, dev = _ra_device(64 * MB, 4, own, 20)
        dev.fault_cpu_per_byte = per_byte
        env.process(dev.run_layers(dev.cpu, own, 1e-3, name="w"))
        env.run()
        busy.append(dev.cpu.busy_time)
        reads.append(dev.disk_bytes)
    assert reads[0] == reads[1]
    assert len(own) * MB * 1e-9 <= busy[1] - busy[0] <= reads[1] * 1e-9 + 1e-9


@pytest.mark.parametrize("rotate", [True, False])
def test_reclaim_puts_a_page_whose_read_is_in_flight_back_at_the_head(rotate: bool) -> None:
    """A locked page (its read in flight) found at the inactive tail is put back at the list's head
    (mm/vmscan.c shrink_folio_list: folio_trylock fails -> keep -> move_folios_to_lru): once its
    read completes it waits a whole trip before reclaim looks at it again, and the pages read after
    it go first. Kept in place instead (the ablation), it is the first to go once unlocked."""
    pc = _cache("linux", 6, 3)
    pc.rotate_locked = rotate
    for c in (0, 1, 2):  # read ahead, unaccessed; 0's read is still in flight
        pc.admit(c, demand=False)
    pc.unlock(1)
    pc.unlock(2)
    pc.admit(3, demand=False)  # room: 0 is locked, 1 goes
    pc.unlock(3)
    pc.unlock(0)  # 0's read completes, still unused
    pc.admit(4, demand=False)
    assert not pc.resident(1)
    assert pc.resident(0) is rotate
    assert pc.resident(2) is not rotate


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(room=st.integers(3, 40), ra=st.sampled_from([0, 2, 4, 8]), first=st.integers(0, 12),
       width=st.integers(1, 8), windows=st.integers(1, 3), ms=st.floats(1e-4, 0.05))
def test_lru_readahead_bytes_read_are_the_faults_plus_the_readahead(room: int, ra: int, first: int, width: int,
                                                                    windows: int, ms: float) -> None:
    """Whatever the room, the readahead window, the windows and the compute time: the bytes the
    disk read are the demand faults' plus the read-around's and readahead's (nothing is read
    twice at once, nothing read is lost from the count) -- issue 15's `bytes read = faults +
    prefetch` for lru devices with the kernel's readahead."""
    wins = [list(range(first + w * (width + 2), first + w * (width + 2) + width)) for w in range(windows)]
    own = [c for w in wins for c in w]
    env, dev = _ra_device(room * MB, ra, own, max(own) + 12)

    def laps():  # type: ignore[no-untyped-def]
        for _ in range(3):
            for w in wins:
                yield from dev.run_layers(dev.cpu, w, ms, name="w")
                yield env.timeout(ms)
        yield env.timeout(10.0)  # the readahead still in flight completes

    env.process(laps())
    env.run()
    s = dev.cache.stats
    assert not dev.loading
    assert dev.disk_bytes == pytest.approx(s.fault_bytes + s.prefetch_bytes, rel=1e-9)
