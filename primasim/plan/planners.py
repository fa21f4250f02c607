"""Every system and planner behind one interface: ``make_plan(system, model, cluster, ...)``.

A planner turns (model, cluster, options) into a :class:`~primasim.core.plan.Plan`, or explains why
the system cannot run the case. ``make_plan`` validates the plan (``primasim.core.plan.violations``),
turns violations into one readable reason ("OOM on D2: slice needs 12.3 GiB, 4.1 GiB available")
and attaches the cost model's predictions (TPOT, TTFT, throughput, memory pressure).

Systems (see ``SYSTEMS`` for the options of each):
- ``prima``: Halda + piped ring + prefetch; ``prima-no-prefetch``: the same plan without prefetch;
  ``prima-no-halda`` / ``memsched``: prima.cpp's non-HiGHS fallback, a memory-ratio split (§2.5);
- ``exo``: memory-weighted ring by *total* memory, weights pinned; ``llama.cpp``: one device, as
  many GPU layers as fit, mmap; ``dllama``: tensor parallel on 2^n devices, equal slices, pinned;
  ``mdi-llm``: MDI-LLM's static split and recurrent pipeline (S sequences in flight);
  ``pipo`` / ``flexgen``: single-GPU offloading (barrier-free vs per-layer barrier);
  ``bud``: batched CPU inference with a paged or preallocated KV cache;
- planners of the paper's ablations: ``perfsched`` (compute-proportional + OOM migration + CPU
  fallback, Fig. 10) and ``even`` (even windows with a fixed k, Fig. 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from primasim.core.cluster import ClusterSpec
from primasim.core.device import DeviceSpec
from primasim.core.errors import PlanError, PrimasimError, SpecError
from primasim.core.model import ModelSpec
from primasim.core.plan import DevicePlan, Plan, device_memory, violations
from primasim.core.trace import result_json
from primasim.core.units import GiB

from .cost import CostModel, memory_pressure, predict_tpot, predict_ttft, schedule_estimate


@dataclass
class PlanOutcome:
    """A system's plan for a case, or why it cannot run it, plus the cost model's predictions."""

    system: str
    feasible: bool
    plan: Plan | None
    reason: str
    predicted_tpot: float | None  # s
    predicted_ttft: float | None  # s
    memory_pressure: dict[str, float]
    throughput: float | None = None  # generated tokens/s
    extra: dict[str, Any] = field(default_factory=dict)  # planner details (Halda objective, sets, ...)
    attempted: Plan | None = None  # the plan that did not fit, when infeasible

    def to_json(self) -> dict[str, Any]:
        """The ``primasim plan --json`` object (the contract's keys, times in ms)."""
        out = result_json(self.system, feasible=self.feasible, plan=self.plan, reason=self.reason)
        out.update(
            tpot_ms=None if self.predicted_tpot is None else self.predicted_tpot * 1e3,
            ttft_ms=None if self.predicted_ttft is None else self.predicted_ttft * 1e3,
            throughput_tok_s=self.throughput,
            memory_pressure=dict(self.memory_pressure),
            predicted=True,
        )
        out.update({k: v for k, v in self.extra.items() if k not in out})
        if self.attempted is not None:
            out["attempted_plan"] = self.attempted.to_json()
        return out


@dataclass(frozen=True)
class Ctx:
    """What every planner gets besides model and cluster."""

    n_ctx: int
    prompt_tokens: int
    options: dict[str, Any]

    def opt(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)


PlannerFn = Callable[[ModelSpec, ClusterSpec, Ctx], "Plan | tuple[Plan, dict[str, Any]]"]


@dataclass(frozen=True)
class Planner:
    name: str
    help: str
    fn: PlannerFn
    options: dict[str, str] = field(default_factory=dict)  # option -> help


class Infeasible(PlanError):
    """The system cannot run this case (raised by planners; becomes feasible=False)."""


# ------------------------------------------------------------------------------ helpers
def _ring(cluster: ClusterSpec) -> list[str]:
    names = cluster.names
    h = names.index(cluster.head)
    return names[h:] + names[:h]


def _gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


def _bp(model: ModelSpec, n_ctx: int) -> float:
    return model.layer_bytes_with_kv(n_ctx)


def _gpu_fit_layers(dev: DeviceSpec, model: ModelSpec, n_ctx: int, *, head: bool = False) -> int:
    """Layers (weights + KV) that fit in a device's free VRAM after its compute buffer."""
    if dev.gpu is None:
        return 0
    free = dev.gpu.vram_avail - dev.gpu.compute_buffer - (model.output_bytes if (head and dev.has_metal) else 0.0)
    return max(0, int(math.floor(free / _bp(model, n_ctx) + 1e-9)))


def _largest_remainder(weights: np.ndarray, total: int, minimum: int = 0) -> np.ndarray:
    """Integers proportional to `weights` summing to `total` (each >= minimum when possible)."""
    wts = np.maximum(np.asarray(weights, float), 0.0)
    if wts.sum() <= 0:
        wts = np.ones_like(wts)
    base = np.full(len(wts), minimum if minimum * len(wts) <= total else 0, dtype=np.int64)
    rest = total - int(base.sum())
    share = wts / wts.sum() * rest
    out = base + np.floor(share).astype(np.int64)
    left = total - int(out.sum())
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    out[order[:left]] += 1
    return out


def _ring_plan(system: str, model: ModelSpec, names: list[str], w: np.ndarray, n: np.ndarray, ctx: Ctx, *,
               all_names: list[str], k: int = 1, weights: str = "mmap", prefetch: bool = True,
               options: dict[str, Any] | None = None, notes: tuple[str, ...] = ()) -> Plan:
    got = {nm: (int(w[i]), int(n[i])) for i, nm in enumerate(names)}
    devs = tuple(DevicePlan(nm, *got.get(nm, (0, 0))) for nm in names + [x for x in all_names if x not in names])
    return Plan(system=system, model=model.name, n_layers=model.n_layers, k=k, devices=devs, quant=model.quant,
                schedule="ring", weights=weights, prefetch=prefetch, n_ctx=ctx.n_ctx, options=dict(options or {}),
                notes=notes)


def _bool(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.lower() in ("0", "false", "no", "off"):
        return False
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise SpecError(f"option {name} must be true or false, got {v!r}", where=f"--option {name}", fix=f"{name}=true")


def _int(v: Any, name: str, lo: int = 1) -> int:
    try:
        x = int(v)
    except (TypeError, ValueError):
        raise SpecError(f"option {name} must be an integer, got {v!r}", where=f"--option {name}",
                        fix=f"{name}=<integer >= {lo}>") from None
    if isinstance(v, float) and v != x:
        raise SpecError(f"option {name} must be an integer, got {v!r}", where=f"--option {name}", fix=f"{name}={int(v)}")
    if x < lo:
        raise SpecError(f"option {name} must be >= {lo}, got {x}", where=f"--option {name}", fix=f"{name}={lo}")
    return x


def _names_opt(v: Any, cluster: ClusterSpec, name: str) -> list[str]:
    items = v.split(",") if isinstance(v, str) else list(v)
    items = [str(x).strip() for x in items if str(x).strip()]
    for x in items:
        if x not in cluster.names:
            raise SpecError(f"option {name} names {x!r}, which is not a device of {cluster.name}",
                            where=f"--option {name}", fix=f"use names from {cluster.names}")
    if not items:
        raise SpecError(f"option {name} is empty", where=f"--option {name}", fix=f"{name}=D1,D2")
    return items


# ------------------------------------------------------------------------------ prima (Halda)
_HALDA_OPTS = {
    "planner": "global (default: Halda as one optimisation model of the paper-variant cost model with per-hop "
               "communication, solved by relaxation + rounding), loop (prima.cpp's own Halda: set-assignment loop, "
               "code variant, no communication) or sim (local search with the simulator as the objective, from "
               "Halda's plan)",
    "k": "fix the number of laps (prima.cpp -k): honoured, or refused with the reason; default: the planner's choice",
    "solver": "relax (CVXPY relaxation + rounding, default), exact (integer program, HiGHS) or dp (global only: "
              "dynamic programming, a cross-check)",
    "revision": "planner=loop: prima.cpp main (head, default) or v1 (the code of the paper's Table 4)",
    "variant": "cost model Halda optimises: paper (default with planner=global) or code (prima.cpp HEAD; default with planner=loop)",
    "comm": "add per-hop communication time to Halda's cost (beyond prima.cpp)",
    "general": "allow a partial last lap, W need not divide L (beyond prima.cpp)",
    "global_opt": "solve the global model instead of prima.cpp's loop (beyond prima.cpp)",
    "select_devices": "drop devices given one layer and re-plan (default true)",
    "master_priority": "head preference (prima.cpp --master-priority, default 1.01)",
    "corrections": "{device: DeviceCorrection} measured coefficients (Python API only)",
    "sim_runtime": "with planner=sim: simulate the candidates as primasim's runtime executes them "
                   "(SimConfig(runtime=True): its residency plan, CPU quota, throttled disk and shaped links) "
                   "instead of the papers' engines, and let the search switch prefetch; for `primasim validate` "
                   "on an emulated cluster",
}


def _halda_plan(system: str, prefetch: bool) -> PlannerFn:
    def fn(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> tuple[Plan, dict[str, Any]]:
        from .halda import halda

        mode = str(ctx.opt("planner", "global"))
        if mode not in _PLANNER_MODES:
            raise SpecError(f"option planner must be one of {sorted(_PLANNER_MODES)}, got {mode!r}",
                            where="--option planner", fix="planner=global")
        # Defaults per mode; explicit options override them.
        kw: dict[str, Any] = dict(_PLANNER_MODES[mode])
        if ctx.opt("k") is not None:
            kw["k"] = _int(ctx.opt("k"), "k")
        for b in ("comm", "general", "global_opt", "select_devices"):
            if ctx.opt(b) is not None:
                kw[b] = _bool(ctx.opt(b), b)
        if ctx.opt("solver") is not None:
            kw["solver"] = str(ctx.opt("solver"))
        if ctx.opt("revision") is not None:
            kw["revision"] = str(ctx.opt("revision"))
        if ctx.opt("variant") is not None:
            kw["variant"] = str(ctx.opt("variant"))
        if ctx.opt("master_priority") is not None:
            kw["master_priority"] = float(ctx.opt("master_priority"))
        if ctx.opt("corrections") is not None:
            kw["corrections"] = ctx.opt("corrections")
        if "revision" in kw and kw.get("global_opt"):
            raise SpecError("revision selects a version of prima.cpp's loop; the global model has none",
                            where="--revision", fix="add --planner loop, or drop --revision")
        if mode == "sim":
            unused = [o for o in ("variant", "comm", "global_opt", "revision") if ctx.opt(o) is not None]
            if unused:
                raise SpecError(f"planner=sim does not use {', '.join(unused)}: its objective is the simulator "
                                "and its start the global model's plan", where="--planner sim",
                                fix=f"drop {', '.join('--' + o.replace('_opt', '') for o in unused)}")
            k = kw.get("k")
            if k is not None and model.n_layers % k and not kw.get("general"):
                raise SpecError(f"k = {k} does not divide L = {model.n_layers}", where="--k",
                                fix="pick a divisor of the layer count or add --general (partial last lap)")
            return _sim_halda_plan(system, prefetch, model, cluster, ctx, kw)
        res = halda(model, cluster, n_ctx=ctx.n_ctx, **kw)
        plan = res.plan.replace(system=system, prefetch=prefetch, notes=res.plan.notes + (f"planner: {mode}",))
        extra = {"halda": {"objective_ms": res.objective * 1e3, "sets": res.sets, "k": res.k,
                           "iterations": res.iterations, "rounds": res.rounds, "solve_time_ms": res.solve_time * 1e3,
                           "dropped": res.dropped, "notes": res.notes,
                           "solver": res.plan.options.get("solver"),
                           "model_objective_ms": None if res.model_objective is None else res.model_objective * 1e3,
                           "lower_bound_ms": None if res.lower_bound is None else res.lower_bound * 1e3,
                           "candidates": [{"k": c.k, "devices": [[d.name, d.layers, d.gpu_layers] for d in c.devices]}
                                          for c in res.candidates]}}
        if res.trace:
            extra["halda"]["trace"] = res.trace
        return plan, extra

    return fn


# Why `global` is the default: prima.cpp's set-assignment loop keeps every device in the set it starts
# in (docs/planning.md, "Why prima.cpp's loop locks"); the one model of Halda optimises the sets too,
# and its relaxation + rounding reaches the MILP's optimum (experiments/results/halda_gap.md).
_PLANNER_MODES: dict[str, dict[str, Any]] = {
    "global": {"global_opt": True, "variant": "paper", "comm": True},
    "loop": {"global_opt": False, "variant": "code", "comm": False},
    "sim": {"global_opt": True, "variant": "paper", "comm": True},
}


def _sim_halda_plan(system: str, prefetch: bool, model: ModelSpec, cluster: ClusterSpec, ctx: Ctx,
                    kw: dict[str, Any]) -> tuple[Plan, dict[str, Any]]:
    """The simulator-in-the-loop planner (primasim.sim.sim_plan): local search from Halda's plan,
    each move judged by simulating it (lazy import: the simulator sits above the planners)."""
    from primasim.sim import SimConfig, sim_plan

    halda_kw = {k: v for k, v in kw.items() if k in ("solver", "master_priority", "select_devices")}
    rt = _bool(ctx.opt("sim_runtime"), "sim_runtime") if ctx.opt("sim_runtime") is not None else False
    cfg = SimConfig(tokens=8, prompt_tokens=ctx.prompt_tokens, runtime=rt, warmup=not rt)
    res = sim_plan(model, cluster, config=cfg, n_ctx=ctx.n_ctx, k=kw.get("k"), system=system, prefetch_moves=rt,
                   **halda_kw)
    plan = res.plan.replace(system=system, prefetch=res.plan.prefetch if rt else prefetch, notes=res.plan.notes + (
        f"planner: sim ({len(res.history)} moves from Halda's plan; simulated {res.start_tpot_ms:.1f} -> "
        f"{res.tpot_ms:.1f} ms)",))
    return plan, {"sim_planner": res.summary()}


# ------------------------------------------------------------------------------ memory ratio (prima.cpp w/o Halda)
def _memsched(system: str) -> PlannerFn:
    def fn(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
        """prima.cpp's non-HiGHS fallback (§2.5): w proportional to GPU free memory on Metal/CUDA
        devices and available RAM elsewhere; n = w if the window fits in VRAM, else what fits."""
        ring = _ring(cluster)
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
        n = np.array([min(int(w[i]), _gpu_fit_layers(d, model, ctx.n_ctx, head=i == 0)) for i, d in enumerate(devs)])
        return _ring_plan(system, model, ring, w, n, ctx, all_names=ring, k=1, weights="mmap", prefetch=True,
                          options={"planner": "memory-ratio"})

    return fn


# ------------------------------------------------------------------------------ perfsched (Galaxy-style)
def _perfsched(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
    """Compute-proportional split, OOM layers migrated to the fastest devices with spare memory,
    and on GPU devices the layers beyond VRAM fall back to the CPU (paper Fig. 10, Galaxy)."""
    ring = _ring(cluster)
    cm = CostModel.for_cluster(model, cluster.subset(ring), n_ctx=ctx.n_ctx, variant="code")
    devs = [cluster.device(nm) for nm in ring]
    L, M = model.n_layers, len(ring)
    t_layer = np.where(cm.has_gpu, cm.t_gpu, cm.t_cpu)
    power = 1.0 / np.maximum(t_layer, 1e-12)
    w = _largest_remainder(power, L, minimum=1 if M <= L else 0)
    gcap = np.array([_gpu_fit_layers(d, model, ctx.n_ctx, head=i == 0) for i, d in enumerate(devs)])
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
        share = _largest_remainder(power, excess)
        w += share
    if w[0] == 0:
        w[int(np.argmax(w))] -= 1
        w[0] = 1
    n = np.minimum(w, gcap)
    return _ring_plan("perfsched", model, ring, w, n, ctx, all_names=ring, k=1, options={"planner": "perfsched"})


# ------------------------------------------------------------------------------ even split with fixed k
def _even(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
    """Equal windows, k laps (paper Fig. 2); GPU layers as many per window as VRAM allows."""
    ring = _ring(cluster)
    L = model.n_layers
    k = _int(ctx.opt("k", 1), "k")
    if k > L:
        raise SpecError(f"k = {k} exceeds the {L} layers", where="--option k", fix=f"use k <= {L}")
    W = math.ceil(L / k)
    M = min(len(ring), W)
    names = ring[:M]
    w = np.full(M, W // M, dtype=np.int64)
    w[: W % M] += 1
    k_eff = math.ceil(L / W)
    devs = [cluster.device(nm) for nm in names]
    use_gpu = _bool(ctx.opt("gpu", True), "gpu")
    n = np.array([min(int(w[i]), _gpu_fit_layers(d, model, ctx.n_ctx, head=i == 0) // k_eff) if use_gpu else 0
                  for i, d in enumerate(devs)])
    notes = []
    if k_eff != k:
        notes.append(f"k = {k} needs W = {W}, which gives ceil(L/W) = {k_eff} laps")
    if M < len(ring):
        notes.append(f"only {M} of {len(ring)} devices fit a window of >= 1 layer")
    return _ring_plan("even", model, names, w, n, ctx, all_names=ring, k=k_eff,
                      prefetch=_bool(ctx.opt("prefetch", True), "prefetch"),
                      options={"planner": "even", "k_requested": k}, notes=tuple(notes))


# ------------------------------------------------------------------------------ llama.cpp
def _llamacpp(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
    """One device (largest RAM + VRAM, or option device), -ngl = as many layers as fit in VRAM."""
    if ctx.opt("device"):
        dev = cluster.device(str(ctx.opt("device")))
    else:
        def mem(d: DeviceSpec) -> float:
            return d.ram_avail + (d.gpu.vram_avail if (d.gpu and not d.uma) else 0.0)
        dev = max(cluster.devices, key=lambda d: (mem(d), d.gpu.mem_bw if d.gpu else 0.0))
    L = model.n_layers
    n = min(L, _gpu_fit_layers(dev, model, ctx.n_ctx, head=True))
    if ctx.opt("gpu_layers") is not None:
        n = min(L, _int(ctx.opt("gpu_layers"), "gpu_layers", lo=0))
    others = [nm for nm in cluster.names if nm != dev.name]
    return _ring_plan("llama.cpp", model, [dev.name], np.array([L]), np.array([n if dev.gpu else 0]), ctx,
                      all_names=[dev.name] + others, k=1, weights="mmap", prefetch=False,
                      options={"planner": "single-device"})


# ------------------------------------------------------------------------------ exo
def _exo_memory(d: DeviceSpec) -> float:
    """What exo's device_capabilities reports: total VRAM on CUDA machines, total RAM otherwise."""
    if d.gpu is not None and d.gpu.kind == "cuda":
        return d.gpu.vram_total
    return d.ram_total


def _exo(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
    """exo's ring_memory_weighted_partitioning_strategy: nodes sorted by total memory (desc),
    each takes a memory-proportional slice of [0, 1) rounded to 5 decimals, layers from
    int(start*L) to int(end*L)-1; weights pinned; GPU nodes run their whole slice on the GPU."""
    if ctx.opt("devices"):
        names = _names_opt(ctx.opt("devices"), cluster, "devices")
    else:
        android_ok = _bool(ctx.opt("include_android", False), "include_android")
        names = [d.name for d in cluster.devices if android_ok or d.os != "android"]
        if not names:
            raise Infeasible("exo needs root on Android/Termux, and every device here is Android", where="exo",
                             fix="pass include_android=true or add a laptop/desktop")
    devs = sorted((cluster.device(nm) for nm in names), key=lambda d: (_exo_memory(d), d.name), reverse=True)
    total = sum(_exo_memory(d) for d in devs)
    L = model.n_layers
    start, bounds = 0.0, []
    for d in devs:
        end = round(start + _exo_memory(d) / total, 5)
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
    return _ring_plan("exo", model, ring, w, n, ctx, all_names=ring + others, k=1, weights="pinned", prefetch=False,
                      options={"planner": "exo-memory-weighted", "broadcast_peers": max(0, len(ring) - 1)})


# ------------------------------------------------------------------------------ distributed-llama
def _dllama(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
    """Tensor parallel on N = 2^n <= n_kv_heads devices, equal slices of every layer, pinned."""
    if ctx.opt("devices"):
        names = _names_opt(ctx.opt("devices"), cluster, "devices")
        N = len(names)
        if N & (N - 1) or N > model.n_kv_heads:
            raise Infeasible(f"distributed-llama needs 2^n devices and at most n_kv_heads = {model.n_kv_heads}, "
                             f"got {N}", where="dllama", fix="pick 1, 2, 4 or 8 devices")
    else:
        cap = min(len(cluster.devices), model.n_kv_heads)
        N = 1 << (cap.bit_length() - 1)
        ring = _ring(cluster)
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


def _mdi(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
    """Starter = head (embedding + first layers + output head), secondaries in ring order;
    S >= N sequences circulate (recurrent pipeline parallelism); weights pinned in memory, on the
    GPU when the device has one (PyTorch .to('cuda')); KV preallocated per sequence."""
    ring = _ring(cluster)
    N = _int(ctx.opt("nodes", len(ring)), "nodes")
    if N > len(ring):
        raise SpecError(f"nodes = {N} but the cluster has {len(ring)} devices", where="--option nodes",
                        fix=f"use nodes <= {len(ring)}")
    names = ring[:N]
    split = mdi_split(model, N)
    S = _int(ctx.opt("S", N), "S")
    w = np.array(split, np.int64)
    n = np.array([int(w[i]) if cluster.device(nm).gpu is not None else 0 for i, nm in enumerate(names)])
    plan = _ring_plan("mdi-llm", model, names, w, n, ctx, all_names=ring, k=1, weights="pinned", prefetch=False,
                      options={"planner": "mdi-static-table", "S": S,
                               "msg_overhead_s": float(ctx.opt("msg_overhead_s", 0.0))})
    return plan.replace(schedule="rpp")


# ------------------------------------------------------------------------------ PIPO / FlexGen
def _offload(engine: str) -> PlannerFn:
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
        B = _int(ctx.opt("batch", 1), "batch")
        nbuf = _int(ctx.opt("stream_buffers", 2), "stream_buffers")
        kv_layer = model.kv_bytes_per_token() * ctx.n_ctx * B
        budget = dev.gpu.vram_avail - dev.gpu.compute_buffer
        kv_home = "gpu" if L * kv_layer <= 0.5 * budget else "cpu"
        per_layer = model.layer_bytes + (kv_layer if kv_home == "gpu" else 0.0)
        room = budget - (nbuf * model.layer_bytes if L * per_layer > budget else 0.0)
        resident = int(max(0, min(L, math.floor(room / per_layer + 1e-9))))
        if budget < nbuf * model.layer_bytes:
            raise Infeasible(f"OOM on {dev.name}: {nbuf} streaming buffers need {_gib(nbuf * model.layer_bytes)}, "
                             f"{_gib(budget)} VRAM available", where=engine, fix="use a smaller model or quantisation")
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
def _bud(model: ModelSpec, cluster: ClusterSpec, ctx: Ctx) -> Plan:
    """One CPU device serving a batch of requests; KV cache in fixed-size tiles ("paged", only the
    tokens in use) or preallocated to max_len per request ("prealloc"); weights in RAM."""
    if ctx.opt("device"):
        dev = cluster.device(str(ctx.opt("device")))
    else:
        dev = max(cluster.devices, key=lambda d: (d.ram_avail, d.cpu_flops.get("f32", 0.0)))
    L = model.n_layers
    B = _int(ctx.opt("batch", 100), "batch")
    kv = str(ctx.opt("kv", "paged"))
    if kv not in ("paged", "prealloc"):
        raise SpecError(f"kv must be paged or prealloc, got {kv!r}", where="--option kv", fix="kv=paged")
    max_len = _int(ctx.opt("max_len", ctx.n_ctx), "max_len")
    mean_len = _int(ctx.opt("mean_len", ctx.prompt_tokens + 45), "mean_len")  # Bud's workload: ~45 new tokens
    tile = _int(ctx.opt("tile_tokens", 16), "tile_tokens")
    per_tok = model.kv_bytes_per_token() * L
    per_req = per_tok * (max_len if kv == "prealloc" else tile * math.ceil(min(mean_len, max_len) / tile))
    weights = model.total_bytes
    free = dev.ram_avail - weights - model.compute_buffer_bytes(ctx.n_ctx)
    if free <= 0:
        raise Infeasible(f"OOM on {dev.name}: weights need {_gib(weights + model.compute_buffer_bytes(ctx.n_ctx))}, "
                         f"{_gib(dev.ram_avail)} available", where="bud", fix="use a smaller model or quantisation")
    admitted = int(min(B, free // per_req))
    if admitted < 1:
        raise Infeasible(f"OOM on {dev.name}: one request's KV cache needs {_gib(per_req)}, {_gib(free)} left after "
                         "the weights", where="bud", fix="lower max_len or use kv=paged")
    others = [nm for nm in cluster.names if nm != dev.name]
    devs = (DevicePlan(dev.name, L, 0),) + tuple(DevicePlan(nm, 0, 0) for nm in others)
    return Plan(system="bud", model=model.name, n_layers=L, k=1, devices=devs, quant=model.quant, schedule="batch",
                weights="pinned", prefetch=False, n_ctx=min(ctx.n_ctx, max_len),
                options={"planner": "batch-cpu", "batch": admitted, "requested_batch": B, "kv": kv,
                         "max_len": max_len, "mean_len": mean_len, "tile_tokens": tile,
                         "mean_context": min(mean_len, max_len) // 2, "kv_reserved_bytes": admitted * per_req,
                         "workers": _int(ctx.opt("workers", 1), "workers")})


# ------------------------------------------------------------------------------ registry
SYSTEMS: dict[str, Planner] = {
    "prima": Planner("prima", "prima.cpp: Halda plan, piped-ring parallelism, prefetching", _halda_plan("prima", True),
                     _HALDA_OPTS),
    "prima-no-prefetch": Planner("prima-no-prefetch", "prima.cpp's Halda plan without prefetching (Table 4 ablation)",
                                 _halda_plan("prima-no-prefetch", False), _HALDA_OPTS),
    "prima-no-halda": Planner("prima-no-halda", "prima.cpp with the memory-ratio split instead of Halda (§2.5 fallback)",
                              _memsched("prima-no-halda")),
    "exo": Planner("exo", "exo: memory-weighted ring by total memory, weights pinned", _exo,
                   {"include_android": "also use Android devices (exo needs root there; default false)",
                    "devices": "comma-separated device names to use"}),
    "llama.cpp": Planner("llama.cpp", "llama.cpp on the single best device, GPU layers as many as fit, mmap", _llamacpp,
                         {"device": "device to run on (default: largest RAM + VRAM)",
                          "gpu_layers": "-ngl (default: as many as fit)"}),
    "dllama": Planner("dllama", "distributed-llama: tensor parallel, 2^n devices, equal slices, pinned", _dllama,
                      {"devices": "comma-separated device names (2^n of them)"}),
    "mdi-llm": Planner("mdi-llm", "MDI-LLM: static split table, recurrent pipeline with S sequences", _mdi,
                       {"nodes": "number of devices (default all)", "S": "sequences in flight (default = nodes)",
                        "msg_overhead_s": "per-message software overhead, s (default 0)"}),
    "pipo": Planner("pipo", "PIPO: pipelined offloading on one CUDA GPU, no barriers", _offload("pipo"),
                    {"device": "GPU device", "batch": "batch size (default 1)", "stream_buffers": "default 2",
                     "weights_home": "auto, cpu or disk"}),
    "flexgen": Planner("flexgen", "FlexGen: offloading on one CUDA GPU with a barrier per layer", _offload("flexgen"),
                       {"device": "GPU device", "batch": "batch size (default 1)", "stream_buffers": "default 2",
                        "weights_home": "auto, cpu or disk"}),
    "bud": Planner("bud", "Bud: batched CPU inference, paged or preallocated KV cache", _bud,
                   {"device": "CPU device (default: most RAM)", "batch": "requests in flight (default 100)",
                    "kv": "paged (default) or prealloc", "max_len": "max tokens per request (default n_ctx)",
                    "mean_len": "mean tokens per request (default prompt + 45)", "tile_tokens": "tile size (default 16)",
                    "workers": "workers (NUMA nodes), default 1"}),
    "memsched": Planner("memsched", "planner: memory-ratio split (= prima-no-halda, exo-style MemSched)",
                        _memsched("memsched")),
    "perfsched": Planner("perfsched", "planner: compute-proportional split + OOM migration + CPU fallback (Galaxy)",
                         _perfsched),
    "even": Planner("even", "planner: even windows with a fixed k (paper Fig. 2)", _even,
                    {"k": "laps (default 1)", "gpu": "use GPUs (default true)", "prefetch": "default true"}),
}

COMMON_OPTIONS = ("n_ctx", "prompt_tokens")


def _oom_reason(plan: Plan, model: ModelSpec, cluster: ClusterSpec) -> str:
    """One sentence for the first device that does not fit, e.g. 'OOM on D2: slice needs ...'."""
    mem = device_memory(plan, model, cluster)
    for d in plan.devices:
        if d.layers == 0 and d.name != plan.head:
            continue
        dev = cluster.device(d.name)
        m = mem[d.name]
        if dev.gpu is not None and not dev.uma and m.vram_need > dev.gpu.vram_avail:
            return (f"OOM on {d.name}: GPU slice needs {_gib(m.vram_need)}, {_gib(dev.gpu.vram_avail)} VRAM available")
        if plan.weights == "pinned":
            need = m.ram_need + (m.vram_need if dev.uma else 0.0)
            if need > dev.ram_avail:
                return f"OOM on {d.name}: slice needs {_gib(need)}, {_gib(dev.ram_avail)} available"
        else:
            anon = m.kv_cpu + m.buffers_cpu + (m.kv_gpu + m.buffers_gpu if dev.uma else 0.0)
            if anon > dev.ram_avail + dev.swap_avail:
                return (f"OOM on {d.name}: KV cache + buffers need {_gib(anon)}, "
                        f"{_gib(dev.ram_avail + dev.swap_avail)} RAM + swap available")
    return ""


def make_plan(system: str, model: ModelSpec, cluster: ClusterSpec, *, n_ctx: int = 1024, prompt_tokens: int = 16,
              **options: Any) -> PlanOutcome:
    """Plan `model` on `cluster` the way `system` would, validate it, and predict its latency.

    Unknown systems or options raise SpecError; a system that cannot run the case returns
    ``feasible=False`` with the reason (and the attempted plan in ``attempted`` when there is one).
    Predictions use the paper variant of the cost model with communication (primasim.plan.cost).
    """
    if system not in SYSTEMS:
        raise SpecError(f"unknown system {system!r}", where="--system", fix=f"use one of {', '.join(SYSTEMS)}")
    planner = SYSTEMS[system]
    bad = set(options) - set(planner.options)
    if bad:
        allowed = ", ".join(planner.options) or "none"
        raise SpecError(f"system {system} has no option(s) {sorted(bad)}", where="--option",
                        fix=f"options of {system}: {allowed}")
    if not isinstance(n_ctx, int) or n_ctx < 1:
        raise SpecError(f"n_ctx must be a positive integer, got {n_ctx!r}", where="--n-ctx", fix="e.g. --n-ctx 1024")
    if not isinstance(prompt_tokens, int) or prompt_tokens < 1:
        raise SpecError(f"prompt_tokens must be a positive integer, got {prompt_tokens!r}", where="--prompt-tokens",
                        fix="e.g. --prompt-tokens 16")
    ctx = Ctx(n_ctx=n_ctx, prompt_tokens=prompt_tokens, options=dict(options))
    try:
        got = planner.fn(model, cluster, ctx)
    except SpecError:
        raise
    except PrimasimError as exc:  # Infeasible / PlanError from the planner: the system cannot run it
        return PlanOutcome(system, False, None, exc.what, None, None, {})
    plan, extra = got if isinstance(got, tuple) else (got, {})
    vs = violations(plan, model, cluster)
    if vs:
        reason = _oom_reason(plan, model, cluster) or "; ".join(str(v) for v in vs)
        return PlanOutcome(system, False, None, reason, None, None, {}, extra=extra, attempted=plan)
    tpot = predict_tpot(plan, model, cluster, variant="paper", comm=True)
    ttft = predict_ttft(plan, model, cluster, prompt_tokens=prompt_tokens, variant="paper", comm=True)
    if plan.schedule in ("rpp", "batch", "offload"):
        tput = schedule_estimate(plan, model, cluster, prompt_tokens=prompt_tokens)["throughput"]
    else:
        tput = 1.0 / tpot if tpot > 0 else None
    plan = plan.replace(predicted_tpot_ms=tpot * 1e3)
    return PlanOutcome(system, True, plan, "", tpot, ttft, memory_pressure(plan, model, cluster), tput, extra)
