"""cgroup v1 and v2 (primasim.core.cgroups): which hierarchy is picked, the files a device's group
is limited and read through, and -- as far as this host's kernel allows -- the real unified tree.

This host binds memory, cpu and blkio to v1 and mounts an empty cgroup2 (only hugetlb is free), so
v2's *limits* are checked against a fake hierarchy in a temporary folder (the same code writes
the same files; the kernel is not there to enforce them), while v2's group life cycle (mkdir,
moving a process in, cgroup.kill, rmdir) runs on the real unified tree as root."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from primasim.core import cgroups
from primasim.core.cgroups import Group, Hierarchy, Mounts, detect, own_group
from primasim.core.cluster import cluster_from_toml
from primasim.core.errors import EmulationError
from primasim.core.units import MiB

HYBRID = """\
30 24 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw
33 30 0:29 / /sys/fs/cgroup/memory rw,nosuid shared:14 - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:15 - cgroup cgroup rw,cpu,cpuacct
35 30 0:31 / /sys/fs/cgroup/blkio rw,nosuid shared:16 - cgroup cgroup rw,blkio
"""


def _mountinfo(tmp: Path, text: str) -> Path:
    f = tmp / "mountinfo"
    f.write_text(text)
    return f


def _fake_v2(root: Path, controllers: str = "cpuset cpu io memory hugetlb pids") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("\n")
    return root


def test_a_hybrid_host_uses_v1_and_says_where() -> None:
    m = Mounts(v1={"memory": ("/", Path("/m")), "cpu": ("/", Path("/c")), "cpuacct": ("/", Path("/c")),
                   "blkio": ("/", Path("/b"))}, v2=("/", Path("/nonexistent-unified")))
    h = detect(m)
    assert h.version == 1 and h.mounts == {"memory": Path("/m"), "cpu": Path("/c"), "io": Path("/b")}
    assert "cgroup v1" in h.describe() and "blkio at /b" in h.describe()


def test_mountinfo_is_parsed_into_v1_controllers_and_the_unified_mount(tmp_path: Path) -> None:
    m = Mounts.read(_mountinfo(tmp_path, HYBRID))
    assert m.v2 == ("/", Path("/sys/fs/cgroup/unified"))
    assert m.v1["cpu"][1] == Path("/sys/fs/cgroup/cpu,cpuacct") and m.v1["memory"][1] == Path("/sys/fs/cgroup/memory")
    assert "rw" not in m.v1


def test_v2_is_picked_when_its_root_offers_memory_cpu_and_io(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path / "unified")
    h = detect(Mounts(v2=("/", root)))
    assert h.version == 2 and set(h.mounts.values()) == {root}
    # with both usable, v2 unless asked otherwise
    both = Mounts(v1={"memory": ("/", tmp_path), "cpu": ("/", tmp_path), "blkio": ("/", tmp_path)}, v2=("/", root))
    assert detect(both).version == 2 and detect(both, prefer="v1").version == 1


def test_neither_hierarchy_usable_is_one_clear_error(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path / "unified", "hugetlb pids")  # this host's unified tree: no memory, cpu, io
    with pytest.raises(EmulationError) as e:
        detect(Mounts(v1={"memory": ("/", tmp_path)}, v2=("/", root)))
    msg = str(e.value)
    assert "memory, cpu and io" in msg and "hugetlb pids" in msg and "v1 mounts: memory" in msg
    assert "--no-emulate" in msg and "\n" not in e.value.what
    with pytest.raises(EmulationError, match="no cgroup file system mounted"):
        detect(Mounts())


def test_a_v2_group_is_limited_and_read_through_the_v2_files(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path / "unified")
    h = Hierarchy(2, {c: root for c in cgroups.NEEDED})
    g = h.create("primasim-eabcd-0-phone")
    d = root / "primasim-eabcd-0-phone"
    assert g.paths() == [d] and g.version == 2
    assert set((root / "cgroup.subtree_control").read_text().split()) == {"+memory", "+cpu", "+io"}
    g.set_memory_max(300 * MiB)
    assert (d / "memory.max").read_text() == str(300 * MiB)
    assert g.set_cpu_cores(0.4, 0.010) == (4000, 10000) and (d / "cpu.max").read_text() == "4000 10000"
    assert g.cpu_max() == (4000, 10000)
    g.set_cpu_shares(1024)
    assert (d / "cpu.weight").read_text() == "39"  # systemd's mapping of the v1 default
    g.set_cpu_shares(10**9)
    assert (d / "cpu.weight").read_text() == "10000"
    g.set_read_bps("259:0", 80_000_000)
    assert (d / "io.max").read_text() == "259:0 rbps=80000000" and g.read_bps() == {"259:0": 80_000_000}
    (d / "memory.current").write_text("123456789\n")
    (d / "memory.stat").write_text("anon 1000\nfile 2000\npgmajfault 7\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (d / "cpu.stat").write_text("usage_usec 10\nthrottled_usec 2500000\n")
    (d / "io.stat").write_text("259:0 rbytes=4096 wbytes=0 rios=1\n8:0 rbytes=1000 wbytes=5\n")
    (d / "cgroup.procs").write_text("")
    assert (g.memory_current(), g.memory_max(), g.page_cache(), g.anon()) == (123456789, 300 * MiB, 2000, 1000)
    assert (g.major_faults(), g.oom_kills(), g.cpu_throttled_s(), g.io_read_bytes()) == (7, 1, 2.5, 5096)
    (d / "memory.max").write_text("max\n")
    assert g.memory_max() == cgroups.UNLIMITED


def test_a_v1_group_is_limited_and_read_through_the_v1_files(tmp_path: Path) -> None:
    mounts = {c: tmp_path / c for c in cgroups.NEEDED}
    for m in mounts.values():
        m.mkdir()
    g = Hierarchy(1, mounts).create("primasim-eabcd-1-laptop")
    dm, dc, di = (mounts[c] / "primasim-eabcd-1-laptop" for c in cgroups.NEEDED)
    assert g.paths() == [dm, dc, di]
    g.set_memory_max(64 * MiB)
    g.set_cpu_cores(0.6, 0.010)
    g.set_cpu_shares(8192)
    assert (dc / "cpu.shares").read_text() == "8192"
    g.set_read_bps("8:0", 200_000_000)
    assert (dm / "memory.limit_in_bytes").read_text() == str(64 * MiB)
    assert ((dc / "cpu.cfs_quota_us").read_text(), (dc / "cpu.cfs_period_us").read_text()) == ("6000", "10000")
    assert (di / "blkio.throttle.read_bps_device").read_text() == "8:0 200000000"
    (dm / "memory.stat").write_text("cache 10\nrss 20\ntotal_cache 300\ntotal_rss 400\ntotal_pgmajfault 5\n"
                                    "total_active_file 120\ntotal_inactive_file 80\ntotal_unevictable 100\n")
    (dm / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (dm / "memory.max_usage_in_bytes").write_text("999\n")
    (dc / "cpu.stat").write_text("nr_periods 1\nthrottled_time 1500000000\n")
    (di / "blkio.throttle.io_service_bytes").write_text("8:0 Read 4096\n8:0 Write 5\n8:16 Read 10\nTotal 4111\n")
    assert (g.page_cache(), g.anon(), g.major_faults(), g.oom_kills()) == (300, 400, 5, 2)
    assert g.evictable_file() == 200  # the page cache less the mlocked (unevictable) part
    (dm / "memory.usage_in_bytes").write_text("1000\n")
    assert g.held() == 800  # the usage less what reclaim can take
    assert (g.cpu_throttled_s(), g.io_read_bytes(), g.memory_peak()) == (1.5, 4106, 999)
    assert g.reset_peak() and (dm / "memory.max_usage_in_bytes").read_text() == "0"


def test_a_process_finds_its_own_group_in_either_hierarchy(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path / "unified")
    (root / "primasim-eabcd-0-phone").mkdir()
    (root / "primasim-eabcd-0-phone" / "memory.max").write_text("max\n")
    pc = tmp_path / "cgroup"
    pc.write_text("0::/primasim-eabcd-0-phone\n")
    g = own_group("memory", pc, Mounts(v2=("/", root)))
    assert g is not None and g.version == 2 and g.name == "primasim-eabcd-0-phone"
    mem = tmp_path / "memory"
    (mem / "primasim-eabcd-1-x").mkdir(parents=True)
    pc.write_text("4:memory:/primasim-eabcd-1-x\n0::/\n")
    g = own_group("memory", pc, Mounts(v1={"memory": ("/", mem)}, v2=("/", _fake_v2(tmp_path / "u2", "hugetlb"))))
    assert g is not None and g.version == 1 and g.name == "primasim-eabcd-1-x"
    assert own_group("io", pc, Mounts(v1={"memory": ("/", mem)}, v2=("/", tmp_path / "u2"))) is None


@pytest.mark.root
def test_the_emulator_limits_a_device_through_v2_files(tmp_path: Path) -> None:
    """The emulator's own code path on a v2 hierarchy (a fake one: this host's controllers are
    bound to v1): the device's group, its CPU and disk limits at set-up and its memory limit
    above the measured footprint, then clean-up."""
    from primasim.runtime.emulate import EmulatedCluster

    root = _fake_v2(tmp_path / "unified")
    ck = tmp_path / "weights.bin"
    ck.write_bytes(b"\0" * 4096)
    cl = cluster_from_toml({"name": "v2", "network": {"kind": "switched"}, "devices": [
        {"name": "phone", "os": "linux", "cores": 1, "ram_total_gib": 1, "ram_avail_gib": 0.5, "ram_bw_gbs": 10,
         "cpu_gflops": {"f32": 10}, "disk_seq_gbs": 1,
         "emulate": {"cpu_cores": 0.4, "memory_mib": 128, "disk_read_mbs": 80, "cpu_period_ms": 10}}]}, "v2")
    hier = Hierarchy(2, {c: root for c in cgroups.NEEDED})
    with EmulatedCluster(cl, checkpoint_files=[str(ck)], network=False, hierarchy=hier) as emu:
        dev = emu.devices["phone"]
        assert dev.group is not None and dev.group.version == 2
        d = dev.group.paths()[0]
        assert d.parent == root and d.name.startswith("primasim-e")
        assert (d / "cpu.max").read_text() == "4000 10000"
        if "disk read" in " ".join(dev.applied):  # the checkpoint is on a block device
            assert (d / "io.max").read_text().endswith("rbps=80000000")
        (d / "memory.current").write_text(str(400 * MiB))  # the worker's footprint, as the kernel would say
        assert emu.set_memory_budget("phone") == 528 * MiB
        assert (d / "memory.max").read_text() == str(528 * MiB)
        # page cache that set-up read is evictable: not the runtime's footprint (mlocked code is
        # on the unevictable list and stays counted)
        (d / "memory.stat").write_text(f"anon {380 * MiB}\nactive_file {6 * MiB}\ninactive_file {4 * MiB}\n"
                                       f"unevictable {10 * MiB}\n")
        assert emu.set_memory_budget("phone") == 518 * MiB
        assert emu.describe()["cgroups"].startswith("cgroup v2")
        for f in d.iterdir():  # a real cgroup dir's files vanish with it; a fake one's must go first
            f.unlink()
    assert not d.exists()


@pytest.mark.root
@pytest.mark.skipif(not Path("/sys/fs/cgroup/unified/cgroup.procs").exists(),
                    reason="needs a mounted cgroup2 (unified) hierarchy")
def test_a_real_v2_group_takes_a_process_kills_it_and_goes() -> None:
    """What this host's kernel allows on v2: a group under the real unified mount, a process moved
    in, cgroup.kill (Linux 5.14+) and rmdir; the limits themselves need controllers it does not have."""
    m = Mounts.read()
    assert m.v2 is not None
    d = m.v2[1] / f"primasim-e{os.getpid() % 65536:04x}-test"
    d.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        g = Group.at(d)
        assert g.version == 2
        g.add(proc.pid)
        assert g.pids() == [proc.pid]
        assert f"::/{d.name}" in Path(f"/proc/{proc.pid}/cgroup").read_text()
        t0 = time.monotonic()
        g.remove()
        assert proc.wait(timeout=5) == -9 and time.monotonic() - t0 < 3
        assert not d.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        if d.exists():
            d.rmdir()
    if not {"memory", "cpu", "io"} <= m.v2_controllers():
        with pytest.raises(EmulationError, match="cannot enable"):
            Hierarchy(2, {c: m.v2[1] for c in cgroups.NEEDED}).create("primasim-effff-0-never")
        assert not (m.v2[1] / "primasim-effff-0-never").exists()
