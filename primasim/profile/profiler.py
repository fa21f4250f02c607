"""The device profiler: measures every DeviceSpec quantity the cost model and the simulator use.

What it measures, and how (prima.cpp's `llama_profile_device` is the model; see
../shared/reference/prima-cpp.md §4 for its choices and README "Device profiles" for ours), one
module per part: compute and KV copy (compute.py), memory bandwidth (memory.py), disk (disk.py),
network (link.py); memory available and cores from the OS (primasim/core/procfs.py: prima.cpp's
formulas per OS, Linux MemAvailable x 0.8 or a memory cgroup's room; CPU affinity capped by a
cgroup CPU quota).

Every repeated measurement keeps its samples; the file records median and spread, and the device's
`[devices.sources]` records how each figure was obtained plus the provenance (library versions,
threads, limits seen, date, command). Full detail goes to a sidecar JSON next to the TOML.

Entry points: `profile_device(...) -> DeviceSpec`, `run_profile(ProfileConfig) -> Profile`, and
`python -m primasim.profile.profiler --out FILE --name NAME [--quick] [...]` (runnable inside a cgroup and a
network namespace by the emulation code), `python -m primasim.profile.profiler --echo ADDR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from primasim.core.cluster import NOMINAL, ClusterSpec, NetworkSpec, profile_key, sidecar_path
from primasim.core.device import DeviceSpec, device_to_toml
from primasim.core.errors import PrimasimError, SpecError
from primasim.core.io import atomic_write_text
from primasim.core.model_sources import load_model
from primasim.core.paths import cache_dir
from primasim.core.procfs import (
    cpu_model,
    device_os,
    effective_cores,
    library_versions,
    llc_bytes,
    memory_info,
    read_limits,
)
from primasim.core.units import GiB, MiB

from .compute import LayerShapes, measure_compute, measure_kv_copy
from .disk import measure_disk
from .link import LinkMeasurement, check_addr, measure_link, serve_echo
from .measurement import Measurement
from .memory import measure_ram_bw

PARTS = ("compute", "memory", "disk", "kv", "network")
DEFAULT_MODEL = "llama-mini-300m"

Progress = Callable[[str, float], None]  # (what is being measured, fraction of the profile done)


# =============================================================================== the profile
@dataclass(frozen=True)
class ProfileConfig:
    """What `primasim profile` measures and how hard it tries."""

    name: str = field(default="", metadata={"help": "device name (default: host name)"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "ModelSpec whose block shapes the matmuls use"})
    quick: bool = field(default=False, metadata={"help": "a few seconds instead of ~15 (tests, validate)"})
    parts: tuple[str, ...] = field(default=PARTS, metadata={"help": "what to measure (others: nominal figures)"})
    peer: str | None = field(default=None, metadata={"help": "tcp://HOST:PORT of an echo peer for the network"})
    peer_timeout: float = field(default=3.0, metadata={"help": "seconds to wait for the peer"})
    disk_dir: str | None = field(default=None, metadata={"help": "directory on the checkpoints' disk (default: cache dir)"})
    threads: int = field(default=0, metadata={"help": "threads for the memory/disk probes (0 = cores)"})
    ws_bytes: int = field(default=0, metadata={"help": "working set for the DRAM probes (0 = auto: >> LLC)"})
    disk_file: int = field(default=0, metadata={"help": "disk probe file size (0 = 1 GiB, quick 256 MiB)"})
    disk_seconds: float = field(default=0.0, metadata={"help": "seconds per disk run (0 = 1.0, quick 0.25)"})
    prefill_tokens: int = field(default=128, metadata={"help": "rows of the GEMM (prefill) probe"})
    kv_ctx: int = field(default=0, metadata={"help": "context length of the KV-copy probe (0 = model's, <= 2048)"})
    command: str = field(default="", metadata={"help": "command line recorded in the provenance"})

    def __post_init__(self) -> None:
        bad = [p for p in self.parts if p not in PARTS]
        if bad:
            raise SpecError(f"unknown part(s) {bad}", where="--only", fix=f"use a comma list of {', '.join(PARTS)}")


@dataclass
class Profile:
    """A profile: the DeviceSpec, the link (if measured), every measurement with its samples."""

    device: DeviceSpec
    measurements: dict[str, Measurement]
    provenance: dict[str, Any]
    link: LinkMeasurement | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def cluster(self, name: str | None = None) -> ClusterSpec:
        net = self.link.network_spec() if self.link else NetworkSpec(
            kind="switched", sources={"*": "not measured: run `primasim profile --peer tcp://HOST:PORT`"})
        return ClusterSpec(name or self.device.name, (self.device,), net,
                           description=f"measured by `primasim profile` on {self.provenance['date']}")

    def to_json(self) -> dict[str, Any]:
        return {"device": device_to_toml(self.device),
                "network": self.cluster().to_toml()["network"],
                "measurements": {k: m.to_json() for k, m in self.measurements.items()},
                "link": ({"peer": self.link.peer, "payload": self.link.payload, "jitter": self.link.jitter}
                         if self.link else None),
                "provenance": self.provenance, "info": self.info}

    def save(self, path: str | Path, cluster_name: str | None = None) -> Path:
        """Write the cluster TOML (one device) and its sidecar JSON; return the sidecar path."""
        p = Path(path)
        side = sidecar_path(p)
        dev = self.device.replace(sources={**self.device.sources, "profile.sidecar": side.name})
        prof = dataclasses.replace(self, device=dev)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        try:
            prof.cluster(cluster_name).save(tmp)
            atomic_write_text(side, json.dumps(prof.to_json(), indent=2) + "\n")
            os.replace(tmp, p)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SpecError(f"cannot write the profile ({exc.strerror})", where=str(p),
                            fix="choose a writable --out path") from None
        self.device = dev
        return side


def check_writable(path: str | Path) -> Path:
    """Fail fast (before measuring for 20 s) if `path` cannot be written."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise SpecError("is a directory", where=str(p), fix="give a file name, e.g. --out my-device.toml")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        probe = p.with_name(f".{p.name}.{os.getpid()}.probe")
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SpecError(f"cannot write here ({exc.strerror})", where=str(p),
                        fix="choose a writable --out path") from None
    return p


