"""DeviceSpec, GPUSpec and EmulationSpec: every quantity prima.cpp's profiler and cost model use.

Internally SI (bytes, seconds, FLOP/s, bytes/s). In TOML files the keys carry human units in their
names (`ram_avail_gib`, `disk_seq_gbs`, `cpu_gflops`), and each value may have a provenance note
in the device's `[devices.sources]` table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import SpecError
from .units import GB, GFLOPS, MB, MS, GiB, KiB, MiB

OS = Literal["linux", "macos", "android"]
OSES = ("linux", "macos", "android")

# Fallback order when a FLOPS table lacks a dtype: quantised kernels dequantise to f32 on CPU in
# our runtime, so f32 is the honest default (documented in README "Device files").
_DTYPE_FALLBACK = {"q4k": "f32", "q5k": "q4k", "q6k": "q4k", "q8_0": "f32", "q4_0": "q4k",
                   "f16": "f32", "f32": "f32"}


def rate(table: dict[str, float], dtype: str) -> float:
    """FLOP/s for `dtype` from a per-dtype table, falling back along _DTYPE_FALLBACK."""
    seen = set()
    d = dtype
    while d not in table:
        if d in seen or d not in _DTYPE_FALLBACK:
            raise KeyError(dtype)
        seen.add(d)
        d = _DTYPE_FALLBACK[d]
    return table[d]


def _f(toml: str, unit: float = 1.0, *, help: str, default: Any = dataclasses.MISSING,
       required: bool = False) -> Any:
    meta = {"toml": toml, "unit": unit, "help": help, "required": required}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class GPUSpec:
    """A discrete (CUDA) or unified-memory (Metal) GPU."""

    kind: Literal["cuda", "metal"] = _f("kind", help="cuda or metal", required=True)
    vram_total: float = _f("vram_total_gib", GiB, help="total VRAM (Metal: recommended working set)", required=True)
    vram_avail: float = _f("vram_avail_gib", GiB, help="VRAM free for the model (d^avail,cuda / d^avail,metal)", required=True)
    flops: dict[str, float] = _f("gflops", GFLOPS, help="GPU FLOPS per weight dtype (f32, f16, q4k, q6k, q8_0, ...)", required=True)
    mem_bw: float = _f("mem_bw_gbs", GB, help="VRAM->register read bandwidth T^gpu", required=True)
    name: str = _f("name", help="model name of the GPU", default="")
    kv_copy: float = _f("kv_copy_ms", MS, help="time to copy one token's K,V of one layer into the cache", default=0.002 * MS)
    pcie_bw: float = _f("pcie_gbs", GB, help="host<->device copy bandwidth (ignored on UMA)", default=12.0 * GB)
    copy_latency: float = _f("copy_latency_ms", MS, help="fixed cost of one host<->device copy", default=0.02 * MS)
    compute_buffer: float = _f("compute_buffer_mib", MiB, help="extra reserve (llama.cpp: +700 MiB CUDA, +300 MiB Metal)", default=-1.0)
    gemm_flops: dict[str, float] = _f("gemm_gflops", GFLOPS, help="FLOPS per weight dtype of the batched matrix-matrix "
                                      "kernels a prompt runs on (tensor cores, MMQ tiles) when they beat the decode "
                                      "kernels' `gflops`; empty = gflops", default={})

    def __post_init__(self) -> None:
        if self.compute_buffer < 0:
            object.__setattr__(self, "compute_buffer", float((700 if self.kind == "cuda" else 300) * MiB))


@dataclass(frozen=True)
class EmulationSpec:
    """OS limits that turn a worker process on one Linux host into an emulated home device."""

    cpu_quota: float = _f("cpu_cores", help="CPU quota in cores (cfs_quota/cfs_period)", default=1.0)
    memory_limit: float = _f("memory_mib", MiB, help="memory cgroup limit (anon + page cache)", default=0.0)
    disk_read_bw: float = _f("disk_read_mbs", MB, help="blkio read throttle in MB/s (0 = none)", default=0.0)
    threads: int = _f("threads", help="compute threads for the worker (0 = ceil(cpu_cores))", default=0)
    cpu_period: float = _f("cpu_period_ms", MS, help="CFS period of the CPU quota: a short one (10 ms) makes the "
                           "quota a uniformly slower CPU; a long one (100 ms, the kernel's default) lets "
                           "bursts shorter than quota x period run at full speed", default=100 * MS)


@dataclass(frozen=True)
class DeviceSpec:
    """One device of a home cluster."""

    name: str = _f("name", help="unique device name", required=True)
    os: OS = _f("os", help="linux, macos or android (selects the page-cache model)", required=True)
    cores: int = _f("cores", help="CPU threads used for compute", required=True)
    ram_total: float = _f("ram_total_gib", GiB, help="physical RAM", required=True)
    ram_avail: float = _f("ram_avail_gib", GiB, help="RAM available to the model (d^avail)", required=True)
    ram_bw: float = _f("ram_bw_gbs", GB, help="RAM->register read bandwidth T^cpu", required=True)
    cpu_flops: dict[str, float] = _f("cpu_gflops", GFLOPS, help="CPU FLOPS per weight dtype (needs f32)", required=True)
    disk_seq: float = _f("disk_seq_gbs", GB, help="sequential read throughput (Linux mmap readahead)", required=True)
    disk_rnd: float = _f("disk_rnd_gbs", GB, help="random 4 KiB read throughput (macOS page-ins)", default=-1.0)
    disk_burst: float = _f("disk_burst_mib", MiB, help="a rate-limited disk's slice allowance (blkio throttle): after "
                           "an idle spell this many bytes go at disk_peak, then reads wait for the next slice of "
                           "disk_burst / disk_seq seconds; 0 = a plain rate", default=0.0)
    disk_peak: float = _f("disk_peak_gbs", GB, help="read throughput within the slice allowance (the disk's own "
                          "speed; 0 = disk_seq)", default=0.0)
    read_ahead: float = _f("read_ahead_kib", KiB, help="the disk's readahead window (Linux queue/read_ahead_kb): a "
                           "page fault on a mapping with the default advice reads this many bytes around the "
                           "faulting page, half of them behind it, and a sequential scan keeps as many read ahead "
                           "(mm/filemap.c, mm/readahead.c); 0 = not modelled (faults read what compute uses)",
                           default=0.0)
    hardware: str = _f("hardware", help="what the device is", default="")
    uma: bool = _f("uma", help="unified memory (no RAM<->VRAM copies)", default=False)
    swap_total: float = _f("swap_total_gib", GiB, help="swap size", default=0.0)
    swap_avail: float = _f("swap_avail_gib", GiB, help="free swap", default=0.0)
    can_swap: float = _f("can_swap_gib", GiB, help="Android: other apps' pages that can be swapped out (d^bytes_can_swap)", default=0.0)
    # -- what the OS does under memory pressure (the simulator's page cache, primasim/sim/_pagecache.py)
    avail_fraction: float = _f("avail_reported_fraction", help="ram_avail_gib as a fraction of the memory the OS can "
                               "really give the model's page cache (prima.cpp's profiler reports MemAvailable x 0.8 "
                               "on Linux and Termux, common/profiler.cpp); 1 = ram_avail is all of it", default=1.0)
    anon_other: float = _f("anon_other_gib", GiB, help="other processes' anonymous memory: counts in Linux's workingset "
                           "size while swap has room, and is what swap, zram or the compressor can take; -1 = 75 % "
                           "of the RAM the OS does not have available", default=-1.0)
    idle_anon: float = _f("idle_anon_fraction", help="fraction of anon_other that is idle and goes to swap, zram or the "
                          "compressor under pressure", default=0.5)
    compress_ratio: float = _f("compress_ratio", help="swap in RAM (Android's zram): a page swapped out frees 1 - 1/ratio of "
                               "its RAM; 0 = swap on a disk (frees it all)", default=0.0)
    lmk_cached: float = _f("lmk_cached_gib", GiB, help="Android: cached background apps' memory that lmkd kills "
                           "before the foreground app's page cache is dropped", default=0.0)
    kv_copy: float = _f("kv_copy_ms", MS, help="CPU time to append one token's K,V to one layer's cache", default=0.002 * MS)
    gemm_bw: float = _f("gemm_bw_gbs", GB, help="weight-streaming rate of the engine's matrix-matrix kernel (several "
                        "rows: prefill, batched decode) when it differs from its matrix-vector one at one token "
                        "(ram_bw); 0 = ram_bw", default=0.0)
    gemm_bw_rows: dict[str, float] = _f("gemm_bw_rows_gbs", GB, help="gemm_bw per number of rows (tokens per call) "
                                        "where measured, e.g. { 2 = 3.8, 4 = 4.1, 16 = 4.3 }: XLA's small-M "
                                        "matrix products are far from one roofline; rows in between interpolate, "
                                        "others use the nearest; empty = gemm_bw", default={})
    call_overhead: float = _f("call_overhead_ms", MS, help="fixed cost of one compute call of the engine (dispatch, "
                              "Python, result copy), per window or per streamed layer; 0 = none (llama.cpp's "
                              "graph runs are folded into the FLOPS)", default=0.0)
    alloc_bw: float = _f("alloc_gbs", GB, help="first-touch rate of fresh anonymous memory (allocate + zero-fill, "
                         "page faults): an engine that allocates its KV cache lazily pays it on the first "
                         "token; 0 = free (llama.cpp allocates at start-up)", default=0.0)
    gpu: GPUSpec | None = _f("gpu", help="[devices.gpu] table, if the device has a usable GPU", default=None)
    address: str | None = _f("address", help="tcp://host:port of `primasim worker` on a real device", default=None)
    emulate: EmulationSpec | None = _f("emulate", help="[devices.emulate] limits for an emulated device", default=None)
    sources: dict[str, str] = _f("sources", help="provenance of each figure", default={})

    def __post_init__(self) -> None:
        if self.disk_rnd < 0:
            object.__setattr__(self, "disk_rnd", self.disk_seq)
        if not 0 < self.avail_fraction <= 1:
            raise SpecError(f"avail_reported_fraction must be in (0, 1], got {self.avail_fraction}",
                            where=f"device {self.name}", fix="use 0.8 for prima.cpp's profiler figures, 1 otherwise")
        if not 0 <= self.idle_anon <= 1:
            raise SpecError(f"idle_anon_fraction must be in [0, 1], got {self.idle_anon}", where=f"device {self.name}",
                            fix="use e.g. 0.5")
        if 0 < self.compress_ratio < 1:
            raise SpecError(f"compress_ratio must be 0 or >= 1, got {self.compress_ratio}", where=f"device {self.name}",
                            fix="use e.g. 2.5 for zram, 0 for a swap disk")
        for k in self.gemm_bw_rows:
            if not k.isdigit() or int(k) < 2:
                raise SpecError(f"gemm_bw_rows_gbs key {k!r} is not a number of rows >= 2", where=f"device {self.name}",
                                fix="key the table by tokens per call, e.g. { 2 = 3.8, 16 = 4.3 }")

    def gemm_bw_at(self, rows: int) -> float:
        """The matrix-matrix weight-streaming rate for calls of `rows` tokens (see gemm_bw_rows)."""
        if not self.gemm_bw_rows:
            return self.gemm_bw
        pts = sorted((int(k), v) for k, v in self.gemm_bw_rows.items())
        if rows <= pts[0][0]:
            return pts[0][1]
        for (a, va), (b, vb) in zip(pts, pts[1:], strict=False):
            if rows <= b:
                return va + (vb - va) * (rows - a) / (b - a)
        return pts[-1][1]

    # -- derived quantities the cost model and simulator use
    @property
    def has_gpu(self) -> bool:
        return self.gpu is not None

    @property
    def has_metal(self) -> bool:
        return self.gpu is not None and self.gpu.kind == "metal"

    @property
    def has_cuda(self) -> bool:
        return self.gpu is not None and self.gpu.kind == "cuda"

    @property
    def disk_speed(self) -> float:
        """s^disk as prima.cpp uses it: sequential on Linux, random elsewhere."""
        return self.disk_seq if self.os == "linux" else self.disk_rnd

    @property
    def mem_budget(self) -> float:
        """The memory Halda's initial split is proportional to (prima.cpp mem_budget)."""
        if self.has_metal:
            assert self.gpu is not None
            return self.gpu.vram_avail
        if self.os == "android":
            return self.ram_avail + min(self.can_swap, self.swap_avail)
        return self.ram_avail

    @property
    def page_io(self) -> float:
        """Bytes of one random page-in: a 16 KiB page on Apple Silicon, 4 KiB elsewhere (prima.cpp's
        profiler runs fio's random test at the page size, common/profiler.cpp)."""
        return 16 * 1024.0 if (self.os == "macos" and self.uma) else 4096.0

    @property
    def io_latency(self) -> float:
        """Seconds one random read takes at queue depth 1, from the random-read figure: prima.cpp's
        fio test runs `cores` jobs of iodepth 1, so disk_rnd = cores x io / (latency + io / disk_seq)."""
        io = self.page_io
        return max(0.0, self.cores * io / self.disk_rnd - io / self.disk_seq)

    def random_read_rate(self, io_bytes: float, depth: int) -> float:
        """Throughput of random reads of `io_bytes` with `depth` in flight: each read pays the
        per-I/O latency, `depth` of them overlap, and the disk's sequential rate bounds the sum."""
        per = self.io_latency + io_bytes / self.disk_seq
        return min(self.disk_seq, depth * io_bytes / per) if per > 0 else self.disk_seq

    @property
    def os_avail(self) -> float:
        """Memory the OS can give the model (MemAvailable), of which ram_avail is the reported part."""
        return self.ram_avail / self.avail_fraction

    @property
    def anon_other_bytes(self) -> float:
        if self.anon_other >= 0:
            return self.anon_other
        return 0.75 * max(0.0, self.ram_total - self.os_avail)

    @property
    def os_swappable(self) -> float:
        """Bytes of other processes' memory the OS frees before (Android, macOS) or instead of
        (Linux, for a refaulting workingset) dropping the model's page cache."""
        idle = self.idle_anon * self.anon_other_bytes
        if self.os == "macos":
            # the compressor squeezes idle pages and swaps its compressed segments out to swap files
            # that grow on demand (dynamic_pager): swap_avail does not bound what can leave RAM. With
            # Metal, macOS keeps a GPU working set up to MTLDevice.recommendedMaxWorkingSetSize
            # resident ("the memory this device can use with good performance"), squeezing other
            # processes as far as that takes
            metal = self.gpu.vram_total - self.os_avail if (self.gpu is not None and self.gpu.kind == "metal") else 0.0
            return max(idle, metal)
        freed = 1.0 - 1.0 / self.compress_ratio if self.compress_ratio >= 1 else 1.0  # zram keeps 1/ratio in RAM
        return min(self.swap_avail, idle) * freed + (self.lmk_cached if self.os == "android" else 0.0)

    def cpu_rate(self, dtype: str) -> float:
        return rate(self.cpu_flops, dtype)

    def gpu_rate(self, dtype: str) -> float:
        assert self.gpu is not None
        return rate(self.gpu.flops, dtype)

    def replace(self, **changes: Any) -> DeviceSpec:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------- TOML <-> dataclass
