"""`local`: this machine as a one-device cluster, from the cached `primasim profile` result.

`primasim profile` (default --out) writes the cache file; `local` reads it. The cached figures are
used only while they still describe this machine: the profile's sidecar records a key (host, CPU,
cores, memory, memory limit, JAX version). A different machine or limits -> nominal figures
again; a different JAX version -> the measured figures, marked stale. Available memory is always
re-read at load time, as prima.cpp measures it at every start-up (it changes minute to minute).
Without a usable profile the device gets nominal figures, marked as such in its sources.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tomllib
from typing import Any

from .cluster import ClusterSpec, NetworkSpec, cluster_from_toml
from .device import DeviceSpec
from .errors import SpecError
from .paths import cache_dir
from .units import GiB

# keys of the profile key that identify the hardware (and its limits); the rest is software
_HARDWARE_KEYS = ("host", "cpu", "cores", "mem_total", "mem_limit")


def local_profile_path() -> str:
    return str(cache_dir() / "profiles" / "local.toml")


def _cached_key(path: str) -> dict[str, Any] | None:
    from primasim.profile.profiler import sidecar_path

    try:
        with open(sidecar_path(path)) as fh:
            key = json.load(fh)["provenance"]["key"]
        return key if isinstance(key, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def local_cluster() -> ClusterSpec:
    """This machine: the cached `primasim profile` result if it fits, else nominal figures."""
    from primasim.profile.profiler import profile_key

    path = local_profile_path()
    note = "no cached profile: run `primasim profile` to measure this machine"
    if os.path.exists(path):
        try:
            with open(path, "rb") as fh:
                cached = cluster_from_toml(tomllib.load(fh), path)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SpecError(f"cached profile is not valid TOML ({exc})", where=path,
                            fix="rerun `primasim profile` (or delete the file)") from None
        key, now = _cached_key(path), profile_key()
        hw_diff = [k for k in _HARDWARE_KEYS if key is not None and key.get(k) != now.get(k)]
        if not hw_diff:
            dev = _refresh_memory(cached.devices[0])
            if key is not None and key.get("jax") != now.get("jax"):
                dev = dev.replace(sources={**dev.sources, "profile.stale": (
                    f"measured with jax {key.get('jax')}, now {now.get('jax')}: rerun `primasim profile`")})
            return ClusterSpec("local", (dev,), cached.network, description=cached.description, path=path)
        note = (f"cached profile {path} is of another machine or limits ({', '.join(hw_diff)} differ): "
                "run `primasim profile` here")
    return ClusterSpec("local", (nominal_device(note),), NetworkSpec(kind="switched"), path="local")


def _refresh_memory(dev: DeviceSpec) -> DeviceSpec:
    from primasim.profile.profiler import memory_info

    mem = memory_info()
    if mem.total <= 0:
        return dev
    avail = min(mem.available, dev.ram_total)
    return dev.replace(ram_avail=avail, swap_avail=min(mem.swap_available, dev.swap_total),
                       sources={**dev.sources, "ram_avail_gib": mem.how + " (re-read when `local` was loaded)"})


def nominal_device(note: str) -> DeviceSpec:
    """This machine with measured memory and cores but nominal speeds (no profile yet)."""
    from primasim.profile.profiler import (
        NOMINAL,
        cpu_model,
        device_os,
        effective_cores,
        memory_info,
        read_limits,
    )

    lim = read_limits()
    mem = memory_info(lim)
    if mem.total <= 0:  # no /proc/meminfo (or sysctl): the old nominal 8 GiB, half of it free
        mem = dataclasses.replace(mem, total=8.0 * GiB, available=4.0 * GiB, how="nominal: memory not readable")
    return DeviceSpec(
        name=platform.node() or "local", os=device_os(), cores=effective_cores(lim),  # type: ignore[arg-type]
        ram_total=mem.total, ram_avail=min(mem.available, mem.total), ram_bw=NOMINAL["ram_bw"],
        cpu_flops={"f32": NOMINAL["cpu_f32"]}, disk_seq=NOMINAL["disk_seq"], disk_rnd=NOMINAL["disk_rnd"],
        kv_copy=NOMINAL["kv_copy"], swap_total=mem.swap_total, swap_avail=min(mem.swap_available, mem.swap_total),
        hardware=cpu_model(),
        sources={"*": "nominal figures: " + note, "ram_avail_gib": mem.how, "cores": "CPU affinity / cgroup quota"},
    )