def _auto_ws(ram_avail: float, quick: bool) -> int:
    """Working set for the DRAM probes: well past the LLC, within a quarter of free memory."""
    llc = llc_bytes()
    want = 256 * MiB if quick else min(max(512 * MiB, 2 * llc), GiB)
    return int(max(64 * MiB, min(want, 0.25 * ram_avail)))


def run_profile(config: ProfileConfig | None = None, progress: Progress | None = None) -> Profile:
    """Measure this device (or the emulated device whose limits this process runs under)."""

    cfg = config or ProfileConfig()
    t_start = time.perf_counter()
    steps = ["system"] + [p for p in cfg.parts if p != "network" or cfg.peer]
    done = [0]
    timings: dict[str, float] = {}  # seconds per measurement step (in the provenance)
    last = [time.perf_counter(), ""]

    def stage(msg: str) -> None:
        now = time.perf_counter()
        if last[1]:
            timings[str(last[1])] = timings.get(str(last[1]), 0.0) + now - float(last[0])
        last[0], last[1] = now, msg.split(":")[0]
        if progress:
            progress(msg, done[0] / len(steps))

    def finished() -> None:
        stage("")
        done[0] += 1
        if progress:
            progress("", done[0] / len(steps))

    model = load_model(cfg.model)
    if cfg.peer and "network" in cfg.parts:
        check_addr(cfg.peer, bind=False)

    stage("system: cores, memory, limits")
    limits = read_limits()
    cores = effective_cores(limits)
    threads = cfg.threads or cores
    mem = memory_info(limits)
    osname = device_os()
    finished()

    meas: dict[str, Measurement] = {}
    sources: dict[str, str] = {}
    info: dict[str, Any] = {"model": model.name, "limits": dataclasses.asdict(limits), "llc_bytes": llc_bytes(),
                            "memory": dataclasses.asdict(mem), "threads": threads}
    ws = cfg.ws_bytes or _auto_ws(mem.available, cfg.quick)
    repeats = 3 if cfg.quick else 5
    # Samples long enough to average out a shared machine and, under a CPU quota, several CFS
    # periods (a short sample sees either full speed or a throttled pause, never the average).
    min_s = 0.02 if cfg.quick else 0.05
    if limits.cpu_quota:
        min_s = max(min_s, 2.0 * (limits.cpu_period or 0.1))
    info["min_sample_seconds"] = min_s
    link: LinkMeasurement | None = None

    if "network" in cfg.parts and cfg.peer:  # first: an unreachable peer fails in seconds, not after 20 s
        stage(f"network: latency and bandwidth to {cfg.peer}")
        link = measure_link(cfg.peer, timeout=cfg.peer_timeout, quick=cfg.quick)
        meas["net_latency"] = link.latency
        meas["net_bandwidth"] = link.bandwidth
        finished()
    if "memory" in cfg.parts:
        stage("memory: read bandwidth")
        meas["ram_bw"] = measure_ram_bw(ws, threads, repeats=repeats + 2, min_seconds=min_s)
        finished()
    if "compute" in cfg.parts:
        meas.update(measure_compute(model, ws_bytes=ws, repeats=repeats, prefill_tokens=cfg.prefill_tokens,
                                    native_f16=not cfg.quick, min_seconds=min_s, progress=stage))
        finished()
        if "gemv_cold" in meas:  # per-block times of this model: what a per-device calibration needs
            flops = 2.0 * LayerShapes.of(model).params
            info["block"] = {"model": model.name, "params": LayerShapes.of(model).params,
                             "decode_s": flops / meas["gemv_cold"].value,
                             "decode_hot_s": flops / meas["gemv_hot"].value,
                             "prefill_s_per_token": flops / meas["gemm"].value}
    if "kv" in cfg.parts:
        stage("kv: KV-cache append")
        n_ctx = cfg.kv_ctx or min(model.max_context, 2048)
        meas["kv_copy"] = measure_kv_copy(model, n_ctx=n_ctx, repeats=repeats, min_seconds=min_s)
        finished()
    if "disk" in cfg.parts:
        res = measure_disk(cfg.disk_dir or (cache_dir() / "profile"),
                           file_size=cfg.disk_file or ((256 if cfg.quick else 1024) * MiB),
                           seconds=cfg.disk_seconds or (0.25 if cfg.quick else 1.0),
                           repeats=2 if cfg.quick else 3, jobs=threads, progress=stage)
        meas["disk_seq"], meas["disk_rnd"] = res.seq, res.rnd
        info["disk"] = {"file": res.file, "direct": res.direct,
                        "device": dataclasses.asdict(res.device) if res.device else None}
        finished()

    def pick(key: str, nominal: str, field_key: str) -> float:
        if key in meas:
            sources[field_key] = f"measured: {meas[key].describe()}; {meas[key].how}"
            return meas[key].value
        sources[field_key] = "not measured (nominal figure): run `primasim profile` with this part"
        return NOMINAL[nominal]

    ram_bw = pick("ram_bw", "ram_bw", "ram_bw_gbs")
    f32 = pick("gemm", "cpu_f32", "cpu_gflops")
    if "gemm" in meas:
        sources["cpu_gflops"] += ("; only f32 is listed: the runtime dequantises f16/q8_0/q4k weights to f32, "
                                  "so every dtype falls back to this rate")
        for k in ("gemv_hot", "gemv_cold", "gemv_cold_bw", "nxn", "gemm_f16_native"):
            if k in meas:
                sources[f"cpu_gflops.{k}"] = f"{meas[k].describe()}; {meas[k].how}"
    disk_seq = pick("disk_seq", "disk_seq", "disk_seq_gbs")
    disk_rnd = pick("disk_rnd", "disk_rnd", "disk_rnd_gbs")
    kv = pick("kv_copy", "kv_copy", "kv_copy_ms")
    sources["cores"] = (f"{cores}: CPU affinity {limits.cpu_affinity}"
                        + (f", cgroup CPU quota {limits.cpu_quota:.2f} cores" if limits.cpu_quota else ""))
    sources["ram_avail_gib"] = mem.how
    sources["ram_total_gib"] = ("memory cgroup limit" if limits.mem_limit and mem.total == limits.mem_limit
                                else "MemTotal (/proc/meminfo)" if osname != "macos" else "sysctl hw.memsize")
    sources["swap_total_gib"] = "SwapTotal/SwapFree" + (" capped by memory.memsw limit" if limits.memsw_limit else "")

    versions = library_versions()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    prov = {"date": date, "command": cfg.command or "primasim.profile.profiler.run_profile()", "versions": versions,
            "threads": threads, "cores": cores, "limits": limits.describe(), "host": platform.node(),
            "cpu": cpu_model(), "os": f"{platform.system()} {platform.release()}",
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "quick": cfg.quick, "parts": list(cfg.parts),
            "model": model.name, "working_set_bytes": ws, "key": profile_key(),
            "seconds": round(time.perf_counter() - t_start, 2),
            "stage_seconds": {k: round(v, 2) for k, v in timings.items() if k}}
    sources["profile"] = (f"`{prov['command']}` on {date}; " + ", ".join(f"{k} {v}" for k, v in versions.items())
                          + f"; {threads} thread(s); XLA_FLAGS={prov['xla_flags'] or '(unset)'}")
    sources["profile.limits"] = limits.describe()

    hw = f"{cpu_model()}, {cores} core(s), {mem.total / GiB:.1f} GiB"
    if limits.mem_limit or limits.cpu_quota or limits.blkio_read_bps:
        hw += f" (limits: {limits.describe()})"
    dev = DeviceSpec(
        name=cfg.name or platform.node() or "local", os=osname, cores=cores,  # type: ignore[arg-type]
        ram_total=mem.total, ram_avail=min(mem.available, mem.total), ram_bw=ram_bw, cpu_flops={"f32": f32},
        disk_seq=disk_seq, disk_rnd=disk_rnd, hardware=hw,
        uma=osname == "macos" and platform.machine() == "arm64",
        swap_total=mem.swap_total, swap_avail=min(mem.swap_available, mem.swap_total), kv_copy=kv,
        sources=sources)
    if progress:
        progress("done", 1.0)
    return Profile(dev, meas, prov, link, info)


