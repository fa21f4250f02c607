"""Synthetic home clusters: random but plausible heterogeneous devices for sweeps and property tests.

Each device draws an OS (Linux, macOS, Android), a CPU, RAM and how much of it is free, a disk
(sometimes slower than prima.cpp's 0.1 GB/s threshold), and maybe a GPU (CUDA on Linux, Metal with
unified memory on macOS). Ranges span the prima.cpp testbed (phones with 2 GiB free to desktops
with 24 GiB GPUs). Deterministic for a given numpy Generator.
"""

from __future__ import annotations

import numpy as np

from .cluster import ClusterSpec, NetworkSpec
from .device import DeviceSpec, GPUSpec
from .units import GB, GFLOPS, MBPS, MS, GiB

_QUANT_SPEED = {"f32": 1.0, "f16": 0.85, "q8_0": 0.8, "q6k": 0.7, "q5k": 0.7, "q4k": 0.75}


def _flops(base: float) -> dict[str, float]:
    return {q: base * f * GFLOPS for q, f in _QUANT_SPEED.items()}


OSES = ("linux", "macos", "android")
_OS_WEIGHT = {"linux": 0.5, "macos": 0.25, "android": 0.25}


def random_device(rng: np.random.Generator, name: str, *, os_name: str | None = None,
                  oses: tuple[str, ...] = OSES) -> DeviceSpec:
    """One random device (OS `os_name`, or drawn from `oses` with Linux twice as likely)."""
    if os_name is None:
        wts = np.array([_OS_WEIGHT[o] for o in oses])
        os_name = str(rng.choice(list(oses), p=wts / wts.sum()))
    os_ = os_name
    ram_total = float(rng.choice([4, 6, 8, 12, 16, 24, 32, 64] if os_ != "android" else [4, 6, 8, 12, 16]))
    ram_avail = ram_total * float(rng.uniform(0.15, 0.85))
    cpu = float(rng.uniform(30, 200) if os_ == "android" else rng.uniform(60, 900))
    disk_seq = float(np.exp(rng.uniform(np.log(0.05), np.log(7.0))))  # a few below the 0.1 GB/s threshold
    disk_rnd = disk_seq * float(rng.uniform(0.1, 0.8))
    gpu = None
    uma = False
    if os_ == "linux" and rng.random() < 0.5:
        vram_total = float(rng.choice([2, 4, 6, 8, 12, 16, 24]))
        gpu = GPUSpec(kind="cuda", vram_total=vram_total * GiB,
                      vram_avail=vram_total * float(rng.uniform(0.6, 1.0)) * GiB,
                      flops=_flops(float(rng.uniform(1500, 40000))), mem_bw=float(rng.uniform(100, 1000)) * GB,
                      name="cuda")
    elif os_ == "macos" and rng.random() < 0.7:
        uma = True
        gpu = GPUSpec(kind="metal", vram_total=0.66 * ram_total * GiB, vram_avail=ram_avail * GiB,
                      flops=_flops(float(rng.uniform(1000, 10000))), mem_bw=float(rng.uniform(60, 400)) * GB,
                      name="metal")
    swap = float(rng.uniform(0, 4)) if os_ == "android" else float(rng.choice([0.0, 1.0, 2.0]))
    return DeviceSpec(
        name=name, os=os_, cores=int(rng.choice([4, 6, 8, 12, 16])), ram_total=ram_total * GiB,
        ram_avail=ram_avail * GiB, ram_bw=float(rng.uniform(10, 100)) * GB, cpu_flops=_flops(cpu),
        disk_seq=disk_seq * GB, disk_rnd=disk_rnd * GB, uma=uma, swap_total=swap * GiB, swap_avail=swap * GiB,
        can_swap=float(rng.uniform(0, 2)) * GiB if os_ == "android" else 0.0, gpu=gpu,
        hardware="synthetic", sources={"*": "random (primasim.core.synth)"},
    )


def random_cluster(rng: np.random.Generator, n_devices: int, *, name: str = "random",
                   oses: tuple[str, ...] | None = None) -> ClusterSpec:
    """A random cluster of `n_devices` devices on Wi-Fi or a switch; the first device is the head.

    `oses`: the OS mix (e.g. ("linux", "android")); every OS of it appears when there are enough
    devices. Default: any OS, Linux twice as likely as macOS or Android (the same draws as before).
    """
    if oses is None:
        devs = tuple(random_device(rng, f"R{i + 1}") for i in range(n_devices))
    else:
        first = [str(o) for o in rng.permutation(list(oses))]
        devs = tuple(random_device(rng, f"R{i + 1}", os_name=first[i] if i < len(first) else None, oses=oses)
                     for i in range(n_devices))
    net = NetworkSpec(kind=str(rng.choice(["wifi", "switched"])), bandwidth=float(rng.uniform(100, 1000)) * MBPS,
                      latency=float(rng.uniform(0.5, 10)) * MS)
    return ClusterSpec(name=name, devices=devs, network=net, description=f"synthetic, {n_devices} devices")
