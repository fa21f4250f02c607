"""Service times of one device for one model: the roofline terms of prima.cpp's cost model.

A layer on the CPU costs sum_q f^q / s^cpu_q (compute per weight dtype) + the KV-cache append
(kv_copy per token) + b' / T^cpu (streaming the weights and the KV cache from RAM); on the GPU the
same with the GPU's rates; a window with GPU layers on a discrete GPU adds two host<->device copies
of the hidden state. These are the paper-variant terms (reference 1.2), so where the cost model's
assumptions hold (everything resident, nothing overlapping) the simulator reproduces it exactly;
everything else the simulator adds (page faults, prefetch, contention, jitter) comes on top.
"""

from __future__ import annotations

from functools import lru_cache

from primasim.core.device import DeviceSpec, rate
from primasim.core.model import ModelSpec
from primasim.plan.cost import FLOPS_POSITIONS

#: llama.cpp rounds the KV cells a step attends over up to a multiple of 32 (llama_kv_cache_get_padding
#: without flash attention; 256 with it): decode reads and multiplies that many positions of K and V.
KV_PAD = 32


def kv_span(kv_read: str, n_ctx: int, filled: int) -> tuple[int, int]:
    """(KV positions read, positions attended) of one step whose context holds `filled` tokens.

    "filled": what llama.cpp does -- the cells in use, padded to KV_PAD (so KV traffic grows with
    every token and a prompt's attention is quadratic in its length); "ctx": the cost model's
    accounting -- the whole n_ctx cache read (b'), attention FLOPs at min(n_ctx, 256) positions."""
    if kv_read == "ctx":
        return n_ctx, min(n_ctx, FLOPS_POSITIONS)
    n = min(max(n_ctx, filled), -(-max(1, filled) // KV_PAD) * KV_PAD)
    return n, n


@lru_cache(maxsize=256)
def _layer_flops(model: ModelSpec, n_kv: int) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(model.layer_flops_avg(n_kv).items()))


@lru_cache(maxsize=64)
def _output_flops(model: ModelSpec) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(model.output_flops().items()))


class DeviceTiming:
    """Per-layer, per-window and output-layer times of `model` on `dev` (seconds)."""

    def __init__(self, dev: DeviceSpec, model: ModelSpec, *, roofline: bool = False) -> None:
        self.dev = dev
        self.model = model
        # roofline: a GPU kernel streams its weights while it computes (thousands of threads in flight
        # hide memory latency), so a GPU layer takes the longer of the two; CPU layers and every layer
        # without it add them, as prima.cpp's cost model does (its worst case; llama.cpp's CPU
        # threads stall on their loads, and the CPU efficiencies are fitted that way)
        self.roofline = roofline
        self._memo: dict[tuple[str, int, int, int], float] = {}

    def _flop_time(self, table: dict[str, float], n_kv: int, n_tokens: int) -> float:
        return n_tokens * sum(f / rate(table, q) for q, f in _layer_flops(self.model, n_kv))

    def layer(self, where: str, n_tokens: int, n_kv: int, pos: int | None = None) -> float:
        """One layer for `n_tokens` new tokens: reads `n_kv` cached positions of K and V, and
        attends over `pos` positions (default: as the cost model counts, min(n_kv, 256))."""
        if pos is None:
            pos = min(n_kv, FLOPS_POSITIONS)
        key = (where, n_tokens, n_kv, pos)
        t = self._memo.get(key)
        if t is not None:
            return t
        m, d = self.model, self.dev
        read = m.layer_bytes + m.kv_bytes_per_token() * n_kv
        if where == "gpu":
            assert d.gpu is not None
            # a prompt runs on the batched kernels (tensor cores / MMQ tiles), a decode step on the GEMV ones
            table = d.gpu.gemm_flops if (n_tokens > 1 and d.gpu.gemm_flops) else d.gpu.flops
            t = self._both(self._flop_time(table, pos, n_tokens), read / d.gpu.mem_bw) + d.gpu.kv_copy * n_tokens
        else:
            t = self._flop_time(d.cpu_flops, pos, n_tokens) + read / d.ram_bw + d.kv_copy * n_tokens
        self._memo[key] = t
        return t

    def layer_flops_only(self, where: str, n_tokens: int, n_kv: int) -> float:
        d = self.dev
        table = d.gpu.flops if (where == "gpu" and d.gpu is not None) else d.cpu_flops
        return self._flop_time(table, n_kv, n_tokens)

    def output(self, n_tokens: int = 1, where: str = "cpu") -> float:
        """Output norm + projection (+ the one embedding row read from RAM), prima.cpp's head term."""
        m, d = self.model, self.dev
        flops = sum(f / (rate(d.gpu.flops, q) if (where == "gpu" and d.gpu) else rate(d.cpu_flops, q))
                    for q, f in _output_flops(m))
        gpu = where == "gpu" and d.gpu is not None
        bw = d.gpu.mem_bw if gpu else d.ram_bw  # type: ignore[union-attr]
        mem = (m.input_bytes / m.vocab + m.output_bytes) / bw
        return self._both(n_tokens * flops, mem) if gpu else n_tokens * flops + mem

    def _both(self, compute: float, memory: float) -> float:
        return max(compute, memory) if self.roofline else compute + memory

    def host_copy(self, nbytes: float) -> float:
        """One RAM<->VRAM copy of `nbytes` (0 on unified memory or without a GPU)."""
        d = self.dev
        if d.gpu is None or d.uma:
            return 0.0
        return d.gpu.copy_latency + nbytes / d.gpu.pcie_bw

    def disk_read(self, nbytes: float, efficiency: float = 1.0) -> float:
        return nbytes / (self.dev.disk_speed * efficiency)

    def fault_read(self, nbytes: float) -> float:
        """Seconds to page `nbytes` in by demand faults: Linux reads mmap faults ahead sequentially
        (POSIX_FADV_SEQUENTIAL), macOS and Android page in small random I/Os, each thread one at a
        time (per-I/O latency and queue depth, DeviceSpec.random_read_rate; prima.cpp's s^disk)."""
        d = self.dev
        if d.os == "linux":
            return nbytes / d.disk_seq
        return nbytes / d.random_read_rate(d.page_io, d.cores)

    def prefetch_read(self, nbytes: float) -> float:
        """Seconds for madvise(WILLNEED) to read `nbytes`. Linux submits the range as sequential
        readahead (force_page_cache_readahead, 2 MiB pieces); elsewhere prima.cpp measured reloads at
        the random-read rate whatever starts them (its s^disk for macOS), so prefetch reads at the
        fault rate there -- it hides reads behind other work, it does not make them faster."""
        d = self.dev
        return nbytes / d.disk_seq if d.os == "linux" else self.fault_read(nbytes)