def profile_device(name: str = "", *, model: str = DEFAULT_MODEL, quick: bool = False,
                   progress: Progress | None = None, **options: Any) -> DeviceSpec:
    """Measure this device and return its DeviceSpec (see ProfileConfig for the options)."""
    return run_profile(ProfileConfig(name=name, model=model, quick=quick, **options), progress).device


# =============================================================================== entry points
def add_arguments(p: argparse.ArgumentParser, *, default_out: str | None) -> None:
    """Options shared by `primasim profile` and `python -m primasim.profile.profiler`."""
    p.add_argument("--out", default=default_out, metavar="FILE",
                   help="cluster TOML to write (one device) + FILE.profile.json with every sample"
                   + (f" (default: {default_out}, what the `local` cluster reads)" if default_out else ""))
    p.add_argument("--name", default="", help="device name (default: host name)")
    p.add_argument("--quick", action="store_true", help="a few seconds instead of ~15: fewer, shorter repeats")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model whose block shapes the matmuls use "
                   f"(default {DEFAULT_MODEL})")
    p.add_argument("--peer", metavar="ADDR", help="tcp://HOST:PORT of a peer running "
                   "`python -m primasim.profile.profiler --echo tcp://*:PORT`: measure latency and bandwidth to it")
    p.add_argument("--peer-timeout", type=float, default=3.0, metavar="S", help="seconds to wait for the peer")
    p.add_argument("--only", default=",".join(PARTS), metavar="PARTS",
                   help=f"comma list of parts to measure ({','.join(PARTS)}), or none (cores and memory only, "
                   "always measured); the others get nominal figures")
    p.add_argument("--disk-dir", metavar="DIR", help="directory on the disk that holds the checkpoints "
                   "(default: the primasim cache dir)")
    p.add_argument("--threads", type=int, default=0, help="threads for the memory and disk probes (default: cores)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")


