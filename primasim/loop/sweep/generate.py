"""Generated clusters: families of random home clusters drawn from device classes, OS mixes and link
distributions, declared in a sweep spec and used as `cluster = "NAME"` (every member) or
`cluster = "NAME/3"` (one member).

    [generate.home]
    count = 20                                   # members home/0 .. home/19
    devices = [2, 3, 4, 6]                       # devices per cluster: a value, choices or {low, high}
    classes = { phone = 2, laptop = 3, desktop = 1, mac = 1 }   # relative weights of device classes
    os = { linux = 2, macos = 1, android = 1 }   # optional: OS mix among each class's possible OSes
    network = ["wifi", "switched"]
    bandwidth_mbps = { low = 50, high = 600, log = true }
    latency_ms = { low = 1, high = 10 }
    per_link = false                             # true: every device pair draws its own link
    head = "strongest"                           # the user's device (prima's head): strongest (default),
                                                 # first, or a class name ("phone": the user's phone)

Classes are built in (phone, laptop, desktop, mac, sbc) or declared under `[classes.NAME]` with
the keys of CLASSES below. Member i of family F is drawn from numpy's Generator seeded with
(spec seed, crc32(F), i): the same spec always yields the same clusters, and adding members or
families leaves the others unchanged.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from primasim.core.cluster import ClusterSpec, LinkSpec, NetworkSpec, cluster_from_toml
from primasim.core.device import OSES, DeviceSpec, GPUSpec
from primasim.core.errors import SpecError
from primasim.core.synth import _flops
from primasim.core.units import GB, MBPS, MS, GiB

from .dist import Dist, parse_dist, parse_weights

# Device classes: the distribution of every figure a device needs. Ranges span the prima.cpp
# testbed and common 2023-2025 home hardware; they are plausible, not measured.
CLASSES: dict[str, dict[str, Any]] = {
    "phone": {"os": ["android"], "cores": [6, 8], "ram_gib": [4, 6, 8, 12, 16], "avail": {"low": 0.2, "high": 0.5},
              "cpu_gflops": {"low": 30, "high": 200, "log": True}, "ram_bw_gbs": {"low": 10, "high": 50},
              "disk_gbs": {"low": 0.5, "high": 2.5}, "disk_rnd_ratio": {"low": 0.2, "high": 0.6}, "gpu": 0.0,
              "swap_gib": {"low": 0, "high": 4}, "can_swap_gib": {"low": 0, "high": 2}},
    "laptop": {"os": ["linux", "macos"], "cores": [4, 8, 12, 16], "ram_gib": [8, 16, 32], "avail": {"low": 0.3, "high": 0.7},
               "cpu_gflops": {"low": 100, "high": 600, "log": True}, "ram_bw_gbs": {"low": 20, "high": 80},
               "disk_gbs": {"low": 1, "high": 5}, "disk_rnd_ratio": {"low": 0.2, "high": 0.8}, "gpu": 0.3,
               "vram_gib": [4, 6, 8], "gpu_gflops": {"low": 3000, "high": 15000, "log": True},
               "gpu_bw_gbs": {"low": 190, "high": 450}},
    "desktop": {"os": ["linux"], "cores": [8, 12, 16, 24], "ram_gib": [16, 32, 64], "avail": {"low": 0.4, "high": 0.8},
                "cpu_gflops": {"low": 300, "high": 1200, "log": True}, "ram_bw_gbs": {"low": 40, "high": 90},
                "disk_gbs": {"low": 2, "high": 7}, "disk_rnd_ratio": {"low": 0.3, "high": 0.8}, "gpu": 0.6,
                "vram_gib": [8, 12, 16, 24], "gpu_gflops": {"low": 10000, "high": 80000, "log": True},
                "gpu_bw_gbs": {"low": 400, "high": 1000}},
    "mac": {"os": ["macos"], "cores": [8, 10, 12], "ram_gib": [8, 16, 24, 32, 64], "avail": {"low": 0.3, "high": 0.7},
            "cpu_gflops": {"low": 200, "high": 600, "log": True}, "ram_bw_gbs": {"low": 60, "high": 400, "log": True},
            "disk_gbs": {"low": 2, "high": 6}, "disk_rnd_ratio": {"low": 0.3, "high": 0.8}, "gpu": 1.0,
            "gpu_gflops": {"low": 2000, "high": 15000, "log": True}, "gpu_bw_gbs": {"low": 60, "high": 400, "log": True}},
    "sbc": {"os": ["linux"], "cores": [4], "ram_gib": [4, 8, 16], "avail": {"low": 0.5, "high": 0.9},
            "cpu_gflops": {"low": 15, "high": 60}, "ram_bw_gbs": {"low": 5, "high": 15},
            "disk_gbs": {"low": 0.04, "high": 0.4, "log": True}, "disk_rnd_ratio": {"low": 0.1, "high": 0.5}, "gpu": 0.0},
}
CLASS_KEYS = {
    "os": "possible OSes (list)", "cores": "CPU threads", "ram_gib": "physical RAM", "avail": "fraction of RAM free",
    "cpu_gflops": "CPU f32 GFLOPS", "ram_bw_gbs": "RAM bandwidth", "disk_gbs": "sequential disk read",
    "disk_rnd_ratio": "random/sequential disk ratio", "gpu": "probability of a usable GPU (CUDA on Linux, Metal "
    "with unified memory on macOS)", "vram_gib": "CUDA VRAM", "gpu_gflops": "GPU f32 GFLOPS",
    "gpu_bw_gbs": "GPU memory bandwidth", "swap_gib": "swap", "can_swap_gib": "Android: other apps' swappable pages",
}
FAMILY_KEYS = ("count", "devices", "classes", "os", "network", "bandwidth_mbps", "latency_ms", "jitter_ms", "per_link",
               "head")
HEADS = ("strongest", "first")  # or a class name: the first device of that class (the user's own device)
_DEFAULTS = {"devices": [2, 3, 4], "network": "wifi", "bandwidth_mbps": {"low": 50, "high": 600, "log": True},
             "latency_ms": {"low": 1, "high": 10}, "jitter_ms": 0.0}


@dataclass(frozen=True)
class DeviceClass:
    name: str
    oses: tuple[str, ...]
    figures: dict[str, Dist]

    def draw(self, rng: np.random.Generator, name: str, os_weights: dict[str, float] | None) -> DeviceSpec:
        f = self.figures
        w = np.array([(os_weights or {}).get(o, 0.0) if os_weights else 1.0 for o in self.oses])
        os_ = self.oses[int(rng.choice(len(self.oses), p=w / w.sum()))]
        ram_total = float(f["ram_gib"].draw(rng))
        ram_avail = ram_total * float(f["avail"].draw(rng))
        disk = float(f["disk_gbs"].draw(rng))
        gpu = None
        uma = False
        if float(rng.random()) < float(f["gpu"].draw(rng)):
            if os_ == "macos":
                uma = True
                gpu = GPUSpec(kind="metal", vram_total=0.66 * ram_total * GiB, vram_avail=ram_avail * GiB,
                              flops=_flops(float(f["gpu_gflops"].draw(rng))),
                              mem_bw=float(f["gpu_bw_gbs"].draw(rng)) * GB, name="metal")
            elif os_ == "linux":
                vram = float(f["vram_gib"].draw(rng))
                gpu = GPUSpec(kind="cuda", vram_total=vram * GiB, vram_avail=vram * float(rng.uniform(0.7, 1.0)) * GiB,
                              flops=_flops(float(f["gpu_gflops"].draw(rng))),
                              mem_bw=float(f["gpu_bw_gbs"].draw(rng)) * GB, name="cuda")
        swap = float(f["swap_gib"].draw(rng))
        return DeviceSpec(
            name=name, os=os_, cores=int(f["cores"].draw(rng)), ram_total=ram_total * GiB, ram_avail=ram_avail * GiB,
            ram_bw=float(f["ram_bw_gbs"].draw(rng)) * GB, cpu_flops=_flops(float(f["cpu_gflops"].draw(rng))),
            disk_seq=disk * GB, disk_rnd=disk * float(f["disk_rnd_ratio"].draw(rng)) * GB, uma=uma,
            swap_total=swap * GiB, swap_avail=swap * GiB,
            can_swap=float(f["can_swap_gib"].draw(rng)) * GiB if os_ == "android" else 0.0, gpu=gpu,
            hardware=f"generated {self.name} ({os_})", sources={"*": f"drawn from device class {self.name!r}"})


def parse_class(name: str, raw: Any, where: str) -> DeviceClass:
    if not isinstance(raw, dict):
        raise SpecError("a device class is a table", where=where, fix=f"keys: {', '.join(CLASS_KEYS)}")
    extra = set(raw) - set(CLASS_KEYS)
    if extra:
        raise SpecError(f"unknown key(s) {sorted(extra)}", where=where, fix=f"keys: {', '.join(CLASS_KEYS)}")
    base = {"gpu": 0.0, "swap_gib": 0.0, "can_swap_gib": 0.0, "vram_gib": 8, "gpu_gflops": 5000, "gpu_bw_gbs": 300}
    merged = {**base, **raw}
    missing = [k for k in CLASS_KEYS if k not in merged]
    if missing:
        raise SpecError(f"missing {missing}", where=where, fix="give every figure: a value, a list or {low, high}")
    oses = merged["os"] if isinstance(merged["os"], list) else [merged["os"]]
    bad = [o for o in oses if o not in OSES]
    if bad or not oses:
        raise SpecError(f"os {bad or oses!r} unknown", where=f"{where}.os", fix=f"use some of {', '.join(OSES)}")
    figures = {}
    for k, v in merged.items():
        if k == "os":
            continue
        d = parse_dist(v, f"{where}.{k}", integer=k == "cores")
        for x in d.values():
            if isinstance(x, bool) or not isinstance(x, int | float) or x < 0:
                raise SpecError(f"{x!r} is not a number >= 0", where=f"{where}.{k}", fix="use non-negative numbers")
        if k in ("avail", "gpu") and max(d.values()) > 1:
            raise SpecError(f"{k} is a fraction, got {max(d.values())}", where=f"{where}.{k}", fix="use values in [0, 1]")
        if k in ("ram_gib", "cores", "cpu_gflops", "ram_bw_gbs", "disk_gbs") and min(d.values()) <= 0:
            raise SpecError(f"{k} must be > 0", where=f"{where}.{k}", fix="use positive values")
        figures[k] = d
    return DeviceClass(name, tuple(oses), figures)


@dataclass(frozen=True)
class Family:
    """One `[generate.NAME]` table: how to draw member clusters NAME/0 .. NAME/(count-1)."""

    name: str
    count: int
    devices: Dist
    classes: tuple[tuple[DeviceClass, float], ...]
    os: dict[str, float] | None
    network: Dist
    bandwidth_mbps: Dist
    latency_ms: Dist
    jitter_ms: Dist
    per_link: bool
    head: str = "strongest"

    def members(self) -> list[str]:
        return [f"{self.name}/{i}" for i in range(self.count)]

    def build(self, i: int, seed: int) -> ClusterSpec:
        rng = np.random.default_rng([seed, zlib.crc32(self.name.encode()), i])
        n = int(self.devices.draw(rng))
        cls = [c for c, _ in self.classes]
        w = np.array([w for _, w in self.classes])
        devs = []
        for j in range(n):
            c = cls[int(rng.choice(len(cls), p=w / w.sum()))]
            devs.append(c.draw(rng, f"D{j + 1}", self.os))
        names = [d.name for d in devs]
        bw = float(self.bandwidth_mbps.draw(rng))
        lat = float(self.latency_ms.draw(rng))
        links: tuple[LinkSpec, ...] = ()
        if self.per_link:
            links = tuple(LinkSpec(a, b, float(self.bandwidth_mbps.draw(rng)) * MBPS, float(self.latency_ms.draw(rng)) * MS)
                          for a, b in combinations(names, 2))
        net = NetworkSpec(kind=str(self.network.draw(rng)), bandwidth=bw * MBPS, latency=lat * MS,
                          jitter=float(self.jitter_ms.draw(rng)) * MS, links=links)
        cl = ClusterSpec(name=f"{self.name}/{i}", devices=tuple(devs), network=net, head=self._head(devs),
                         description=f"generated: member {i} of family {self.name!r} (seed {seed})")
        # through the file format once: the cluster simulated is exactly the one saved beside the results
        return cluster_from_toml(cl.to_toml(), f"generated {cl.name}")

    def _head(self, devs: list[DeviceSpec]) -> str:
        """The device the user sits at: prima.cpp's head (it runs the input and output layers)."""
        if self.head == "first":
            return devs[0].name
        if self.head == "strongest":  # the most memory for the model, then the most compute
            return max(devs, key=lambda d: (d.mem_budget + (d.gpu.vram_avail if d.has_cuda and d.gpu else 0.0),
                                            d.cpu_rate("f32"))).name
        mine = [d for d in devs if d.hardware.startswith(f"generated {self.head} ")]
        return mine[0].name if mine else devs[0].name