def _convert(cls: type, raw: dict[str, Any], where: str) -> Any:
    """Build a spec dataclass from a TOML table, with errors naming file, field and fix."""
    if not isinstance(raw, dict):
        raise SpecError(f"expected a table, got {type(raw).__name__}", where=where, fix="see data/clusters/*.toml")
    kwargs: dict[str, Any] = {}
    known = set()
    for f in dataclasses.fields(cls):
        key, unit = f.metadata["toml"], f.metadata["unit"]
        known.add(key)
        if key not in raw:
            if f.metadata["required"]:
                raise SpecError(f"missing field '{key}'", where=where, fix=f"add {key} = ... ({f.metadata['help']})")
            continue
        v = raw[key]
        if key == "gpu":
            kwargs[f.name] = _convert(GPUSpec, v, f"{where}.gpu")
        elif key == "emulate":
            kwargs[f.name] = _convert(EmulationSpec, v, f"{where}.emulate")
        elif key == "sources":
            if not isinstance(v, dict):
                raise SpecError("'sources' must be a table of strings", where=where, fix="[devices.sources] field = \"...\"")
            kwargs[f.name] = {str(k): str(s) for k, s in v.items()}
        elif isinstance(f.default, dict) or f.type in ("dict[str, float]",) or key.endswith("gflops"):
            if not isinstance(v, dict) or not v:
                raise SpecError(f"'{key}' must be a table like {{ f32 = 100.0, q4k = 80.0 }}", where=where,
                                fix=f"write {key} = {{ f32 = <GFLOPS> }}")
            table = {}
            for dt, x in v.items():
                table[str(dt)] = _number(x, f"{key}.{dt}", where, positive=True) * unit
            if key.endswith("gflops") and "f32" not in table:
                raise SpecError(f"'{key}' has no f32 entry", where=where, fix=f"add f32 = <GFLOPS> to {key}")
            kwargs[f.name] = table
        elif f.type in ("str", "str | None") or key in ("name", "hardware", "address", "kind", "os"):
            if not isinstance(v, str) or (key == "name" and not v.strip()):
                raise SpecError(f"'{key}' must be a non-empty string, got {v!r}", where=where, fix=f"set {key} = \"...\"")
            kwargs[f.name] = v
        elif f.type == "bool":
            if not isinstance(v, bool):
                raise SpecError(f"'{key}' must be true or false, got {v!r}", where=where, fix=f"set {key} = true|false")
            kwargs[f.name] = v
        elif f.type == "int":
            x = _number(v, key, where, positive=key == "cores")
            if int(x) != x:
                raise SpecError(f"'{key}' must be an integer, got {v!r}", where=where, fix=f"set {key} to a whole number")
            kwargs[f.name] = int(x)
        else:
            kwargs[f.name] = _number(v, key, where) * unit
    extra = set(raw) - known
    if extra:
        raise SpecError(f"unknown field(s) {sorted(extra)}", where=where,
                        fix=f"remove them or use one of {sorted(known)}")
    if cls is DeviceSpec and kwargs.get("os") not in OSES:
        raise SpecError(f"'os' must be one of {OSES}, got {kwargs.get('os')!r}", where=where, fix="set os = \"linux\"")
    if cls is GPUSpec and kwargs.get("kind") not in ("cuda", "metal"):
        raise SpecError(f"gpu 'kind' must be cuda or metal, got {kwargs.get('kind')!r}", where=where,
                        fix="set kind = \"cuda\" or \"metal\"")
    obj = cls(**kwargs)
    if cls is DeviceSpec and obj.ram_avail > obj.ram_total * 1.0001:
        raise SpecError(f"ram_avail_gib ({obj.ram_avail / GiB:.2f}) exceeds ram_total_gib ({obj.ram_total / GiB:.2f})",
                        where=where, fix="available RAM cannot exceed physical RAM")
    if cls is GPUSpec and obj.vram_avail > obj.vram_total * 1.0001:
        raise SpecError("vram_avail_gib exceeds vram_total_gib", where=where, fix="lower vram_avail_gib")
    return obj


