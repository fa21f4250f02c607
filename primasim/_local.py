"""`local`: this machine as a one-device cluster (from a cached profile when there is one)."""

from __future__ import annotations

import os
import platform
import tomllib

from ._cluster import ClusterSpec, NetworkSpec, cluster_from_toml
from ._device import DeviceSpec
from ._paths import cache_dir
from ._units import GB, GFLOPS, GiB, KiB


def _meminfo() -> dict[str, float]:
    out = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                k, v = line.split(":", 1)
                out[k] = float(v.split()[0]) * KiB
    except OSError:
        pass
    return out


def local_profile_path() -> str:
    return str(cache_dir() / "profiles" / "local.toml")


def local_cluster() -> ClusterSpec:
    """This machine: the cached `primasim profile` result if present, else nominal figures."""
    path = local_profile_path()
    if os.path.exists(path):
        with open(path, "rb") as fh:
            return cluster_from_toml(tomllib.load(fh), path)
    mi = _meminfo()
    total = mi.get("MemTotal", 8 * GiB)
    avail = mi.get("MemAvailable", total / 2) * 0.8  # prima.cpp: MemAvailable x 0.8 on Linux
    osname = {"Linux": "linux", "Darwin": "macos"}.get(platform.system(), "linux")
    dev = DeviceSpec(
        name=platform.node() or "local", os=osname, cores=os.cpu_count() or 1, ram_total=total,
        ram_avail=avail, ram_bw=20 * GB, cpu_flops={"f32": 50 * GFLOPS}, disk_seq=1 * GB, disk_rnd=0.3 * GB,
        hardware=platform.processor() or platform.machine(),
        sources={"*": "nominal figures: run `primasim profile` to measure this machine"},
    )
    return ClusterSpec("local", (dev,), NetworkSpec(kind="switched"), path="local")
