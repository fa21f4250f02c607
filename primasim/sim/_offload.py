"""Offloaded inference on one GPU device: PIPO's barrier-free pipeline vs FlexGen's per-layer barrier.

Weights that do not fit in VRAM live in pinned CPU memory or on the SSD and are streamed to the GPU
layer by layer every decode step; the KV cache lives on the CPU (or the GPU when it fits), so each
layer also loads its KV slice and saves the new entries. Resources: the SSD (disk server), the
host-to-device and device-to-host PCIe directions (two servers, full duplex), the GPU.

- FlexGen (`flex_opt.py`, generation_loop_overlap_single_batch; reference A.5): at layer j it starts
  load_weight(j+1) (SSD -> pinned -> GPU, one chain), load_cache(j+1), compute(j), store_cache(j-1)
  together, then sync(): every layer costs the slowest of them plus the Python issue/sync overhead.
- PIPO (reference A.3): the same tasks as a DAG with no barrier; a thread per task kind runs ahead
  as far as its buffers allow (pinned staging buffers for SSD reads, GPU weight and KV buffers), so
  each resource works back to back and the GPU waits only for true dependencies.
Metrics: GPU utilisation = GPU busy / makespan, throughput = batch x tokens / makespan.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import simpy

from primasim.core.errors import PlanError
from primasim.core.units import GiB, MiB

from ._context import SimContext, SimResult, infeasible
from ._engine import Proc, Server

if TYPE_CHECKING:  # the registry imports the schedules: the entry's type only, for annotations
    from ._systems import SystemEntry

# FlexGen issues every per-layer task from Python and synchronises the CUDA streams after each
# layer; 0.5 ms per (layer, step) is an assumed cost of that issue + cudaDeviceSynchronize.
FLEXGEN_SYNC_OVERHEAD = 0.5e-3


def offload_layout(ctx: SimContext, batch: int, ctx_len: int) -> dict[str, Any]:
    """Where weights and KV go, from the plan: layers resident in VRAM (the device's gpu_layers),
    the rest streamed each step from pinned RAM (weights_home = cpu) or the SSD (disk); the KV
    cache on the GPU or the CPU (kv_home)."""
    plan, m = ctx.plan, ctx.model
    assert plan is not None
    dev = ctx.dev(plan.head).spec
    if dev.gpu is None:
        raise PlanError(f"device {dev.name} has no GPU", where="offload schedule",
                        fix="offloaded inference (pipo, flexgen) needs a GPU device as the head")
    opts = plan.options
    resident = min(m.n_layers, plan.devices[0].gpu_layers)
    home = str(opts.get("weights_home", "cpu" if plan.weights == "pinned" else "disk"))
    kv_home = str(opts.get("kv_home", "cpu"))
    streamed = m.n_layers - resident
    kv_bytes = m.kv_bytes_per_token() * m.n_layers * batch * ctx_len
    if home == "cpu":
        ram_layers = streamed
    else:
        # "disk" = RAM is short: like FlexGen's (w_gpu, w_cpu, w_disk) percentages, pinned RAM
        # takes what it can hold and the SSD the rest
        room = dev.ram_avail - (kv_bytes if kv_home == "cpu" else 0.0) - 2 * GiB
        ram_layers = int(opts.get("ram_layers", max(0, min(streamed, int(room // m.layer_bytes)))))
    return {"gpu_layers": resident, "cpu_layers": ram_layers, "disk_layers": streamed - ram_layers,
            "kv_on_gpu": kv_home == "gpu", "kv_bytes": kv_bytes, "gpu_buffers": int(opts.get("stream_buffers", 2))}


def run_offload(ctx: SimContext, entry: SystemEntry) -> SimResult:
    assert ctx.plan is not None
    barrier = bool(entry.params["barrier"])
    plan, m, cfg, env = ctx.plan, ctx.model, ctx.cfg, ctx.env
    B = int(plan.options.get("batch", cfg.batch or 1))
    P, T = cfg.prompt_tokens, cfg.tokens
    dev = ctx.dev(plan.head)
    try:
        lay = offload_layout(ctx, B, P + T)
    except PlanError as exc:
        return infeasible(entry.name, exc.message, plan, cfg)
    L = m.n_layers
    g0 = L - lay["cpu_layers"] - lay["disk_layers"]  # layers < g0 resident on the GPU
    g1 = g0 + lay["cpu_layers"]  # layers in [g0, g1) in pinned RAM, the rest on the SSD
    kv_cpu = not lay["kv_on_gpu"]
    dev.setup_memory(lay["cpu_layers"] * m.layer_bytes + (lay["kv_bytes"] if kv_cpu else 0.0) + 512 * MiB,
                     mmap=False)
    assert dev.gpu is not None
    gpu = dev.gpu
    h2d, d2h = dev.pcie, Server(env, device=dev.name, resource="pcie", recorder=ctx.rec)
    tm = dev.timing
    kvb = m.kv_bytes_per_token()

    def steps() -> list[tuple[int, int, int]]:
        # (token index, tokens per sequence in this step, context length)
        out = [(0, P, P)]
        out += [(i, 1, P + i) for i in range(1, T)]
        return out

    jobs = [(s, j) for s in range(len(steps())) for j in range(L)]
    stp = steps()

    def w_disk(g: int) -> float:
        j = jobs[g][1]
        return m.layer_bytes / dev.spec.disk_seq if j >= g1 else 0.0

    def w_h2d(g: int) -> float:
        j = jobs[g][1]
        return tm.host_copy(m.layer_bytes) if j >= g0 else 0.0

    def kv_load(g: int) -> float:
        s, _ = jobs[g]
        _, n, c = stp[s]
        if not kv_cpu or n > 1:
            return 0.0  # prefill writes the cache, it reads none
        return tm.host_copy(B * (c - 1) * kvb)

    def kv_save(g: int) -> float:
        s, _ = jobs[g]
        _, n, _ = stp[s]
        return tm.host_copy(B * n * kvb) if kv_cpu else 0.0

    def compute(g: int) -> float:
        s, _ = jobs[g]
        _, n, c = stp[s]
        return tm.layer("gpu", B * n, c)

    def out_time(s: int) -> float:
        _, n, _ = stp[s]
        return tm.output(B, "gpu")

    t_disk = Server(env, device=dev.name, resource="disk", recorder=ctx.rec)

    def emit_if_last(g: int) -> Proc:
        s, j = jobs[g]
        if j == L - 1:
            yield from gpu.serve(out_time(s), name="output", token=s)
            if s == 0:
                ctx.request(0, P, T)
                ctx.trace.requests[-1].arrival = 0.0
            ctx.emit(0, s)

    def flexgen() -> Proc:
        def load_w(g: int) -> Proc:
            if g >= len(jobs):
                return
            if w_disk(g) > 0:
                yield from t_disk.serve(w_disk(g), name="ssd read", token=jobs[g][0], nbytes=m.layer_bytes)
            if w_h2d(g) > 0:
                yield from h2d.serve(w_h2d(g), name="load weight", token=jobs[g][0], nbytes=m.layer_bytes)

        def load_kv(g: int) -> Proc:
            if g < len(jobs) and kv_load(g) > 0:
                yield from h2d.serve(kv_load(g), name="load cache", token=jobs[g][0])

        def store_kv(g: int) -> Proc:
            if g >= 0 and kv_save(g) > 0:
                yield from d2h.serve(kv_save(g), name="store cache", token=jobs[g][0])

        def comp(g: int) -> Proc:
            yield from gpu.serve(compute(g), name=f"L{jobs[g][1]}", token=jobs[g][0])
            yield from emit_if_last(g)

        yield env.process(load_w(0))
        yield env.process(load_kv(0))
        for g in range(len(jobs)):
            tasks = [env.process(load_w(g + 1)), env.process(load_kv(g + 1)), env.process(comp(g)),
                     env.process(store_kv(g - 1))]
            yield env.all_of(tasks)
            yield env.timeout(FLEXGEN_SYNC_OVERHEAD)  # Python issue + stream synchronisation
        yield env.process(store_kv(len(jobs) - 1))

    def pipo() -> Proc:
        n = len(jobs)
        pinned = simpy.Container(env, capacity=4, init=4)  # staging buffers for SSD reads
        wbuf = simpy.Container(env, capacity=lay["gpu_buffers"], init=lay["gpu_buffers"])
        kvbuf = simpy.Container(env, capacity=2, init=2)
        staged = [env.event() for _ in range(n)]
        w_ready = [env.event() for _ in range(n)]
        kv_ready = [env.event() for _ in range(n)]

        def reader() -> Proc:
            for g in range(n):
                if w_disk(g) > 0:
                    yield pinned.get(1)
                    yield from t_disk.serve(w_disk(g), name="ssd read", token=jobs[g][0], nbytes=m.layer_bytes)
                staged[g].succeed()

        def weight_loader() -> Proc:
            for g in range(n):
                yield staged[g]
                if w_h2d(g) > 0:
                    yield wbuf.get(1)
                    yield from h2d.serve(w_h2d(g), name="load weight", token=jobs[g][0], nbytes=m.layer_bytes)
                    if w_disk(g) > 0:
                        yield pinned.put(1)
                w_ready[g].succeed()

        def kv_loader() -> Proc:
            for g in range(n):
                if kv_load(g) > 0:
                    yield kvbuf.get(1)
                    yield from h2d.serve(kv_load(g), name="load cache", token=jobs[g][0])
                    kv_ready[g].succeed(True)
                else:
                    kv_ready[g].succeed(False)

        def saver(g: int) -> Proc:
            yield from d2h.serve(kv_save(g), name="store cache", token=jobs[g][0])

        procs = [env.process(reader()), env.process(weight_loader()), env.process(kv_loader())]
        saves = []
        for g in range(n):
            yield w_ready[g]
            held_kv = yield kv_ready[g]
            yield from gpu.serve(compute(g), name=f"L{jobs[g][1]}", token=jobs[g][0])
            if w_h2d(g) > 0:
                yield wbuf.put(1)
            if held_kv:
                yield kvbuf.put(1)
            if kv_save(g) > 0:
                saves.append(env.process(saver(g)))
            yield from emit_if_last(g)
        yield env.all_of(procs + saves)

    done = env.process(flexgen() if barrier else pipo())
    ctx.run(until=done)
    res = ctx.result(extra={"offload_layout": lay, "batch": B})
    if res.metrics is not None:
        # every step yields one token for each of the B sequences
        mk = res.metrics.makespan_s
        res.metrics.throughput_tok_s = B * T / mk if mk > 0 else float("nan")
        res.extra["gpu_util"] = gpu.busy_time / mk if mk > 0 else float("nan")
    return res