def _number(v: Any, key: str, where: str, *, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise SpecError(f"'{key}' must be a number, got {v!r}", where=where, fix=f"set {key} to a number")
    if v < 0 or (positive and v == 0):
        raise SpecError(f"'{key}' must be {'positive' if positive else 'non-negative'}, got {v!r}", where=where,
                        fix=f"give {key} a {'positive' if positive else 'non-negative'} value")
    if v != v or v in (float("inf"), float("-inf")):
        raise SpecError(f"'{key}' must be finite", where=where, fix=f"set {key} to a finite number")
    return float(v)


def _to_toml(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        key, unit = f.metadata["toml"], f.metadata["unit"]
        v = getattr(obj, f.name)
        if v is None or (isinstance(f.default, float) and f.default < 0 and v == f.default):
            continue  # absent, or a "derive it" sentinel
        if dataclasses.is_dataclass(v):
            out[key] = _to_toml(v)
        elif key == "sources":
            if v:
                out[key] = dict(v)
        elif isinstance(v, dict):
            if v:
                out[key] = {k: round(x / unit, 6) for k, x in v.items()}
        elif isinstance(v, bool | str) or (isinstance(v, int) and unit == 1):
            out[key] = v
        else:
            out[key] = round(v / unit, 9)
    return out


def device_from_toml(raw: dict[str, Any], where: str) -> DeviceSpec:
    return _convert(DeviceSpec, raw, where)


def device_to_toml(dev: DeviceSpec) -> dict[str, Any]:
    return _to_toml(dev)


def field_help(cls: type = DeviceSpec) -> list[tuple[str, str]]:
    """(TOML key, help) for every field: the file format's reference."""
    return [(f.metadata["toml"], f.metadata["help"]) for f in dataclasses.fields(cls)]