def parse_classes(raw: Any, where: str) -> dict[str, DeviceClass]:
    """Built-in classes plus the spec's `[classes.NAME]` tables (which may replace a built-in one)."""
    out = {k: parse_class(k, v, f"classes.{k} (built in)") for k, v in CLASSES.items()}
    if raw is None:
        return out
    if not isinstance(raw, dict):
        raise SpecError("[classes] is a table of device classes", where=where, fix="write [classes.NAME] tables")
    for k, v in raw.items():
        out[k] = parse_class(k, v, f"{where}: classes.{k}")
    return out


def parse_family(name: str, raw: Any, classes: dict[str, DeviceClass], where: str) -> Family:
    w = f"{where}: generate.{name}"
    if "/" in name:
        raise SpecError(f"family name {name!r} contains '/'", where=w, fix="name it without '/'")
    if not isinstance(raw, dict):
        raise SpecError("a cluster family is a table", where=w, fix=f"keys: {', '.join(FAMILY_KEYS)}")
    extra = set(raw) - set(FAMILY_KEYS)
    if extra:
        raise SpecError(f"unknown key(s) {sorted(extra)}", where=w, fix=f"keys: {', '.join(FAMILY_KEYS)}")
    count = raw.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SpecError(f"count = {count!r}: how many clusters to draw", where=f"{w}.count", fix="e.g. count = 20")
    if "classes" not in raw:
        raise SpecError("missing classes", where=w, fix=f"e.g. classes = {{ laptop = 2, phone = 1 }} (built in: {', '.join(CLASSES)})")
    weights = parse_weights(raw["classes"], f"{w}.classes", list(classes))
    cls = tuple((classes[k], v) for k, v in weights.items() if v > 0)
    os_w = parse_weights(raw["os"], f"{w}.os", OSES) if "os" in raw else None
    if os_w is not None:
        for c, _ in cls:
            if not any(os_w.get(o, 0) > 0 for o in c.oses):
                raise SpecError(f"class {c.name} runs only {', '.join(c.oses)}, which the OS mix gives weight 0",
                                where=f"{w}.os", fix=f"give one of {', '.join(c.oses)} a weight, or drop the class")
    vals = {k: raw.get(k, _DEFAULTS.get(k)) for k in ("devices", "network", "bandwidth_mbps", "latency_ms", "jitter_ms")}
    devices = parse_dist(vals["devices"], f"{w}.devices", integer=True)
    if min(devices.values()) < 1:
        raise SpecError("a cluster needs at least one device", where=f"{w}.devices", fix="use counts >= 1")
    network = parse_dist(vals["network"], f"{w}.network")
    if any(v not in ("wifi", "switched") for v in network.values()):
        raise SpecError(f"network {network.describe()!r} unknown", where=f"{w}.network", fix="use wifi or switched")
    dists = {}
    for k in ("bandwidth_mbps", "latency_ms", "jitter_ms"):
        d = parse_dist(vals[k], f"{w}.{k}")
        if any(isinstance(x, bool) or not isinstance(x, int | float) or x < 0 for x in d.values()) or (
                k == "bandwidth_mbps" and min(d.values()) <= 0):
            raise SpecError(f"{k} must be a number {'> 0' if k == 'bandwidth_mbps' else '>= 0'}", where=f"{w}.{k}",
                            fix="e.g. {low = 50, high = 600, log = true}")
        dists[k] = d
    per_link = raw.get("per_link", False)
    if not isinstance(per_link, bool):
        raise SpecError("per_link is true or false", where=f"{w}.per_link", fix="per_link = true")
    head = raw.get("head", "strongest")
    if head not in HEADS and head not in classes:
        raise SpecError(f"head = {head!r}", where=f"{w}.head",
                        fix=f"use strongest (default), first, or a device class ({', '.join(classes)})")
    return Family(name, count, devices, cls, os_w, network, dists["bandwidth_mbps"], dists["latency_ms"],
                  dists["jitter_ms"], per_link, head)
