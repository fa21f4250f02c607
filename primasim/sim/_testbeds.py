"""The baseline papers' testbeds as ClusterSpecs (Bud's Xeon, PIPO's laptop, MDI-LLM's Jetsons).

The prima.cpp testbed is a data file (data/clusters/prima-d1-d6.toml); these three are built in
code because each paper describes a single machine type and the experiments vary how many of them
there are. Every figure says where it comes from: the paper ([P]), a public datasheet estimate
([E]) or a fit to one reported cell ([FIT], named). Used by experiments/ and tests/.
"""

from __future__ import annotations

from primasim.core.cluster import ClusterSpec, NetworkSpec
from primasim.core.device import DeviceSpec, GPUSpec
from primasim.core.model import ModelSpec
from primasim.core.units import GB, GFLOPS, MBPS, MS, GiB, MiB

from ._fitted import value


def _flops(f32: float, f16: float, q: float) -> dict[str, float]:
    return {"f32": f32 * GFLOPS, "f16": f16 * GFLOPS, "q4k": q * GFLOPS, "q8_0": q * GFLOPS, "q6k": q * GFLOPS,
            "q5k": q * GFLOPS}


def bud_xeon() -> ClusterSpec:
    """Bud's 32-vCPU 4th-gen Xeon (Sapphire Rapids) VM serving bf16 models with AMX (reference B).

    RAM: [E] a 32-vCPU cloud VM with 64 GiB (the paper does not say; it bounds how many max-length
    KV reservations fit, not the paged engine)."""
    dev = DeviceSpec(
        name="xeon", os="linux", cores=32, ram_total=64 * GiB, ram_avail=60 * GiB,
        # [FIT] one-request-at-a-time CodeLlama-7B at 4.36 tok/s (Bud Table 1, "without engine"):
        # decode streams 13.5 GB of bf16 weights per token -> ~60 GB/s effective of the socket's
        # 307 GB/s (8 x DDR5-4800) that a 16-core slice attains.
        ram_bw=value("bud_xeon_bw_gbs") * GB,
        # [E] AMX: 16 cores x 1024 bf16 FLOP/cycle x ~2 GHz = 32.8 TFLOPS peak; large oneDNN bf16
        # GEMMs reach 40-60 % of it, we take 40 %. Batched prefill is compute-bound, so the
        # batched/serial ratio depends on this estimate (10 TFLOPS: 17x, 18 TFLOPS: 23x): not fitted.
        cpu_flops=_flops(2000, 13000, 13000), disk_seq=2 * GB, hardware="4th-gen Xeon, 32 vCPU, AMX",
        sources={"ram_bw_gbs": "FITTED to Bud Table 1, CodeLlama-7B without engine (4.36 tok/s)",
                 "cpu_gflops": "estimate: AMX bf16 32.8 TFLOPS peak for 16 cores, 40 % effective"})
    return ClusterSpec("bud-xeon", (dev,), NetworkSpec(kind="switched"), description="Bud paper's Xeon VM")


def pipo_laptop() -> ClusterSpec:
    """PIPO's laptop: RTX 3060 Laptop 6 GB, i7-11800H, 16 GB RAM, 1 TB NVMe SSD (reference A.4)."""
    gpu = GPUSpec(kind="cuda", name="RTX 3060 Laptop", vram_total=6 * GiB, vram_avail=5.5 * GiB,
                  # [E] 3060 Laptop: ~10.9 TFLOPS FP32; INT4 weights dequantised in the kernel
                  flops=_flops(9000, 12000, 8000), mem_bw=300 * GB,  # [E] 336 GB/s GDDR6 peak
                  pcie_bw=12 * GB, copy_latency=0.02 * MS, compute_buffer=500 * MiB)  # [E] PCIe 4.0 x8
    dev = DeviceSpec(name="laptop", os="linux", cores=8, ram_total=16 * GiB, ram_avail=12 * GiB,
                     ram_bw=40 * GB, cpu_flops=_flops(600, 500, 400),  # [E] DDR4-3200 dual channel
                     disk_seq=3 * GB, disk_rnd=0.5 * GB,  # [E] PCIe 3.0 x4 NVMe
                     gpu=gpu, hardware="i7-11800H + RTX 3060 Laptop 6 GB (PIPO testbed)")
    return ClusterSpec("pipo-laptop", (dev,), NetworkSpec(kind="switched"), description="PIPO paper's laptop")


MDI_TX2_GPU_BW = 40 * GB


def mdi_jetsons(n: int) -> ClusterSpec:
    """n NVIDIA Jetson TX2 boards on a gigabit Ethernet switch (MDI-LLM's testbed, reference C.5)."""
    devs = []
    for i in range(n):
        gpu = GPUSpec(kind="cuda", name="Jetson TX2 (Pascal, 256 cores)", vram_total=8 * GiB, vram_avail=4 * GiB,
                      flops=_flops(650, 1300, 650),  # [E] 0.67 TFLOPS FP32
                      # [E] 59.7 GB/s LPDDR4 peak, ~2/3 of it streamed by the Pascal GPU; PyTorch's fixed
                      # per-block dispatch cost is the engine's (mdi_layer_overhead_s in sim/_fitted.py)
                      mem_bw=MDI_TX2_GPU_BW, pcie_bw=25 * GB, compute_buffer=300 * MiB)
        devs.append(DeviceSpec(name=f"tx2-{i}", os="linux", cores=6, ram_total=8 * GiB, ram_avail=6 * GiB,
                               ram_bw=25 * GB, cpu_flops=_flops(40, 40, 40), disk_seq=0.3 * GB, gpu=gpu, uma=True,
                               hardware="NVIDIA Jetson TX2 8 GB (shared CPU/GPU memory)"))
    net = NetworkSpec(kind="switched", bandwidth=940 * MBPS, latency=0.15 * MS, jitter=0.0)  # [E] GbE
    return ClusterSpec(f"mdi-tx2x{n}", tuple(devs), net, description="MDI-LLM's Jetson TX2 ring")


def prefetch_pair(model: ModelSpec, *, window_layers: int = 6, fits_layers: float = 3.4,
                  n_ctx: int = 1024) -> ClusterSpec:
    """Two Linux devices for the prefetch-release conflict (prima.cpp Fig. 3/6): head A with RAM
    to spare, worker B whose page cache holds `fits_layers` layers of `model` next to the KV cache
    and buffers of its `window_layers` layers; B's fast disk (6 GB/s) lets a window's prefetch
    finish during A's compute. Synthetic: a testbed for mechanisms, not a real device."""
    fl = {q: 400 * GFLOPS for q in ("f32", "f16", "q4k", "q5k", "q6k", "q8_0")}
    anon = model.kv_bytes_per_token() * n_ctx * window_layers + model.compute_buffer_bytes(n_ctx)
    a = DeviceSpec(name="A", os="linux", cores=8, ram_total=64 * GiB, ram_avail=32 * GiB, ram_bw=20 * GB,
                   cpu_flops=fl, disk_seq=3 * GB)
    b = DeviceSpec(name="B", os="linux", cores=8, ram_total=8 * GiB, ram_avail=anon + fits_layers * model.layer_bytes,
                   ram_bw=20 * GB, cpu_flops=fl, disk_seq=6 * GB)
    return ClusterSpec("prefetch-pair", (a, b), NetworkSpec(kind="switched", bandwidth=1000 * MBPS, latency=0.5 * MS))
