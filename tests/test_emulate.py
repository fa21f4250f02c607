"""The emulated home cluster: real cgroups, network namespaces, veth + tbf; robust tear-down (on
error, SIGTERM, SIGKILL of the driver + stale clean-up); plain processes without privileges."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from primasim.core.cluster import ClusterSpec, cluster_from_toml
from primasim.core.units import MiB
from primasim.runtime.emulate import (
    EmulatedCluster,
    cleanup_stale,
    find_leftovers,
    state_dir,
)

pytestmark = pytest.mark.root
PY = sys.executable


def _cluster(links: list[dict[str, Any]] | None = None) -> ClusterSpec:
    devs = []
    for name, em in (("big", {"cpu_cores": 1.5, "memory_mib": 300, "disk_read_mbs": 200, "threads": 2}),
                     ("small", {"cpu_cores": 0.5, "memory_mib": 64, "disk_read_mbs": 50})):
        devs.append({"name": name, "os": "linux", "cores": 1, "ram_total_gib": 1, "ram_avail_gib": 0.5,
                     "ram_bw_gbs": 10, "cpu_gflops": {"f32": 10}, "disk_seq_gbs": 1, "emulate": em})
    net: dict[str, Any] = {"kind": "switched", "bandwidth_mbps": 500, "latency_ms": 1}
    if links:
        net["links"] = links
    return cluster_from_toml({"name": "emu-test", "network": net, "devices": devs}, "emu-test")


def _mine(rid: str) -> list[str]:
    return [x for v in find_leftovers().values() for x in v if f"primasim-e{rid}" in x]


def _tc(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", "eth0"], capture_output=True,
                          text=True, check=True).stdout


def test_limits_are_applied_and_everything_is_removed(tmp_path: Path) -> None:
    ck = tmp_path / "weights.bin"
    ck.write_bytes(b"\0" * 4096)
    with EmulatedCluster(_cluster(), checkpoint_files=[str(ck)]) as emu:
        rid = emu.rid
        assert emu.active and rid and not [x for x in emu.limitations if "not root" in x]
        big, small = emu.devices["big"], emu.devices["small"]
        assert big.group is not None and small.group is not None
        assert big.group.cpu_max() == (150000, 100000) and small.group.cpu_max() == (50000, 100000)
        assert list(small.group.read_bps().values()) == [50_000_000]
        if emu.hierarchy is not None and emu.hierarchy.version == 1:  # the files themselves, on v1
            assert (big.cgroups["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "150000"
            thr = (small.cgroups["io"] / "blkio.throttle.read_bps_device").read_text().split()
            assert thr[1] == str(50_000_000)
        assert small.memory_limit == 64 * MiB and len(big.cpus) == min(2, len(os.sched_getaffinity(0)))
        assert "tbf" in _tc(small.netns) and "500Mbit" in _tc(small.netns) and "htb" in _tc(small.netns)
        assert Path(f"/run/netns/{small.netns}").exists() and Path(f"/sys/class/net/{small.veth}").exists()
        assert (state_dir() / f"{rid}.json").exists()
        groups = 2 * len(small.group.paths())  # v1: a dir per controller, v2: one
        assert len(_mine(rid)) == groups + 2 + 3  # cgroups, netns, bridge + veths
    assert _mine(rid) == []
    assert not (state_dir() / f"{rid}.json").exists()


def test_per_pair_links_shape_real_traffic(tmp_path: Path) -> None:
    """A 20 Mbit/s link between the two devices (htb classifier, tbf leaf) and the 500 Mbit/s
    default elsewhere: 1 MB across the slow link takes >= 0.4 s; the driver's link stays fast."""
    cl = _cluster([{"a": "big", "b": "small", "bandwidth_mbps": 20, "latency_ms": 5}])
    with EmulatedCluster(cl) as emu:
        big, small = emu.devices["big"], emu.devices["small"]
        assert "htb" in _tc(small.netns) and "20Mbit" in _tc(small.netns)
        server = textwrap.dedent(f"""
            import socket, time
            s = socket.create_server(("{big.host}", 7000)); print("listening", flush=True)
            c, _ = s.accept(); n = 0; t0 = None
            while n < 1_000_000:
                b = c.recv(1 << 16)
                if not b: break
                t0 = t0 or time.time(); n += len(b)
            print(n, time.time() - t0, flush=True)
        """)
        client = f"import socket; s = socket.create_connection(('{big.host}', 7000)); s.sendall(b'x' * 1_000_000)"
        enter = [PY, "-m", "primasim.runtime.emulate", "enter"]
        srv = subprocess.Popen([*enter, "--netns", big.netns, "--", PY, "-c", server], stdout=subprocess.PIPE, text=True)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "listening"  # then the client connects
        subprocess.run([*enter, "--netns", small.netns, "--", PY, "-c", client], check=True, timeout=60)
        out, _ = srv.communicate(timeout=120)
        n, dt = out.split()
        assert int(n) == 1_000_000
        assert float(dt) > 0.8 * 8e6 / 20e6  # 0.4 s at 20 Mbit/s
        assert any("to big 20 Mbit/s" in a for a in small.applied)


