"""Every system and planner behind one interface: ``make_plan(system, model, cluster, ...)``.

A planner turns (model, cluster, options) into a :class:`~primasim.core.plan.Plan`, or explains why
the system cannot run the case. ``make_plan`` validates the plan (``primasim.core.plan.violations``),
turns violations into one readable reason ("OOM on D2: slice needs 12.3 GiB, 4.1 GiB available")
and attaches the cost model's predictions (TPOT, TTFT, throughput, memory pressure).

Systems (the registry is primasim.core.systems; ``PLANNERS`` has the options of each):
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

from dataclasses import dataclass, field
from typing import Any

from primasim.core.cluster import ClusterSpec
from primasim.core.errors import PrimasimError, SpecError
from primasim.core.model import ModelSpec
from primasim.core.plan import Plan, device_memory, violations
from primasim.core.systems import get_system
from primasim.core.trace import result_json

from .baselines import bud, dllama, even_split, exo, llamacpp, mdi, memsched, offload, perfsched
from .common import Ctx, Planner, PlannerFn, SimPlanner, gib, opt_bool, opt_int
from .cost import memory_pressure, predict_tpot, predict_ttft, schedule_estimate
from .halda import halda


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
        mode = str(ctx.opt("planner", "global"))
        if mode not in _PLANNER_MODES:
            raise SpecError(f"option planner must be one of {sorted(_PLANNER_MODES)}, got {mode!r}",
                            where="--option planner", fix="planner=global")
        # Defaults per mode; explicit options override them.
        kw: dict[str, Any] = dict(_PLANNER_MODES[mode])
        if ctx.opt("k") is not None:
            kw["k"] = opt_int(ctx.opt("k"), "k")
        for b in ("comm", "general", "global_opt", "select_devices"):
            if ctx.opt(b) is not None:
                kw[b] = opt_bool(ctx.opt(b), b)
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
            if mode not in PLANNER_HOOKS:
                raise SpecError(f"planner={mode} needs the simulator", where="--option planner",
                                fix="import primasim.sim first (primasim.make_plan, the CLI and sweeps do)")
            return PLANNER_HOOKS[mode](system, prefetch, model, cluster, ctx, kw)
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
# Planner modes the simulator provides: it sits above the planners, so it fills this when it is
# imported (primasim.sim registers "sim", its simulator-in-the-loop search); `primasim.make_plan` has it.
PLANNER_HOOKS: dict[str, SimPlanner] = {}

_PLANNER_MODES: dict[str, dict[str, Any]] = {
    "global": {"global_opt": True, "variant": "paper", "comm": True},
    "loop": {"global_opt": False, "variant": "code", "comm": False},
    "sim": {"global_opt": True, "variant": "paper", "comm": True},
}


# ------------------------------------------------------------------------------ registry
# how each system of the registry (primasim.core.systems) splits a model, and its options
PLANNERS: dict[str, Planner] = {
    "prima": Planner("prima", _halda_plan("prima", True),
                     _HALDA_OPTS),
    "prima-no-prefetch": Planner("prima-no-prefetch", _halda_plan("prima-no-prefetch", False), _HALDA_OPTS),
    "prima-no-halda": Planner("prima-no-halda", memsched("prima-no-halda")),
    "exo": Planner("exo", exo,
                   {"include_android": "also use Android devices (exo needs root there; default false)",
                    "devices": "comma-separated device names to use"}),
    "llama.cpp": Planner("llama.cpp", llamacpp,
                         {"device": "device to run on (default: largest RAM + VRAM)",
                          "gpu_layers": "-ngl (default: as many as fit)"}),
    "dllama": Planner("dllama", dllama,
                      {"devices": "comma-separated device names (2^n of them)"}),
    "mdi-llm": Planner("mdi-llm", mdi,
                       {"nodes": "number of devices (default all)", "S": "sequences in flight (default = nodes)",
                        "msg_overhead_s": "per-message software overhead, s (default 0)"}),
    "pipo": Planner("pipo", offload("pipo"),
                    {"device": "GPU device", "batch": "batch size (default 1)", "stream_buffers": "default 2",
                     "weights_home": "auto, cpu or disk"}),
    "flexgen": Planner("flexgen", offload("flexgen"),
                       {"device": "GPU device", "batch": "batch size (default 1)", "stream_buffers": "default 2",
                        "weights_home": "auto, cpu or disk"}),
    "bud": Planner("bud", bud,
                   {"device": "CPU device (default: most RAM)", "batch": "requests in flight (default 100)",
                    "kv": "paged (default) or prealloc", "max_len": "max tokens per request (default n_ctx)",
                    "mean_len": "mean tokens per request (default prompt + 45)", "tile_tokens": "tile size (default 16)",
                    "workers": "workers (NUMA nodes), default 1"}),
    "memsched": Planner("memsched", memsched("memsched")),
    "perfsched": Planner("perfsched", perfsched),
    "even": Planner("even", even_split,
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
            return (f"OOM on {d.name}: GPU slice needs {gib(m.vram_need)}, {gib(dev.gpu.vram_avail)} VRAM available")
        if plan.weights == "pinned":
            need = m.ram_need + (m.vram_need if dev.uma else 0.0)
            if need > dev.ram_avail:
                return f"OOM on {d.name}: slice needs {gib(need)}, {gib(dev.ram_avail)} available"
        else:
            anon = m.kv_cpu + m.buffers_cpu + (m.kv_gpu + m.buffers_gpu if dev.uma else 0.0)
            if anon > dev.ram_avail + dev.swap_avail:
                return (f"OOM on {d.name}: KV cache + buffers need {gib(anon)}, "
                        f"{gib(dev.ram_avail + dev.swap_avail)} RAM + swap available")
    return ""


def make_plan(system: str, model: ModelSpec, cluster: ClusterSpec, *, n_ctx: int = 1024, prompt_tokens: int = 16,
              **options: Any) -> PlanOutcome:
    """Plan `model` on `cluster` the way `system` would, validate it, and predict its latency.

    Unknown systems or options raise SpecError; a system that cannot run the case returns
    ``feasible=False`` with the reason (and the attempted plan in ``attempted`` when there is one).
    Predictions use the paper variant of the cost model with communication (primasim.plan.cost).
    """
    get_system(system)  # an unknown name fails here, with the list
    planner = PLANNERS[system]
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
