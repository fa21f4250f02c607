"""ClusterSpec and NetworkSpec: devices plus the links between them, in a human-editable TOML file.

File layout (see data/clusters/prima-d1-d4.toml for a complete example):

    name = "my-home"
    head = "laptop"                    # optional; default: the first device
    [network]
    kind = "wifi"                      # wifi: one shared medium (airtime); switched: independent links
    bandwidth_mbps = 450
    latency_ms = 5                     # one-way per hop
    jitter_ms = 1                      # std-dev of the per-message latency (seeded)
    [[network.links]]                  # optional per-pair overrides
    a = "laptop"; b = "phone"; bandwidth_mbps = 200; latency_ms = 8
    # burst_kb = 3.0                   # optional: a shaper's bucket (tc tbf) passed at once after idle
    [[devices]]
    name = "laptop"
    ...                                # DeviceSpec keys (primasim/core/device.py)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from .device import DeviceSpec, device_from_toml, device_to_toml
from .errors import SpecError
from .io import atomic_write_text
from .paths import cache_dir, data_dir
from .procfs import (
    cpu_model,
    device_os,
    effective_cores,
    library_versions,
    meminfo,
    memory_info,
    read_limits,
)
from .units import GB, GFLOPS, MBPS, MS, GiB


@dataclass(frozen=True)
class LinkSpec:
    a: str
    b: str
    bandwidth: float  # bytes/s
    latency: float  # s, one-way
    burst: float = 0.0  # bytes: a shaper's bucket (tc tbf): after an idle spell this much passes at once


#: 802.11ac/ax airtime a transmission opportunity costs besides its payload: DIFS (34 us) + mean
#: backoff (CWmin 15 x 9 us slot / 2 = 67.5 us) + PHY preamble (~40 us) + SIFS (16 us) + block ack
#: (~32 us) (IEEE 802.11-2016 timing); one aggregate (A-MPDU) carries up to WIFI_AMPDU bytes.
WIFI_TXOP_OVERHEAD = 190e-6
WIFI_AMPDU = 64 * 1024


@dataclass(frozen=True)
class NetworkSpec:
    kind: Literal["wifi", "switched"] = "wifi"
    bandwidth: float = 450 * MBPS
    latency: float = 5 * MS
    jitter: float = 0.0
    links: tuple[LinkSpec, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)
    # switched: "nic" -- each device sends and receives through one NIC at `bandwidth` (a switch);
    # "pair" -- every pair of devices is its own shaped link (the emulation's per-peer tbf)
    contention: Literal["nic", "pair"] = "nic"
    txop_overhead: float = -1.0  # wifi: airtime per transmission opportunity (-1: WIFI_TXOP_OVERHEAD)
    ampdu: float = WIFI_AMPDU  # wifi: payload bytes one transmission opportunity carries

    def airtime(self, a: str, b: str, nbytes: float) -> float:
        """Seconds a message holds the medium (or link). On Wi-Fi every transmission opportunity
        pays its contention, preamble and block ack on top of the payload: `bandwidth` is the
        bulk rate measured with full aggregates, so the PHY rate is what leaves that after the
        overhead, and a small message pays one overhead for little payload."""
        bw, _ = self.link(a, b)
        ovh = WIFI_TXOP_OVERHEAD if self.txop_overhead < 0 else self.txop_overhead
        if self.kind != "wifi" or ovh <= 0 or nbytes <= 0:
            return nbytes / bw
        per_agg = self.ampdu / bw - ovh  # payload seconds of one full aggregate at the PHY rate
        if per_agg <= 0:
            return nbytes / bw
        phy = self.ampdu / per_agg
        return math.ceil(nbytes / self.ampdu) * ovh + nbytes / phy

    def _pair(self, a: str, b: str) -> LinkSpec | None:
        return next((ln for ln in self.links if {ln.a, ln.b} == {a, b}), None)

    def link(self, a: str, b: str) -> tuple[float, float]:
        """(bandwidth bytes/s, one-way latency s) between two devices."""
        ln = self._pair(a, b)
        return (ln.bandwidth, ln.latency) if ln is not None else (self.bandwidth, self.latency)

    def burst(self, a: str, b: str) -> float:
        """Bytes a shaped link lets through at once after an idle spell (0: a plain rate)."""
        ln = self._pair(a, b)
        return ln.burst if ln is not None else 0.0

    def transfer_time(self, a: str, b: str, nbytes: float) -> float:
        """Time to move `nbytes` from a to b on an idle network (latency + size/bandwidth)."""
        if a == b:
            return 0.0
        bw, lat = self.link(a, b)
        return lat + nbytes / bw


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    devices: tuple[DeviceSpec, ...]
    network: NetworkSpec = field(default_factory=NetworkSpec)
    head: str = ""
    description: str = ""
    path: str = ""

    def __post_init__(self) -> None:
        if not self.devices:
            raise SpecError("a cluster needs at least one device", where=self.path or self.name,
                            fix="add a [[devices]] table")
        names = [d.name for d in self.devices]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise SpecError(f"duplicate device name(s) {sorted(dup)}", where=self.path or self.name,
                            fix="give every device a unique name")
        if not self.head:
            object.__setattr__(self, "head", names[0])
        elif self.head not in names:
            raise SpecError(f"head {self.head!r} is not a device", where=self.path or self.name,
                            fix=f"set head to one of {names}")
        for ln in self.network.links:
            for end in (ln.a, ln.b):
                if end not in names:
                    raise SpecError(f"link endpoint {end!r} is not a device", where=f"{self.path or self.name}: network.links",
                                    fix=f"use device names {names}")

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.devices]

    def device(self, name: str) -> DeviceSpec:
        for d in self.devices:
            if d.name == name:
                return d
        raise SpecError(f"no device named {name!r}", where=self.path or self.name, fix=f"use one of {self.names}")

    def head_first(self) -> ClusterSpec:
        """The same cluster with the head device listed first (rank 0)."""
        devs = sorted(self.devices, key=lambda d: d.name != self.head)
        return ClusterSpec(self.name, tuple(devs), self.network, self.head, self.description, self.path)

    def subset(self, names: list[str]) -> ClusterSpec:
        devs = tuple(self.device(n) for n in names)
        head = self.head if self.head in names else names[0]
        links = tuple(ln for ln in self.network.links if ln.a in names and ln.b in names)
        net = dataclasses.replace(self.network, links=links)
        return ClusterSpec(f"{self.name}[{','.join(names)}]", devs, net, head, self.description, self.path)

    def replace_device(self, dev: DeviceSpec) -> ClusterSpec:
        devs = tuple(dev if d.name == dev.name else d for d in self.devices)
        return ClusterSpec(self.name, devs, self.network, self.head, self.description, self.path)

    # ---------------------------------------------------------------- TOML
    def to_toml(self) -> dict[str, Any]:
        net: dict[str, Any] = {
            "kind": self.network.kind,
            "bandwidth_mbps": round(self.network.bandwidth / MBPS, 6),
            "latency_ms": round(self.network.latency / MS, 6),
            "jitter_ms": round(self.network.jitter / MS, 6),
        }
        if self.network.kind == "switched" and self.network.contention != "nic":
            net["contention"] = self.network.contention
        if self.network.kind == "wifi" and self.network.txop_overhead >= 0:
            net["txop_overhead_us"] = round(self.network.txop_overhead * 1e6, 6)
        if self.network.links:
            net["links"] = [{"a": ln.a, "b": ln.b, "bandwidth_mbps": round(ln.bandwidth / MBPS, 6),
                             "latency_ms": round(ln.latency / MS, 6),
                             **({"burst_kb": round(ln.burst / 1e3, 6)} if ln.burst > 0 else {})}
                            for ln in self.network.links]
        if self.network.sources:
            net["sources"] = dict(self.network.sources)
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["head"] = self.head
        out["network"] = net
        out["devices"] = [device_to_toml(d) for d in self.devices]
        return out

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, tomli_w.dumps(self.to_toml()))


def cluster_from_toml(raw: dict[str, Any], where: str, _chain: tuple[str, ...] = ()) -> ClusterSpec:
    if not isinstance(raw, dict):
        raise SpecError("expected a TOML document", where=where, fix="see data/clusters/prima-d1-d4.toml")
    known = {"name", "description", "head", "network", "devices", "base", "use"}
    extra = set(raw) - known
    if extra:
        raise SpecError(f"unknown top-level field(s) {sorted(extra)}", where=where, fix=f"use {sorted(known)}")
    if "base" in raw:
        return _derived_cluster(raw, where, _chain)
    devs_raw = raw.get("devices")
    if not isinstance(devs_raw, list) or not devs_raw:
        raise SpecError("missing [[devices]] tables", where=where, fix="add one [[devices]] table per device")
    devices = []
    for i, d in enumerate(devs_raw):
        label = d.get("name", "?") if isinstance(d, dict) else "?"
        devices.append(device_from_toml(d, f"{where}: devices[{i}] ({label})"))
    net_raw = raw.get("network", {})
    network = _network_from_toml(net_raw, f"{where}: network")
    name = raw.get("name") or Path(where).stem
    if not isinstance(name, str):
        raise SpecError("'name' must be a string", where=where, fix="name = \"my-cluster\"")
    return ClusterSpec(name=name, devices=tuple(devices), network=network, head=str(raw.get("head", "")),
                       description=str(raw.get("description", "")), path=where)


def _derived_cluster(raw: dict[str, Any], where: str, chain: tuple[str, ...]) -> ClusterSpec:
    """`base = "other-cluster"` + `use = [names]`: a subset of another cluster file's devices."""
    if not isinstance(raw["base"], str) or not raw["base"].strip():
        raise SpecError(f"'base' must name a cluster, got {raw['base']!r}", where=where, fix="base = \"prima-d1-d6\"")
    base_ref = str(raw["base"])
    rel = Path(where).parent / base_ref
    base = load_cluster(rel if rel.suffix == ".toml" and rel.exists() else base_ref, _chain=chain)
    use = raw.get("use", base.names)
    if not isinstance(use, list) or not all(isinstance(u, str) for u in use):
        raise SpecError("'use' must be a list of device names", where=where, fix=f"use = {base.names}")
    for u in use:
        if u not in base.names:
            raise SpecError(f"'use' names {u!r}, which {base_ref} does not have", where=where,
                            fix=f"pick from {base.names}")
    sub = base.subset(list(use))
    net = _network_from_toml(raw["network"], f"{where}: network") if "network" in raw else sub.network
    head = str(raw.get("head", base.head if base.head in use else use[0]))
    return ClusterSpec(name=str(raw.get("name", Path(where).stem)), devices=sub.devices, network=net,
                       head=head, description=str(raw.get("description", base.description)), path=where)


