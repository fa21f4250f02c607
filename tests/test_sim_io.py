"""The simulator's I/O models: random reads by per-I/O latency and queue depth, Wi-Fi airtime per
transmission opportunity, a switch's NICs, and the OS memory figures the page cache is sized from."""

from __future__ import annotations

import pytest

from primasim.core.cluster import NetworkSpec, load_cluster
from primasim.core.device import DeviceSpec, GPUSpec
from primasim.core.units import GB, MBPS, MS, GiB


def _dev(**kw: object) -> DeviceSpec:
    base = dict(name="d", os="macos", cores=8, ram_total=8 * GiB, ram_avail=2 * GiB, ram_bw=60 * GB,
                cpu_flops={"f32": 1e11}, disk_seq=2.5 * GB, disk_rnd=0.7 * GB, uma=True)
    base.update(kw)
    return DeviceSpec(**base)  # type: ignore[arg-type]


def test_random_reads_follow_latency_and_queue_depth() -> None:
    """prima.cpp's fio figure (the page size, one job per core at queue depth 1) is reproduced at its
    own queue depth; one read in flight is far slower, big reads approach the sequential rate."""
    d = _dev()
    assert d.random_read_rate(d.page_io, d.cores) == pytest.approx(d.disk_rnd, rel=1e-9)
    assert d.random_read_rate(d.page_io, 1) == pytest.approx(d.disk_rnd / d.cores, rel=1e-9)
    assert d.random_read_rate(d.page_io, 64) <= d.disk_seq
    assert d.random_read_rate(4 * 2**20, 8) > 0.9 * d.disk_seq
    assert _dev(os="linux", uma=False).page_io == 4096 and d.page_io == 16384  # Apple Silicon pages


def test_wifi_pays_per_transmission_opportunity() -> None:
    """`bandwidth` is the bulk rate (full aggregates): a bulk transfer takes bytes / bandwidth; a
    small message pays one contention + preamble + block-ack overhead for little payload."""
    net = NetworkSpec("wifi", 465 * MBPS, 3 * MS)
    bulk = 64 * net.ampdu
    assert net.airtime("a", "b", bulk) == pytest.approx(bulk / net.bandwidth, rel=1e-9)
    small = 4096
    assert net.airtime("a", "b", small) > small / net.bandwidth + 150e-6
    sw = NetworkSpec("switched", 465 * MBPS, 3 * MS)
    assert sw.airtime("a", "b", small) == pytest.approx(small / sw.bandwidth)


def test_os_memory_figures() -> None:
    """The page cache can hold what the OS really has (prima.cpp reports 80 % of MemAvailable); other
    processes' idle memory is what swap (Linux), zram + lmkd (Android) or the compressor and Metal's
    working-set guarantee (macOS) can free."""
    lin = _dev(os="linux", uma=False, ram_total=16 * GiB, ram_avail=4 * GiB, avail_fraction=0.8, swap_avail=2 * GiB,
               idle_anon=0.5)
    assert lin.os_avail == pytest.approx(5 * GiB)
    assert lin.anon_other_bytes == pytest.approx(0.75 * 11 * GiB)
    assert lin.os_swappable == pytest.approx(2 * GiB)  # bounded by the free swap
    assert lin.replace(swap_avail=0.0).os_swappable == 0.0
    droid = lin.replace(os="android", compress_ratio=2.5, lmk_cached=0.5 * GiB)
    assert droid.os_swappable == pytest.approx(2 * GiB * 0.6 + 0.5 * GiB)  # zram keeps 1/2.5 in RAM
    metal = GPUSpec(kind="metal", vram_total=5.3 * GiB, vram_avail=4.2 * GiB, flops={"f32": 1e12}, mem_bw=60 * GB)
    mac = _dev(ram_avail=2.4 * GiB, gpu=metal, idle_anon=0.1)
    assert mac.os_swappable == pytest.approx(5.3 * GiB - 2.4 * GiB)  # Metal's working set is kept
    with pytest.raises(Exception, match="avail_reported_fraction"):
        _dev(avail_fraction=1.5)
    d3 = load_cluster("prima-d1-d6").device("D3")
    assert d3.os_avail > d3.ram_avail and d3.os_swappable > 0
