"""Properties of the simulated schedules, checked with hypothesis on random plans and resources.

- For a fixed plan, more of any resource (RAM and VRAM bandwidth, FLOPS, available memory, disk
  speed, network bandwidth) never predicts a slower token.
- Bytes read from disk are exactly the page-fault bytes plus the prefetch bytes (plus the one
  embedding row per token the head reads directly).
- TPOT is continuous in memory shortfall for prima with prefetch: taking memory away never makes a
  token slower by more than the time to read the bytes it makes the device re-read; while the OS
  can absorb the shortfall (other processes' idle memory swapped out), nothing is re-read at all.
(The simulator equals the cost model where the model's assumptions hold: tests/test_sim_costmodel.py.)
"""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from primasim import load_model
from primasim.core.cluster import ClusterSpec, NetworkSpec
from primasim.core.device import DeviceSpec, GPUSpec
from primasim.core.plan import DevicePlan, Plan
from primasim.core.units import GB, GFLOPS, MBPS, MS, GiB
from primasim.sim import SimConfig, simulate

MODEL = load_model("llama3-8b", "q4k")  # 32 layers of 131 MB
CFG = SimConfig(tokens=4, jitter=False)
# 12 examples per property in the suite; PRIMASIM_PROPERTY_EXAMPLES=200 for a deeper search
SETTINGS = settings(max_examples=int(os.environ.get("PRIMASIM_PROPERTY_EXAMPLES", "12")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _dev(name: str, *, ram_gb: float, bw: float, flops: float, disk: float, os: str = "linux",
         gpu: bool = False, swap_gb: float = 0.0) -> DeviceSpec:
    g = GPUSpec(kind="cuda", vram_total=4 * GiB, vram_avail=4 * GiB, flops={"f32": 8000 * GFLOPS},
                mem_bw=300 * GB, compute_buffer=256 * 2**20) if gpu else None
    return DeviceSpec(name=name, os=os, cores=8, ram_total=32 * GiB, ram_avail=ram_gb * GB, ram_bw=bw * GB,
                      cpu_flops={"f32": flops * GFLOPS}, disk_seq=disk * GB, disk_rnd=disk * GB / 3, gpu=g,
                      swap_total=swap_gb * GiB, swap_avail=swap_gb * GiB, anon_other=8 * GiB, idle_anon=0.5)


@st.composite
def cases(draw: st.DrawFn) -> tuple[ClusterSpec, Plan]:
    """2-3 devices, a plan with k laps, some devices short of memory (they stream)."""
    n = draw(st.integers(2, 3))
    k = draw(st.sampled_from([1, 2, 4]))
    per_lap = 32 // k
    cuts = sorted(draw(st.lists(st.integers(1, per_lap - 1), min_size=n - 1, max_size=n - 1, unique=True)))
    windows = [b - a for a, b in zip([0, *cuts], [*cuts, per_lap])]
    devs, dps = [], []
    for i, w in enumerate(windows):
        gpu = i == 1 and draw(st.booleans())
        need = k * w * MODEL.layer_bytes / GB
        ram = draw(st.floats(0.4, 1.3)) * need + 1.2  # + KV, buffers and the head's output layer
        devs.append(_dev(f"d{i}", ram_gb=ram, bw=draw(st.floats(15, 60)), flops=draw(st.floats(100, 800)),
                         disk=draw(st.floats(0.5, 3.0)), os=draw(st.sampled_from(["linux", "android", "macos"])),
                         gpu=gpu, swap_gb=draw(st.sampled_from([0.0, 1.0]))))
        dps.append(DevicePlan(f"d{i}", w, draw(st.integers(0, w)) if gpu else 0))
    net = NetworkSpec(draw(st.sampled_from(["wifi", "switched"])), draw(st.floats(100, 900)) * MBPS, 2 * MS)
    plan = Plan("prima", MODEL.name, 32, k, tuple(dps), quant="q4k", prefetch=draw(st.booleans()))
    return ClusterSpec("prop", tuple(devs), net, "d0"), plan


def _tpot(cl: ClusterSpec, plan: Plan) -> float:
    r = simulate("prima", MODEL, cl, plan=plan, config=CFG)
    assume(r.feasible)  # (a drawn plan may not fit a GPU or a device's anonymous memory)
    return r.tpot_ms


def _more(dev: DeviceSpec, what: str, f: float) -> DeviceSpec:
    if what == "ram_bw":
        return dev.replace(ram_bw=dev.ram_bw * f)
    if what == "flops":
        return dev.replace(cpu_flops={q: x * f for q, x in dev.cpu_flops.items()},
                           gpu=dataclasses.replace(dev.gpu, flops={q: x * f for q, x in dev.gpu.flops.items()})
                           if dev.gpu else None)
    if what == "memory":
        return dev.replace(ram_avail=dev.ram_avail * f, ram_total=max(dev.ram_total, dev.ram_avail * f))
    if what == "disk":
        return dev.replace(disk_seq=dev.disk_seq * f, disk_rnd=dev.disk_rnd * f)
    if what == "vram_bw":
        return dev.replace(gpu=dataclasses.replace(dev.gpu, mem_bw=dev.gpu.mem_bw * f)) if dev.gpu else dev
    raise ValueError(what)


def _thrashes(cl: ClusterSpec, plan: Plan, name: str) -> bool:
    """Whether device `name`'s layers exceed its memory (less the 1.2 GB `cases` adds for KV,
    buffers and the head's output): it re-reads part of its window every token."""
    need = plan.k * {d.name: d.layers for d in plan.devices}[name] * MODEL.layer_bytes
    return need > cl.device(name).ram_avail - 1.2 * GB


# (The suite's draws are derandomised by conftest's profile; PRIMASIM_HYPOTHESIS=explore draws
# afresh, which the left-out region below keeps from finding the documented gap.)
@SETTINGS
@given(case=cases(), what=st.sampled_from(["ram_bw", "flops", "memory", "disk", "vram_bw", "network"]),
       factor=st.floats(1.05, 4.0), who=st.integers(0, 2))
def test_more_of_any_resource_never_predicts_slower(case: tuple[ClusterSpec, Plan], what: str, factor: float,
                                                    who: int) -> None:
    cl, plan = case
    name = cl.names[who % len(cl.names)]
    # Left out, a known gap (the strict xfail below): with prefetch on, a device that thrashes
    # re-reads more or less by when its WILLNEED finds room, which depends on whether demand reads
    # are in flight at that instant -- so more of a resource on *another* device (or the network)
    # can shift its timing into more re-reading. Everything else is held to the property.
    assume(not (plan.prefetch and any(_thrashes(cl, plan, n) for n in cl.names if what == "network" or n != name)))
    base = _tpot(cl, plan)
    if what == "network":
        better = ClusterSpec(cl.name, cl.devices, dataclasses.replace(cl.network, bandwidth=cl.network.bandwidth * factor),
                             cl.head)
    else:
        better = cl.replace_device(_more(cl.device(name), what, factor))
    assert _tpot(better, plan) <= base * 1.001 + 1e-6


@pytest.mark.xfail(strict=True, reason="a known gap (issue 15): a thrashing device's prefetch finds room or not "
                   "by when demand reads are in flight, so a faster neighbour can make it re-read more")
def test_known_counterexample_a_faster_head_makes_a_thrashing_neighbour_slower() -> None:
    """Found by the property above (stored in a hypothesis database, 2026-12-07): d1 holds a 4.06 GB
    window in 2.95 GB; doubling d0's RAM bandwidth moves token 2's prefetch on d1 from 33 to 392 MB
    and d1 reads 1832 -> 2093 MB over 4 tokens (TPOT 868 -> 946 ms). Strict: it fails the day the
    model stops doing it, and then the @example belongs in the property."""
    d0 = _dev("d0", ram_gb=1330826240.0 / GB, bw=15, flops=100, disk=1.0)
    d1 = _dev("d1", ram_gb=3227806720.0 / GB, bw=15, flops=100, disk=1.0, swap_gb=1.0)
    cl = ClusterSpec("prop", (d0, d1), NetworkSpec("wifi", 100 * MBPS, 2 * MS), "d0")
    plan = Plan("prima", MODEL.name, 32, 1, (DevicePlan("d0", 1), DevicePlan("d1", 31)), quant="q4k", prefetch=True)
    base = simulate("prima", MODEL, cl, plan=plan, config=CFG)
    faster = simulate("prima", MODEL, cl.replace_device(_more(d0, "ram_bw", 2.0)), plan=plan, config=CFG)
    assert base.feasible and faster.feasible
    assert faster.tpot_ms <= base.tpot_ms * 1.001 + 1e-6


@SETTINGS
@given(case=cases())
def test_disk_bytes_are_faults_plus_prefetch(case: tuple[ClusterSpec, Plan]) -> None:
    cl, plan = case
    r = simulate("prima", MODEL, cl, plan=plan, config=CFG)
    assume(r.feasible)
    tr = r.trace
    assert tr is not None
    for name, st_ in tr.device_stats.items():
        embed = (MODEL.input_bytes / MODEL.vocab) * (CFG.prompt_tokens + CFG.tokens - 1) if name == plan.head else 0.0
        paged = st_.get("cache_fault_bytes", 0.0) + st_.get("cache_prefetch_bytes", 0.0)
        read = st_.get("disk_read_bytes", 0.0) + st_.get("cache_inflight_bytes", 0.0)  # (reads the run ended in)
        assert read == pytest.approx(paged + embed, rel=1e-9, abs=1.0)


def _shortfall_case(ram_gb: float, *, swap_gb: float, prefetch: bool = True) -> tuple[ClusterSpec, Plan]:
    """A head with memory to spare and a CPU worker B holding 12 layers (k = 2, windows of 6) in
    `ram_gb` of memory: a fast disk, so prefetching B's next window overlaps the head's compute."""
    a = _dev("A", ram_gb=20, bw=40, flops=600, disk=3.0)
    b = _dev("B", ram_gb=ram_gb, bw=40, flops=600, disk=3.0, swap_gb=swap_gb)
    plan = Plan("prima", MODEL.name, 32, 2, (DevicePlan("A", 10), DevicePlan("B", 6)), quant="q4k", prefetch=prefetch)
    return ClusterSpec("short", (a, b), NetworkSpec("switched", 900 * MBPS, 1 * MS), "A"), plan


def test_a_shortfall_the_os_absorbs_reads_nothing() -> None:
    """B's 12 layers (1.6 GB) fit in its page cache with 0.5 GB to spare ... down to a 0.6 GB
    shortfall, which B's swap (1 GiB of idle memory from 8 GiB of other processes') absorbs:
    TPOT does not move and nothing is re-read."""
    out = []
    for ram in (2.4, 2.0, 1.6, 1.4):
        cl, plan = _shortfall_case(ram, swap_gb=1.0)
        r = simulate("prima", MODEL, cl, plan=plan, config=CFG.replace(tokens=6))
        out.append((r.tpot_ms, r.extra["disk_read_bytes_per_token"]["B"]))
    assert all(b < 1e6 for _, b in out)
    assert max(t for t, _ in out) <= min(t for t, _ in out) * 1.001


@pytest.mark.parametrize("swap_gb", [0.0, 1.0])
def test_tpot_is_continuous_in_memory_shortfall_with_prefetch(swap_gb: float) -> None:
    """Taking memory from B step by step: whatever B then re-reads, a token is never slower by more
    than the time B needs to read those extra bytes (prefetching can only hide reads, never add
    to them), and TPOT never falls as memory is taken away."""
    prev = None
    for ram in [2.6 - 0.1 * i for i in range(16)]:
        cl, plan = _shortfall_case(ram, swap_gb=swap_gb)
        r = simulate("prima", MODEL, cl, plan=plan, config=CFG.replace(tokens=6))
        cur = (r.tpot_ms, r.extra["disk_read_bytes_per_token"]["B"])
        if prev is not None:
            extra_s = max(0.0, cur[1] - prev[1]) / cl.device("B").disk_seq
            assert cur[0] <= prev[0] + 1e3 * extra_s + 0.02 * prev[0], (ram, prev, cur)
            assert cur[0] >= prev[0] * 0.98, (ram, prev, cur)
        prev = cur


@SETTINGS
@given(case=cases(), who=st.integers(0, 2), cut=st.floats(0.02, 0.25))
def test_taking_memory_costs_at_most_the_time_to_read_what_it_makes_reread(case: tuple[ClusterSpec, Plan], who: int,
                                                                           cut: float) -> None:
    """Random plans with prefetch: take a slice of one device's memory; the token gets slower by at most
    the time to read the extra bytes re-read, at the slowest device's page-in rate, plus 6 % of the new
    TPOT for the overlap a device loses when it waits for its own reads (a layer's faults are issued
    when compute reaches it: no readahead across layers)."""
    cl, plan = case
    plan = plan.replace(prefetch=True)
    name = cl.names[who % len(cl.names)]
    # 8 tokens: over 4 the first streamed token's start-up skews time against bytes per token (+5.8 % on
    # a 20 s Android token, 1.4 % at 8, -0.5 % at 16) and the bound is about the steady state
    cfg = dataclasses.replace(CFG, tokens=8)
    before = simulate("prima", MODEL, cl, plan=plan, config=cfg)
    dev = cl.device(name)
    after = simulate("prima", MODEL, cl.replace_device(dev.replace(ram_avail=dev.ram_avail * (1 - cut))), plan=plan,
                     config=cfg)
    assume(before.feasible and after.feasible)
    extra = max(0.0, sum(after.extra["disk_read_bytes_per_token"].values())
                - sum(before.extra["disk_read_bytes_per_token"].values()))
    # the slowest page-in rate the simulator uses: Linux reads faults ahead sequentially, macOS and
    # Android page in small random I/Os (per-I/O latency, one per core in flight)
    slowest = min(d.disk_seq if d.os == "linux" else d.random_read_rate(d.page_io, d.cores) for d in cl.devices)
    # 6 %: a random search found a 28.6 s token at 5.007 % (the host CPUs the emulated devices share since
    # SimConfig.host_cpus add a little lost overlap)
    assert after.tpot_ms <= before.tpot_ms + 1e3 * extra / slowest + 0.06 * after.tpot_ms + 1e-6