def _num(raw: dict[str, Any], key: str, default: float, where: str, positive: bool = False) -> float:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise SpecError(f"'{key}' must be a {'positive' if positive else 'non-negative'} number, got {v!r}",
                        where=where, fix=f"set {key} = <number>")
    return float(v)


def _network_from_toml(raw: Any, where: str) -> NetworkSpec:
    if not isinstance(raw, dict):
        raise SpecError("[network] must be a table", where=where, fix="see data/clusters/prima-d1-d4.toml")
    known = {"kind", "bandwidth_mbps", "latency_ms", "jitter_ms", "links", "sources", "contention", "txop_overhead_us"}
    extra = set(raw) - known
    if extra:
        raise SpecError(f"unknown field(s) {sorted(extra)}", where=where, fix=f"use {sorted(known)}")
    kind = raw.get("kind", "wifi")
    if kind not in ("wifi", "switched"):
        raise SpecError(f"'kind' must be wifi or switched, got {kind!r}", where=where, fix="kind = \"wifi\"")
    if not isinstance(raw.get("sources", {}), dict):
        raise SpecError("'sources' must be a table of strings", where=where, fix="[network.sources] key = \"...\"")
    if not isinstance(raw.get("links", []), list):
        raise SpecError("'links' must be an array of tables", where=where, fix="[[network.links]] a = ..., b = ...")
    links = []
    for i, ln in enumerate(raw.get("links", [])):
        w = f"{where}.links[{i}]"
        if not isinstance(ln, dict) or "a" not in ln or "b" not in ln:
            raise SpecError("a link needs 'a' and 'b' device names", where=w, fix="a = \"D1\", b = \"D2\"")
        links.append(LinkSpec(str(ln["a"]), str(ln["b"]),
                              _num(ln, "bandwidth_mbps", raw.get("bandwidth_mbps", 450), w, True) * MBPS,
                              _num(ln, "latency_ms", raw.get("latency_ms", 5), w) * MS,
                              _num(ln, "burst_kb", 0, w) * 1e3))
    contention = raw.get("contention", "nic")
    if contention not in ("nic", "pair"):
        raise SpecError(f"'contention' must be nic or pair, got {contention!r}", where=where,
                        fix="contention = \"nic\" (one NIC per device) or \"pair\" (a shaped link per pair)")
    ovh = _num(raw, "txop_overhead_us", -1e-6 * 1e6, where) if "txop_overhead_us" in raw else -1.0
    return NetworkSpec(kind=kind, bandwidth=_num(raw, "bandwidth_mbps", 450, where, True) * MBPS,
                       latency=_num(raw, "latency_ms", 5, where) * MS, jitter=_num(raw, "jitter_ms", 0, where) * MS,
                       links=tuple(links), sources={str(k): str(v) for k, v in raw.get("sources", {}).items()},
                       contention=contention, txop_overhead=ovh * 1e-6 if ovh >= 0 else -1.0)