def config_from_args(args: argparse.Namespace, command: str) -> ProfileConfig:
    parts = tuple(s.strip() for s in args.only.split(",") if s.strip() and s.strip() != "none")
    if args.threads < 0:
        raise SpecError(f"--threads must be >= 0, got {args.threads}", where="--threads", fix="give 0 (auto) or more")
    return ProfileConfig(name=args.name, model=args.model, quick=args.quick, parts=parts, peer=args.peer,
                         peer_timeout=args.peer_timeout, disk_dir=args.disk_dir, threads=args.threads,
                         command=command)


def main(argv: list[str] | None = None) -> int:
    """`python -m primasim.profile.profiler --out FILE --name NAME [...]` or `--echo ADDR`."""
    p = argparse.ArgumentParser(prog="python -m primasim.profile.profiler",
                                description="Profile this device (inside whatever cgroup / netns it runs in) "
                                "and write a one-device cluster TOML; or serve as an echo peer.")
    add_arguments(p, default_out=None)
    p.add_argument("--echo", metavar="ADDR", help="serve as the network peer on ADDR (e.g. tcp://*:5599) instead")
    p.add_argument("--echo-idle", type=float, metavar="S", help="with --echo: exit after S seconds without messages")
    args = p.parse_args(argv)
    argv_s = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        if args.echo:
            serve_echo(args.echo, idle_timeout=args.echo_idle)
            return 0
        if not args.out:
            p.error("--out FILE is required (or --echo ADDR)")
        out = check_writable(args.out)
        cfg = config_from_args(args, f"python -m primasim.profile.profiler {argv_s}")

        def progress(msg: str, frac: float) -> None:
            if msg:
                print(f"[{frac * 100:3.0f}%] {msg}", file=sys.stderr, flush=True)

        prof = run_profile(cfg, progress)
        prof.save(out)
        if args.json:
            print(json.dumps(prof.to_json(), indent=2))
        else:
            print(f"wrote {out}", flush=True)
        return 0
    except PrimasimError as exc:
        print(f"primasim profile: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("primasim profile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
