"""The fitted constants: every number the simulator takes from a paper's result rather than a spec
sheet, with the cells it was fitted on, its prior (the value a spec sheet or the literature gives
without fitting) and the device figures it sets.

Nothing else is fitted. `primasim reproduce` marks a row in-sample when its cell is one a constant
was fitted on and reports the errors of the two groups apart; `experiments/calibrate.py` re-fits
every constant on its cells (after a model change) and checks the data files agree;
`experiments/out_of_sample.py` fits on some figures and predicts the others.

Device figures are bound to a constant as `peak x efficiency`: an engine efficiency fitted on one
device (llama.cpp's CPU decode on D3) carries to every device of the same class through its own
spec-sheet peak (D2, the Fig. 10 PC and laptop, the Fig. 2 CPUs), so a fit on one figure predicts
the others.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from primasim.core.cluster import ClusterSpec
from primasim.core.device import DeviceSpec
from primasim.core.units import GB, GFLOPS

Cell = tuple[str, str, str, str, str]  # (reproduce target, case, system, metric, device)


@dataclass(frozen=True)
class Binding:
    """One device figure set by a constant: `field` = `peak` x value (FLOPS tables scale as a whole,
    keeping the file's ratios between dtypes)."""

    clusters: tuple[str, ...]  # cluster-name prefixes the device belongs to
    device: str
    field: str  # ram_bw | cpu_flops | gpu.mem_bw | gpu.flops
    peak: float  # SI: bytes/s or FLOP/s (cpu_flops / gpu.flops: the q4k entry's peak)
    source: str


@dataclass(frozen=True)
class Fitted:
    name: str
    value: float
    help: str
    cells: tuple[Cell, ...]
    prior: float
    prior_source: str
    bindings: tuple[Binding, ...] = ()


def _b(clusters: str, device: str, field: str, peak: float, source: str) -> Binding:
    return Binding(tuple(clusters.split()), device, field, peak, source)


T4 = "prima-table4"
_X86_CPUS = (
    _b("prima-d1", "D3", "cpu_flops", 1843 * GFLOPS, "i9 16 cores (8P+8E) x AVX2 FMA, 1.8 TFLOPS FP32 peak"),
    _b("prima-d1", "D2", "cpu_flops", 1024 * GFLOPS, "i9 laptop 8 cores x 32 FLOP/cycle x 4 GHz"),
    _b("prima-fig10", "PC", "cpu_flops", 1024 * GFLOPS, "8-core desktop, AVX2 FMA at ~4 GHz"),
    _b("prima-fig10", "Laptop", "cpu_flops", 1024 * GFLOPS, "8-core laptop, AVX2 FMA at ~4 GHz"),
    *(_b("prima-fig2", c, "cpu_flops", 1024 * GFLOPS, "8 cores, AVX2 FMA at ~4 GHz (as D2)")
      for c in ("C1", "C2", "C3", "C4")),
)
_X86_DRAM = (
    _b("prima-d1", "D3", "ram_bw", 89.6 * GB, "DDR5-5600 dual channel"),
    _b("prima-d1", "D2", "ram_bw", 51.2 * GB, "DDR4-3200 dual channel"),
    _b("prima-fig10", "PC", "ram_bw", 51.2 * GB, "DDR4-3200 dual channel"),
    _b("prima-fig10", "Laptop", "ram_bw", 51.2 * GB, "DDR4-3200 dual channel"),
    *(_b("prima-fig2", c, "ram_bw", 51.2 * GB, "DDR4-3200 dual channel (as D2)") for c in ("C1", "C2", "C3", "C4")),
)
_CUDA_VRAM = (
    _b("prima-d1", "D3", "gpu.mem_bw", 616 * GB, "RTX 2080 Ti GDDR6"),
    _b("prima-d1", "D2", "gpu.mem_bw", 448 * GB, "RTX 3070 Laptop GDDR6"),
    _b("prima-fig10", "PC", "gpu.mem_bw", 484 * GB, "GTX 1080 Ti GDDR5X"),
    _b("prima-fig10", "Laptop", "gpu.mem_bw", 336 * GB, "RTX 3060 Laptop GDDR6"),
)

_LINUX_IDLE = tuple(_b(c, d, "idle_anon", 1.0, "a share: no peak") for c, d in (
    ("prima-d1", "D2"), ("prima-d1", "D3"), ("prima-fig10", "PC"), ("prima-fig10", "Laptop")))
FIG8 = "prima-device-selection"
_MDI_CELLS = tuple(("mdi-llm-nodes", "nanollama-304m", "mdi-llm S=3", "throughput", f"{n} nodes") for n in (1, 3))

FITTED: dict[str, Fitted] = {f.name: f for f in (
    Fitted("x86_dram_eff", 0.6619, "llama.cpp's CPU decode: achieved fraction of the DRAM's peak bandwidth (x86 desktops "
           "and laptops)", ((T4, "llama1-30b", "llama.cpp", "tpot", ""), (T4, "llama3-45b", "llama.cpp", "tpot", "")),
           0.70, "reference 3: llama.cpp CPU decode reaches 65-90 % of *measured* bandwidth, ~70 % of the spec peak",
           _X86_DRAM),
    Fitted("x86_flops_eff", 0.492, "llama.cpp's K-quant matmuls on x86 CPUs (AVX2 int8 dot products): fraction of the "
           "FP32 FMA peak", ((T4, "llama1-30b", "llama.cpp", "tpot", ""), (T4, "llama3-45b", "llama.cpp", "tpot", "")),
           0.50, "estimate: int8 dot products at about half the FP32 FMA peak", _X86_CPUS),
    Fitted("cuda_vram_eff", 1, "llama.cpp's CUDA decode: achieved fraction of the GPU's peak memory bandwidth",
           ((T4, "llama3-8b", "llama.cpp", "tpot", ""), (T4, "llama3-14b", "llama.cpp", "tpot", "")),
           0.80, "reference 3: gpt-fast reaches 69 % of an A100's spec (82 % of its measured) bandwidth", _CUDA_VRAM),
    Fitted("linux_idle_anon", 0.2, "share of other processes' anonymous memory a Linux desktop swaps out when the "
           "page cache's workingset refaults (idle_anon_fraction of the Linux devices of the prima.cpp testbeds): it "
           "sets where llama.cpp's thrashing cliff falls and whether D3 reloads in Fig. 8",
           ((T4, "llama3-45b", "llama.cpp", "tpot", ""), (T4, "llama3-60b", "llama.cpp", "tpot", ""),
            (FIG8, "D2+D3 -> D2+D3+D5", "prima", "tpot_ratio", "")),
           0.5, "estimate: half of background apps' memory idle enough to swap (range 0.1-0.8)", _LINUX_IDLE),
    Fitted("table4_prompt_tokens", 9, "the prompt length of prima.cpp's Table 4 runs (the paper does not state it; "
           "TTFT depends on it)", tuple((T4, mn, "llama.cpp", "ttft", "") for mn in (
               "llama3-8b", "llama3-14b", "llama1-30b", "llama3-45b", "llama3-60b", "llama1-65b", "llama3-70b")),
           16, "primasim's default prompt"),
    Fitted("exo_compute_scale", 6.728, "exo's engines (tinygrad, MLX) per-layer time relative to llama.cpp's kernels",
           ((T4, "llama3-8b", "exo", "tpot", ""),), 3.3, "estimate: tinygrad streams the fp16 weights (3.3x the Q4K "
           "bytes) at llama.cpp's kernel efficiency"),
    Fitted("mdi_msg_overhead_s", 9.180e-03, "MDI-LLM's per-message cost (pickle + queue in one Python process)",
           _MDI_CELLS, 2e-3,
           "estimate: pickling a small dict and a socket send in CPython on an A57 core"),
    Fitted("mdi_layer_overhead_s", 2.664e-03, "MDI-LLM's per-block dispatch cost (eager PyTorch on a Jetson TX2)",
           _MDI_CELLS, 1.5e-3,
           "estimate: ~25 kernel launches per block at ~60 us each on the TX2's A57 cores"),
    Fitted("bud_xeon_bw_gbs", 59.81, "the 32-vCPU Xeon's effective weight-streaming bandwidth (GB/s), one request "
           "at a time", (("bud-batching", "codellama-7b", "bud serial", "generated_throughput", ""),), 120.0,
           "estimate: a 16-core slice of an 8-channel DDR5-4800 socket (307 GB/s) at llama.cpp-like efficiency"),
)}

_OVERRIDE: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("fitted_override", default=None)


def value(name: str) -> float:
    """The constant's value in force (the committed fit, or an experiment's override)."""
    ov = _OVERRIDE.get()
    if ov is not None and name in ov:
        return ov[name]
    return FITTED[name].value


@contextlib.contextmanager
def override(values: dict[str, float]) -> Iterator[None]:
    """Use other values for some constants (a leave-one-figure-out fit, a prior) in this block."""
    unknown = set(values) - set(FITTED)
    if unknown:
        raise KeyError(f"unknown fitted constant(s) {sorted(unknown)}")
    tok = _OVERRIDE.set({**(_OVERRIDE.get() or {}), **values})
    try:
        yield
    finally:
        _OVERRIDE.reset(tok)


def in_sample_cells() -> dict[Cell, list[str]]:
    """Every cell some constant was fitted on, with the constants' names."""
    out: dict[Cell, list[str]] = {}
    for f in FITTED.values():
        for c in f.cells:
            out.setdefault(c, []).append(f.name)
    return out


def split_of(target: str, case: str, system: str, metric: str, device: str = "") -> str:
    return "in-sample" if (target, case, system, metric, device) in in_sample_cells() else "out-of-sample"


def _matches(b: Binding, cluster: ClusterSpec) -> bool:
    return any(cluster.name.startswith(p) for p in b.clusters)


def bound_value(b: Binding, eff: float) -> float:
    return b.peak * eff


def _apply(dev: DeviceSpec, b: Binding, eff: float) -> DeviceSpec:
    v = bound_value(b, eff)
    if b.field == "ram_bw":
        return dev.replace(ram_bw=v)
    if b.field == "idle_anon":
        return dev.replace(idle_anon=v)
    if b.field == "cpu_flops":
        scale = v / dev.cpu_flops["q4k"]
        return dev.replace(cpu_flops={k: x * scale for k, x in dev.cpu_flops.items()})
    assert dev.gpu is not None
    if b.field == "gpu.mem_bw":
        return dev.replace(gpu=dataclasses.replace(dev.gpu, mem_bw=v))
    if b.field == "gpu.flops":
        scale = v / dev.gpu.flops["q4k"]
        return dev.replace(gpu=dataclasses.replace(dev.gpu, flops={k: x * scale for k, x in dev.gpu.flops.items()}))
    raise ValueError(b.field)


def current(dev: DeviceSpec, b: Binding) -> float:
    """The figure a binding sets, as the device has it now."""
    if b.field == "ram_bw":
        return dev.ram_bw
    if b.field == "idle_anon":
        return dev.idle_anon
    if b.field == "cpu_flops":
        return dev.cpu_flops["q4k"]
    assert dev.gpu is not None
    return dev.gpu.mem_bw if b.field == "gpu.mem_bw" else dev.gpu.flops["q4k"]


def calibrated(cluster: ClusterSpec) -> ClusterSpec:
    """`cluster` with every bound figure at peak x the constant's value in force (a no-op for the
    committed values: tests/test_sim_fitted.py checks the data files agree with them)."""
    ov = _OVERRIDE.get()
    if not ov:
        return cluster
    out = cluster
    for name, f in FITTED.items():
        if name not in ov:
            continue
        for b in f.bindings:
            if _matches(b, cluster) and b.device in cluster.names:
                out = out.replace_device(_apply(out.device(b.device), b, ov[name]))
    return out