def builtin_clusters() -> list[str]:
    names = sorted(p.stem for p in (data_dir() / "clusters").glob("*.toml"))
    return names + ["local"]


def load_cluster(ref: str | Path, *, _chain: tuple[str, ...] = ()) -> ClusterSpec:
    """A built-in cluster name, `local` (this machine), or a path to a cluster TOML file.
    `_chain`: the files whose `base` led here (a cycle of `base` references is an error)."""
    s = str(ref)
    if s == "local":
        return local_cluster()
    p = Path(s)
    if not p.exists() and not s.endswith(".toml"):
        cand = data_dir() / "clusters" / f"{s}.toml"
        if cand.exists():
            p = cand
        else:
            raise SpecError(f"unknown cluster {s!r}", where="--cluster",
                            fix=f"use a built-in name ({', '.join(builtin_clusters())}) or a path to a .toml file")
    if not p.exists():
        raise SpecError("file not found", where=str(p), fix="check the path of the cluster file")
    key = str(p.resolve())
    if key in _chain:
        raise SpecError(f"'base' references loop back to this file ({' -> '.join([*_chain, key])})", where=str(p),
                        fix="make 'base' name a cluster file that does not itself derive from this one")
    try:
        with open(p, "rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"not valid TOML ({exc})", where=str(p), fix="fix the TOML syntax") from None
    except UnicodeDecodeError:
        raise SpecError("not a text file", where=str(p), fix="give a TOML cluster file") from None
    except (ValueError, RecursionError) as exc:  # an integer of > 4300 digits; nesting deeper than ~1000
        raise SpecError(f"not a usable TOML file ({type(exc).__name__}: {str(exc)[:200]})", where=str(p),
                        fix="fix the TOML file (shorter numbers, less nesting)") from None
    except OSError as exc:  # a directory, no permission, ...
        raise SpecError(f"cannot read the cluster file ({exc.strerror})", where=str(p),
                        fix="give the path of a TOML cluster file") from None
    where = os.path.relpath(p) if p.is_absolute() and str(p).startswith(os.getcwd()) else str(p)
    return cluster_from_toml(raw, where, (*_chain, key))


# ==================================================================================== local
# `local`: this machine as a one-device cluster, from the cached `primasim profile` result.
#
# `primasim profile` (default --out) writes the cache file; `local` reads it. The cached figures are
# used only while they still describe this machine: the profile's sidecar records a key (host, CPU,
# cores, memory, memory limit, JAX version). A different machine or limits -> nominal figures
# again; a different JAX version -> the measured figures, marked stale. Available memory is always
# re-read at load time, as prima.cpp measures it at every start-up (it changes minute to minute).
# Without a usable profile the device gets nominal figures, marked as such in its sources.

# Figures used for what was not measured (a device without a profile; parts a profile skipped).
NOMINAL: dict[str, float] = {"ram_bw": 20 * GB, "cpu_f32": 50 * GFLOPS, "disk_seq": 1 * GB,
                             "disk_rnd": 0.3 * GB, "kv_copy": 0.002 * MS}

def profile_key() -> dict[str, Any]:
    """What a cached profile must match to describe this machine as it is now."""
    lim = read_limits()
    return {"host": platform.node(), "cpu": cpu_model(), "cores": effective_cores(lim),
            "mem_total": meminfo().get("MemTotal", 0), "mem_limit": lim.mem_limit or 0,
            "jax": library_versions().get("jax", "")}


def sidecar_path(toml_path: str | Path) -> Path:
    p = Path(toml_path)
    return p.with_name((p.name[:-5] if p.name.endswith(".toml") else p.name) + ".profile.json")


# keys of the profile key that identify the hardware (and its limits); the rest is software
_HARDWARE_KEYS = ("host", "cpu", "cores", "mem_total", "mem_limit")


def local_profile_path() -> str:
    return str(cache_dir() / "profiles" / "local.toml")


def _cached_key(path: str) -> dict[str, Any] | None:
    try:
        with open(sidecar_path(path)) as fh:
            key = json.load(fh)["provenance"]["key"]
        return key if isinstance(key, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def local_cluster() -> ClusterSpec:
    """This machine: the cached `primasim profile` result if it fits, else nominal figures."""
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
    mem = memory_info()
    if mem.total <= 0:
        return dev
    avail = min(mem.available, dev.ram_total)
    return dev.replace(ram_avail=avail, swap_avail=min(mem.swap_available, dev.swap_total),
                       sources={**dev.sources, "ram_avail_gib": mem.how + " (re-read when `local` was loaded)"})


def nominal_device(note: str) -> DeviceSpec:
    """This machine with measured memory and cores but nominal speeds (no profile yet)."""
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