def test_error_inside_the_block_cleans_up() -> None:
    rid = ""
    with pytest.raises(RuntimeError, match="boom"), EmulatedCluster(_cluster()) as emu:
        rid = emu.rid
        emu.spawn("small")
        emu.wait_ready("small", 60)
        raise RuntimeError("boom")
    assert rid and _mine(rid) == []


DRIVER = textwrap.dedent("""
    import json, sys, time
    from primasim.core.cluster import cluster_from_toml
    from primasim.runtime.emulate import EmulatedCluster
    cl = cluster_from_toml(json.loads(sys.argv[1]), "emu-test")
    emu = EmulatedCluster(cl, heartbeat_timeout=float(sys.argv[2])).__enter__()
    for n in ("big", "small"):
        emu.spawn(n)
    for n in ("big", "small"):
        emu.wait_ready(n, 60)
    print(json.dumps({"rid": emu.rid, "pids": [d.process.pid for d in emu.devices.values()]}), flush=True)
    time.sleep(600)
""")


def _start_driver(hb: float = 30.0) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    raw = {"name": "emu-test", "network": {"kind": "switched", "bandwidth_mbps": 500, "latency_ms": 1},
           "devices": [{"name": n, "os": "linux", "cores": 1, "ram_total_gib": 1, "ram_avail_gib": 0.5,
                        "ram_bw_gbs": 10, "cpu_gflops": {"f32": 10}, "disk_seq_gbs": 1,
                        "emulate": {"cpu_cores": 0.5, "memory_mib": 64}} for n in ("big", "small")]}
    p = subprocess.Popen([PY, "-c", DRIVER, json.dumps(raw), str(hb)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, "the driver did not start"
    return p, json.loads(line)


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if st == "Z":
            return True
        time.sleep(0.05)
    return False


def test_sigterm_to_the_driver_cleans_up() -> None:
    p, info = _start_driver()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) != 0
    assert all(_gone(pid, 60) for pid in info["pids"])
    assert _mine(info["rid"]) == []


def test_sigkilled_driver_workers_exit_and_the_next_start_removes_leftovers() -> None:
    p, info = _start_driver()
    assert len(_mine(info["rid"])) > 0
    p.kill()
    p.wait(timeout=60)
    # the workers die with their parent (PR_SET_PDEATHSIG) ...
    assert all(_gone(pid, 60) for pid in info["pids"])
    # ... the cgroups and namespaces stay until the next start (or `primasim run --cleanup`)
    assert len(_mine(info["rid"])) > 0
    removed = cleanup_stale()
    assert any(info["rid"] in r for r in removed)
    assert _mine(info["rid"]) == []
    assert not (state_dir() / f"{info['rid']}.json").exists()


def test_cleanup_leaves_live_runs_alone() -> None:
    with EmulatedCluster(_cluster()) as emu:
        cleanup_stale()
        assert len(_mine(emu.rid)) > 0
        assert Path(f"/run/netns/{emu.devices['big'].netns}").exists()


def test_set_memory_budget_limits_the_cgroup_above_the_footprint() -> None:
    with EmulatedCluster(_cluster()) as emu:
        emu.spawn("small")
        emu.wait_ready("small", 60)
        g = emu.devices["small"].group
        assert g is not None
        limit = emu.set_memory_budget("small")
        assert limit is not None
        usage = g.memory_current()
        assert g.memory_max() == limit
        assert limit - 64 * MiB <= usage + 16 * MiB  # footprint + 64 MiB
        assert emu.cgroup_stats("small")["cg_mem_limit"] == limit
        pid = emu.devices["small"].process.pid
        assert pid in g.pids()
        for f in g.procs_files():  # every controller's group (v1: memory, cpu, blkio)
            assert str(pid) in f.read_text()


def test_without_privileges_it_runs_plain_processes_and_says_so(tmp_path: Path) -> None:
    """Root without CAP_SYS_ADMIN/CAP_NET_ADMIN (setpriv drops them) cannot create namespaces:
    the cluster falls back to plain processes on 127.0.0.1 and lists what it could not emulate."""
    code = textwrap.dedent("""
        import json
        from primasim.core.cluster import load_cluster
        from primasim.runtime.emulate import EmulatedCluster
        with EmulatedCluster(load_cluster("home-emu")) as emu:
            emu.spawn("phone")
            ready = emu.wait_ready("phone", 60)
            print(json.dumps({"active": emu.active, "limitations": emu.limitations, "ready": ready,
                              "cgroups": {n: list(map(str, d.cgroups.values())) for n, d in emu.devices.items()}}))
    """)
    out = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all", PY, "-c", code],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["active"] is False
    assert any("plain processes" in x and "memory limits" in x for x in info["limitations"])
    assert info["ready"]["control"].startswith("tcp://127.0.0.1:")
    assert all(not v for v in info["cgroups"].values())
