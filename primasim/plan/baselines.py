"""The planners of every system but prima.cpp's Halda: prima.cpp's memory-ratio fallback, the
paper's ablations (PerfSched, even splits), llama.cpp, exo, distributed-llama, MDI-LLM, PIPO and
FlexGen, Bud. Each turns (model, cluster, options) into a Plan as that system decides it."""

from __future__ import annotations

import math

import numpy as np

from primasim.core.cluster import ClusterSpec
from primasim.core.device import DeviceSpec
from primasim.core.errors import SpecError
from primasim.core.model import ModelSpec
from primasim.core.plan import DevicePlan, Plan

from .common import (
    Ctx,
    Infeasible,
    PlannerFn,
    gib,
    gpu_fit_layers,
    largest_remainder,
    opt_bool,
    opt_int,
    opt_names,
    ring_order,
    ring_plan,
)
from .cost import CostModel


# ------------------------------------------------------------------------------ memory ratio (prima.cpp w/o Halda)
def memsched(system: str) -> PlannerFn:
    def fn(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
        """prima.cpp's non-HiGHS fallback (§2.5): w proportional to GPU free memory on Metal/CUDA
        devices and available RAM elsewhere; n = w if the window fits in VRAM, else what fits."""
        ring = ring_order(cluster)
        devs = [cluster.device(nm) for nm in ring]
        L, M = model.n_layers, len(ring)
        budget = np.array([d.gpu.vram_avail if d.gpu else d.ram_avail for d in devs])
        if budget.sum() <= 0:
            budget = np.ones(M)
        w = np.rint(budget / budget.sum() * L).astype(np.int64)
        if M <= L:
            for m in np.flatnonzero(w == 0):
                w[int(np.argmax(w))] -= 1
                w[m] = 1
        diff = L - int(w.sum())
        if diff > 0:  # prima.cpp: the residue goes to the largest budget ...
            w[int(np.argmax(budget))] += diff
        lo = 1 if M <= L else 0
        while diff < 0:  # ... or comes from the smallest one (never below one layer)
            can = np.flatnonzero(w > lo)
            j = int(can[np.argmin(budget[can])])
            step = max(diff, lo - int(w[j]))
            w[j] += step
            diff -= step
        if w[0] == 0:  # the head computes the output layer, so it stays in the ring
            w[int(np.argmax(w))] -= 1
            w[0] = 1
        n = np.array([min(int(w[i]), gpu_fit_layers(d, model, ctx.n_ctx, head=i == 0)) for i, d in enumerate(devs)])
        return ring_plan(system, model, ring, w, n, ctx, all_names=ring, k=1, weights="mmap", prefetch=True,
                          options={"planner": "memory-ratio"})

    return fn


# ------------------------------------------------------------------------------ perfsched (Galaxy-style)
def perfsched(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
    """Compute-proportional split, OOM layers migrated to the fastest devices with spare memory,
    and on GPU devices the layers beyond VRAM fall back to the CPU (paper Fig. 10, Galaxy)."""
    ring = ring_order(cluster)
    cm = CostModel.for_cluster(model, cluster.subset(ring), n_ctx=ctx.n_ctx, variant="code")
    devs = [cluster.device(nm) for nm in ring]
    L, M = model.n_layers, len(ring)
    t_layer = np.where(cm.has_gpu, cm.t_gpu, cm.t_cpu)
    power = 1.0 / np.maximum(t_layer, 1e-12)
    w = largest_remainder(power, L, minimum=1 if M <= L else 0)
    gcap = np.array([gpu_fit_layers(d, model, ctx.n_ctx, head=i == 0) for i, d in enumerate(devs)])
    ram_cap = np.floor(np.maximum(cm.ram_avail + cm.swap - cm.bcio, 0.0) / cm.bp).astype(np.int64)
    cap = np.where(cm.is_metal, np.floor(np.maximum(cm.vram_avail - cm.bcio - cm.c_gpu, 0) / cm.bp).astype(np.int64),
                   gcap + ram_cap)
    order = np.argsort(-power, kind="stable")
    w = np.minimum(w, np.maximum(cap, 1 if M <= L else 0))
    excess = L - int(w.sum())
    for m in order:  # migrate OOM layers to the fastest devices with spare memory
        if excess <= 0:
            break
        take = min(excess, max(0, int(cap[m] - w[m])))
        w[m] += take
        excess -= take
    if excess > 0:  # the cluster's memory is short: the rest overloads the fastest devices (mmap)
        share = largest_remainder(power, excess)
        w += share
    if w[0] == 0:
        w[int(np.argmax(w))] -= 1
        w[0] = 1
    n = np.minimum(w, gcap)
    return ring_plan("perfsched", model, ring, w, n, ctx, all_names=ring, k=1, options={"planner": "perfsched"})


# ------------------------------------------------------------------------------ even split with fixed k
def even_split(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
    """Equal windows, k laps (paper Fig. 2); GPU layers as many per window as VRAM allows."""
    ring = ring_order(cluster)
    L = model.n_layers
    k = opt_int(ctx.opt("k", 1), "k")
    if k > L:
        raise SpecError(f"k = {k} exceeds the {L} layers", where="--option k", fix=f"use k <= {L}")
    W = math.ceil(L / k)
    M = min(len(ring), W)
    names = ring[:M]
    w = np.full(M, W // M, dtype=np.int64)
    w[: W % M] += 1
    k_eff = math.ceil(L / W)
    devs = [cluster.device(nm) for nm in names]
    use_gpu = opt_bool(ctx.opt("gpu", True), "gpu")
    n = np.array([min(int(w[i]), gpu_fit_layers(d, model, ctx.n_ctx, head=i == 0) // k_eff) if use_gpu else 0
                  for i, d in enumerate(devs)])
    notes = []
    if k_eff != k:
        notes.append(f"k = {k} needs W = {W}, which gives ceil(L/W) = {k_eff} laps")
    if M < len(ring):
        notes.append(f"only {M} of {len(ring)} devices fit a window of >= 1 layer")
    return ring_plan("even", model, names, w, n, ctx, all_names=ring, k=k_eff,
                      prefetch=opt_bool(ctx.opt("prefetch", True), "prefetch"),
                      options={"planner": "even", "k_requested": k}, notes=tuple(notes))


# ------------------------------------------------------------------------------ llama.cpp
def llamacpp(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
    """One device (largest RAM + VRAM, or option device), -ngl = as many layers as fit in VRAM."""
    if ctx.opt("device"):
        dev = cluster.device(str(ctx.opt("device")))
    else:
        def mem(d: DeviceSpec) -> float:
            return d.ram_avail + (d.gpu.vram_avail if (d.gpu and not d.uma) else 0.0)
        dev = max(cluster.devices, key=lambda d: (mem(d), d.gpu.mem_bw if d.gpu else 0.0))
    L = model.n_layers
    n = min(L, gpu_fit_layers(dev, model, ctx.n_ctx, head=True))
    if ctx.opt("gpu_layers") is not None:
        n = min(L, opt_int(ctx.opt("gpu_layers"), "gpu_layers", lo=0))
    others = [nm for nm in cluster.names if nm != dev.name]
    return ring_plan("llama.cpp", model, [dev.name], np.array([L]), np.array([n if dev.gpu else 0]), ctx,
                      all_names=[dev.name] + others, k=1, weights="mmap", prefetch=False,
                      options={"planner": "single-device"})


# ------------------------------------------------------------------------------ exo
def exo_memory(d: DeviceSpec) -> float:
    """What exo's device_capabilities reports: total VRAM on CUDA machines, total RAM otherwise."""
    if d.gpu is not None and d.gpu.kind == "cuda":
        return d.gpu.vram_total
    return d.ram_total


def exo(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
    """exo's ring_memory_weighted_partitioning_strategy: nodes sorted by total memory (desc),
    each takes a memory-proportional slice of [0, 1) rounded to 5 decimals, layers from
    int(start*L) to int(end*L)-1; weights pinned; GPU nodes run their whole slice on the GPU."""
    if ctx.opt("devices"):
        names = opt_names(ctx.opt("devices"), cluster, "devices")
    else:
        android_ok = opt_bool(ctx.opt("include_android", False), "include_android")
        names = [d.name for d in cluster.devices if android_ok or d.os != "android"]
        if not names:
            raise Infeasible("exo needs root on Android/Termux, and every device here is Android", where="exo",
                             fix="pass include_android=true or add a laptop/desktop")
    devs = sorted((cluster.device(nm) for nm in names), key=lambda d: (exo_memory(d), d.name), reverse=True)
    total = sum(exo_memory(d) for d in devs)
    L = model.n_layers
    start, bounds = 0.0, []
    for d in devs:
        end = round(start + exo_memory(d) / total, 5)
        bounds.append((start, end))
        start = end
    layers = []
    for i, (s, e) in enumerate(bounds):
        a = int(s * L)
        b = L if i == len(bounds) - 1 else int(e * L)  # the last node takes the remainder
        layers.append(max(0, b - a))
    w = np.array(layers, np.int64)
    n = np.array([int(w[i]) if d.gpu is not None else 0 for i, d in enumerate(devs)])
    ring = [d.name for d in devs]
    others = [nm for nm in cluster.names if nm not in ring]
    return ring_plan("exo", model, ring, w, n, ctx, all_names=ring + others, k=1, weights="pinned", prefetch=False,
                      options={"planner": "exo-memory-weighted", "broadcast_peers": max(0, len(ring) - 1)})


# ------------------------------------------------------------------------------ distributed-llama
def dllama(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
    """Tensor parallel on N = 2^n <= n_kv_heads devices, equal slices of every layer, pinned."""
    if ctx.opt("devices"):
        names = opt_names(ctx.opt("devices"), cluster, "devices")
        N = len(names)
        if N & (N - 1) or N > model.n_kv_heads:
            raise Infeasible(f"distributed-llama needs 2^n devices and at most n_kv_heads = {model.n_kv_heads}, "
                             f"got {N}", where="dllama", fix="pick 1, 2, 4 or 8 devices")
    else:
        cap = min(len(cluster.devices), model.n_kv_heads)
        N = 1 << (cap.bit_length() - 1)
        ring = ring_order(cluster)
        rest = sorted(ring[1:], key=lambda nm: -cluster.device(nm).ram_avail)
        names = [ring[0]] + rest[: N - 1]  # the root is the cluster head
    L = model.n_layers
    devs = tuple(DevicePlan(nm, L, 0) for nm in names) + tuple(
        DevicePlan(nm, 0, 0) for nm in cluster.names if nm not in names)
    return Plan(system="dllama", model=model.name, n_layers=L, k=1, devices=devs, quant=model.quant, schedule="tp",
                weights="pinned", prefetch=False, n_ctx=ctx.n_ctx,
                options={"planner": "tensor-parallel", "tp_devices": N},
                notes=("every device holds 1/N of every layer; `layers` = layers it takes part in",))


# ------------------------------------------------------------------------------ MDI-LLM
#: MDI-LLM's hand-written table (src/sub/config.py N_LAYERS_NODES): layers -> nodes -> split
MDI_TABLE: dict[int, dict[int, tuple[int, ...]]] = {
    12: {2: (5, 7), 3: (2, 5, 5)},
    22: {2: (10, 12), 3: (6, 8, 8), 4: (4, 6, 6, 6), 5: (2, 5, 5, 5, 5)},
    32: {2: (14, 18), 3: (8, 12, 12), 4: (5, 9, 9, 9), 5: (4, 7, 7, 7, 7)},
    48: {2: (22, 26), 3: (14, 17, 17)},
}


def mdi_split(model: ModelSpec, nodes: int) -> tuple[int, ...]:
    """MDI-LLM's starter/secondary split: the table when it has the entry, else its rule: the
    starter (which also runs the output head) gets fewer layers, so that its layers plus the head
    cost about one secondary's layers (head cost in layer-equivalents from FLOPs)."""
    L = model.n_layers
    if nodes == 1:
        return (L,)
    if L in MDI_TABLE and nodes in MDI_TABLE[L]:
        return MDI_TABLE[L][nodes]
    if nodes > L:
        raise Infeasible(f"MDI-LLM needs at least one layer per node: {nodes} nodes > {L} layers", where="mdi-llm",
                         fix=f"use at most {L} nodes")
    h = sum(model.output_flops().values()) / sum(model.layer_flops_avg(256).values())
    s = int(round((L - (nodes - 1) * h) / nodes))
    s = max(1, min(s, L - (nodes - 1)))
    rest = L - s
    sec = [rest // (nodes - 1)] * (nodes - 1)
    for i in range(rest % (nodes - 1)):
        sec[-1 - i] += 1
    return (s, *sec)


def mdi(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
    """Starter = head (embedding + first layers + output head), secondaries in ring order;
    S >= N sequences circulate (recurrent pipeline parallelism); weights pinned in memory, on the
    GPU when the device has one (PyTorch .to('cuda')); KV preallocated per sequence."""
    ring = ring_order(cluster)
    N = opt_int(ctx.opt("nodes", len(ring)), "nodes")
    if N > len(ring):
        raise SpecError(f"nodes = {N} but the cluster has {len(ring)} devices", where="--option nodes",
                        fix=f"use nodes <= {len(ring)}")
    names = ring[:N]
    split = mdi_split(model, N)
    S = opt_int(ctx.opt("S", N), "S")
    w = np.array(split, np.int64)
    n = np.array([int(w[i]) if cluster.device(nm).gpu is not None else 0 for i, nm in enumerate(names)])
    plan = ring_plan("mdi-llm", model, names, w, n, ctx, all_names=ring, k=1, weights="pinned", prefetch=False,
                      options={"planner": "mdi-static-table", "S": S,
                               "msg_overhead_s": float(ctx.opt("msg_overhead_s", 0.0))})
    return plan.replace(schedule="rpp")


# ------------------------------------------------------------------------------ PIPO / FlexGen
def offload(engine: str) -> PlannerFn:
    def fn(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
        """One CUDA GPU; as many layers resident in VRAM as fit next to `stream_buffers` layer
        buffers and the KV cache; the rest streamed each step from pinned RAM (or the SSD when RAM
        is short). FlexGen synchronises after every layer; PIPO overlaps without barriers."""
        if ctx.opt("device"):
            dev = cluster.device(str(ctx.opt("device")))
            if dev.gpu is None or dev.gpu.kind != "cuda":
                raise Infeasible(f"{engine} runs on a CUDA GPU and {dev.name} has none", where=engine,
                                 fix="pick a device with a CUDA GPU")
        else:
            cuda = [d for d in cluster.devices if d.gpu is not None and d.gpu.kind == "cuda"]
            if not cuda:
                raise Infeasible(f"{engine} offloads to a consumer CUDA GPU; {cluster.name} has none", where=engine,
                                 fix="add a device with a CUDA GPU")
            dev = max(cuda, key=lambda d: (d.gpu.vram_avail if d.gpu else 0.0, d.gpu.mem_bw if d.gpu else 0.0))
        assert dev.gpu is not None
        L = model.n_layers
        B = opt_int(ctx.opt("batch", 1), "batch")
        nbuf = opt_int(ctx.opt("stream_buffers", 2), "stream_buffers")
        kv_layer = model.kv_bytes_per_token() * ctx.n_ctx * B
        budget = dev.gpu.vram_avail - dev.gpu.compute_buffer
        kv_home = "gpu" if L * kv_layer <= 0.5 * budget else "cpu"
        per_layer = model.layer_bytes + (kv_layer if kv_home == "gpu" else 0.0)
        room = budget - (nbuf * model.layer_bytes if L * per_layer > budget else 0.0)
        resident = int(max(0, min(L, math.floor(room / per_layer + 1e-9))))
        if budget < nbuf * model.layer_bytes:
            raise Infeasible(f"OOM on {dev.name}: {nbuf} streaming buffers need {gib(nbuf * model.layer_bytes)}, "
                             f"{gib(budget)} VRAM available", where=engine, fix="use a smaller model or quantisation")
        streamed = (L - resident) * model.layer_bytes + model.input_bytes + model.output_bytes
        kv_cpu = (L * kv_layer if kv_home == "cpu" else 0.0)
        home = str(ctx.opt("weights_home", "auto"))
        if home == "auto":
            home = "cpu" if streamed + kv_cpu + model.compute_buffer_bytes(ctx.n_ctx) <= dev.ram_avail else "disk"
        if home not in ("cpu", "disk"):
            raise SpecError(f"weights_home must be auto, cpu or disk, got {home!r}", where="--option weights_home",
                            fix="weights_home=auto")
        others = [nm for nm in cluster.names if nm != dev.name]
        devs = (DevicePlan(dev.name, L, resident),) + tuple(DevicePlan(nm, 0, 0) for nm in others)
        return Plan(system=engine, model=model.name, n_layers=L, k=1, devices=devs, quant=model.quant,
                    schedule="offload", weights="pinned" if home == "cpu" else "mmap", prefetch=engine == "pipo",
                    n_ctx=ctx.n_ctx,
                    options={"planner": "offload", "engine": engine, "resident_layers": resident,
                             "stream_buffers": nbuf, "barrier": engine == "flexgen", "batch": B,
                             "weights_home": home, "kv_home": kv_home},
                    notes=("gpu_layers = layers resident in VRAM; the others stream in every step",))

    return fn


# ------------------------------------------------------------------------------ Bud
def bud(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
    """One CPU device serving a batch of requests; KV cache in fixed-size tiles ("paged", only the
    tokens in use) or preallocated to max_len per request ("prealloc"); weights in RAM."""
    if ctx.opt("device"):
        dev = cluster.device(str(ctx.opt("device")))
    else:
        dev = max(cluster.devices, key=lambda d: (d.ram_avail, d.cpu_flops.get("f32", 0.0)))
    L = model.n_layers
    B = opt_int(ctx.opt("batch", 100), "batch")
    kv = str(ctx.opt("kv", "paged"))
    if kv not in ("paged", "prealloc"):
        raise SpecError(f"kv must be paged or prealloc, got {kv!r}", where="--option kv", fix="kv=paged")
    max_len = opt_int(ctx.opt("max_len", ctx.n_ctx), "max_len")
    mean_len = opt_int(ctx.opt("mean_len", ctx.prompt_tokens + 45), "mean_len")  # Bud's workload: ~45 new tokens
    tile = opt_int(ctx.opt("tile_tokens", 16), "tile_tokens")
    per_tok = model.kv_bytes_per_token() * L
    per_req = per_tok * (max_len if kv == "prealloc" else tile * math.ceil(min(mean_len, max_len) / tile))
    weights = model.total_bytes
    free = dev.ram_avail - weights - model.compute_buffer_bytes(ctx.n_ctx)
    if free <= 0:
        raise Infeasible(f"OOM on {dev.name}: weights need {gib(weights + model.compute_buffer_bytes(ctx.n_ctx))}, "
                         f"{gib(dev.ram_avail)} available", where="bud", fix="use a smaller model or quantisation")
    admitted = int(min(B, free // per_req))
    if admitted < 1:
        raise Infeasible(f"OOM on {dev.name}: one request's KV cache needs {gib(per_req)}, {gib(free)} left after "
                         "the weights", where="bud", fix="lower max_len or use kv=paged")
    others = [nm for nm in cluster.names if nm != dev.name]
    devs = (DevicePlan(dev.name, L, 0),) + tuple(DevicePlan(nm, 0, 0) for nm in others)
    return Plan(system="bud", model=model.name, n_layers=L, k=1, devices=devs, quant=model.quant, schedule="batch",
                weights="pinned", prefetch=False, n_ctx=min(ctx.n_ctx, max_len),
                options={"planner": "batch-cpu", "batch": admitted, "requested_batch": B, "kv": kv,
                         "max_len": max_len, "mean_len": mean_len, "tile_tokens": tile,
                         "mean_context": min(mean_len, max_len) // 2, "kv_reserved_bytes": admitted * per_req,
                         "workers": opt_int(ctx.opt("workers", 1), "workers")})
