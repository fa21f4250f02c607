"""Plan: which layers run where, how many laps a token makes, and a validator that explains itself.

Conventions (shared by planners, simulator and runtime):
- `devices` are in ring order and the first one is the head (embedding, output layer, sampling).
- `layers` of a device is its window w_m: the layers it computes per lap; `gpu_layers` (n_m <= w_m)
  of them run on its GPU (the first n_m of each window).
- A token makes laps around the ring. In lap j every device, in order, computes its next window.
  Closed form (prima.cpp's Assumption 1): L = k * W with W = sum(w). General form: the last lap is
  partial and devices take min(w_m, layers left) in ring order (paper Appendix A.3); then
  k = ceil(L / W).
- Devices with layers = 0 are not in the ring (dropped by device selection).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from .cluster import ClusterSpec
from .errors import PlanError
from .io import atomic_write_text
from .model import ModelSpec
from .units import GiB

Schedule = Literal["ring", "tp", "rpp", "offload", "batch"]
Weights = Literal["mmap", "pinned"]
MAX_LAYERS = 100_000  # bound on a plan file's layer counts (the largest models have ~130 layers)


@dataclass(frozen=True)
class DevicePlan:
    name: str
    layers: int  # window w_m
    gpu_layers: int = 0  # n_m


@dataclass(frozen=True)
class Segment:
    """A contiguous run of layers one device computes in one lap."""

    device: str
    lap: int
    start: int
    end: int  # exclusive
    gpu_layers: int

    @property
    def n(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    system: str
    model: str
    n_layers: int
    k: int
    devices: tuple[DevicePlan, ...]
    quant: str = "f16"
    schedule: Schedule = "ring"
    weights: Weights = "mmap"
    prefetch: bool = False
    n_ctx: int = 1024
    options: dict[str, Any] = field(default_factory=dict)
    predicted_tpot_ms: float | None = None
    notes: tuple[str, ...] = ()

    # ---------------------------------------------------------------- layer bookkeeping
    @property
    def active(self) -> tuple[DevicePlan, ...]:
        return tuple(d for d in self.devices if d.layers > 0)

    @property
    def head(self) -> str:
        return self.devices[0].name

    @property
    def W(self) -> int:
        return sum(d.layers for d in self.devices)

    @property
    def closed_form(self) -> bool:
        return self.W > 0 and self.n_layers == self.k * self.W

    def segments(self) -> list[Segment]:
        """Layer segments in execution order for one token (all laps)."""
        if self.schedule == "tp":
            # tensor parallel: every device holds a slice of every layer; one "segment" per device
            return [Segment(d.name, 0, 0, self.n_layers, 0) for d in self.active]
        segs: list[Segment] = []
        start, lap = 0, 0
        while start < self.n_layers:
            progressed = False
            for d in self.active:
                if start >= self.n_layers:
                    break
                n = min(d.layers, self.n_layers - start)
                segs.append(Segment(d.name, lap, start, start + n, min(d.gpu_layers, n)))
                start += n
                progressed = True
            if not progressed:
                break
            lap += 1
        return segs

    def totals(self) -> dict[str, tuple[int, int]]:
        """device -> (l_m total layers, l_m^gpu total GPU layers) over all laps."""
        out = {d.name: (0, 0) for d in self.devices}
        if self.schedule == "tp":
            return {d.name: (self.n_layers, 0) for d in self.active} | {
                d.name: (0, 0) for d in self.devices if d.layers == 0}
        for s in self.segments():
            lm, lg = out[s.device]
            out[s.device] = (lm + s.n, lg + s.gpu_layers)
        return out

    def n_windows(self) -> dict[str, int]:
        """device -> W_m, the number of windows (laps it takes part in) per token."""
        out = {d.name: 0 for d in self.devices}
        for s in self.segments():
            out[s.device] += 1
        return out

    # ---------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        tot = self.totals()
        devs = []
        for d in self.devices:
            lm, lg = tot[d.name]
            devs.append({"name": d.name, "layers": d.layers, "gpu_layers": d.gpu_layers,
                         "total_layers": lm, "total_gpu_layers": lg})
        return {
            "system": self.system, "model": self.model, "quant": self.quant, "n_layers": self.n_layers,
            "k": self.k, "devices": devs, "schedule": self.schedule, "weights": self.weights,
            "prefetch": self.prefetch, "n_ctx": self.n_ctx, "options": dict(self.options),
            "predicted_tpot_ms": self.predicted_tpot_ms, "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any] | str | Path, *, where: str = "plan") -> Plan:
        """Read a plan: the object `to_json` writes, or the whole `primasim plan --json` output."""
        fix = "write it with `primasim plan --json > plan.json`"
        if isinstance(obj, str | Path):
            p = Path(obj)
            where = str(p)
            try:
                obj = json.loads(p.read_text())
            except FileNotFoundError:
                raise PlanError("file not found", where=where, fix=fix) from None
            except json.JSONDecodeError as exc:
                raise PlanError(f"not valid JSON ({exc.msg}, line {exc.lineno})", where=where, fix=fix) from None
            except UnicodeDecodeError:
                raise PlanError("not a UTF-8 text file", where=where, fix=fix) from None
            except (ValueError, RecursionError) as exc:  # a number of > 4300 digits; nesting deeper than ~1000
                raise PlanError(f"not a usable JSON file ({type(exc).__name__}: {str(exc)[:200]})", where=where,
                                fix=fix) from None
            except OSError as exc:  # a directory, no permission, ...
                raise PlanError(f"cannot read the file ({exc.strerror})", where=where, fix=fix) from None
        if not isinstance(obj, dict):
            raise PlanError("expected a JSON object", where=where, fix=fix)
        outer = obj
        if "plan" in obj and isinstance(obj["plan"], dict):
            obj = {**{k: v for k, v in outer.items() if k != "plan"}, **obj["plan"]}

        def count(v: Any, key: str, hi: int = MAX_LAYERS) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
                raise PlanError(f"'{key}' must be an integer in 0..{hi}, got {v!r}"[:300], where=where, fix=fix)
            return v

        if "devices" not in obj or "k" not in obj:
            raise PlanError(f"missing field '{'k' if 'devices' in obj else 'devices'}'", where=where,
                            fix="a plan needs k and devices: [{name, layers, gpu_layers}]")
        raw_devs = obj["devices"]
        if not isinstance(raw_devs, list) or not all(isinstance(d, dict) and "name" in d and "layers" in d
                                                     for d in raw_devs):
            raise PlanError("'devices' must be a list of {name, layers, gpu_layers} objects", where=where,
                            fix="a plan needs k and devices: [{name, layers, gpu_layers}]")
        devs = []
        for i, d in enumerate(raw_devs):
            if not isinstance(d["name"], str):
                raise PlanError(f"devices[{i}].name must be a string, got {d['name']!r}"[:300], where=where, fix=fix)
            devs.append(DevicePlan(d["name"], count(d["layers"], f"devices[{i}].layers"),
                                   count(d.get("gpu_layers", 0), f"devices[{i}].gpu_layers")))
        k = count(obj["k"], "k")
        n_layers = obj.get("n_layers")
        n_layers = count(k * sum(d.layers for d in devs) if n_layers is None else n_layers, "n_layers")
        schedule, weights = obj.get("schedule", "ring"), obj.get("weights", "mmap")
        if schedule not in get_args(Schedule):
            raise PlanError(f"unknown schedule {schedule!r}"[:300], where=where, fix=f"use one of {get_args(Schedule)}")
        if weights not in get_args(Weights):
            raise PlanError(f"unknown weights {weights!r}"[:300], where=where, fix=f"use one of {get_args(Weights)}")
        prefetch, options, notes = obj.get("prefetch", False), obj.get("options", {}), obj.get("notes", [])
        tpot = obj.get("predicted_tpot_ms")
        if not isinstance(prefetch, bool):
            raise PlanError(f"'prefetch' must be true or false, got {prefetch!r}"[:300], where=where, fix=fix)
        if not isinstance(options, dict):
            raise PlanError(f"'options' must be an object, got {options!r}"[:300], where=where, fix=fix)
        if "S" in options:  # concurrent sequences of an rpp schedule: device_memory multiplies by it
            count(options["S"], "options.S", MAX_LAYERS)
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise PlanError("'notes' must be a list of strings", where=where, fix=fix)
        if tpot is not None and (isinstance(tpot, bool) or not isinstance(tpot, int | float)):
            raise PlanError(f"'predicted_tpot_ms' must be a number or null, got {tpot!r}"[:300], where=where, fix=fix)
        for key in ("system", "model", "quant"):
            if not isinstance(obj.get(key, ""), str):
                raise PlanError(f"'{key}' must be a string, got {obj[key]!r}"[:300], where=where, fix=fix)
        return cls(system=obj.get("system", "prima"), model=obj.get("model", ""), n_layers=n_layers, k=k,
                   devices=tuple(devs), quant=obj.get("quant", "f16"), schedule=schedule, weights=weights,
                   prefetch=prefetch, n_ctx=count(obj.get("n_ctx", 1024), "n_ctx", 2**31 - 1),
                   options=dict(options), predicted_tpot_ms=tpot, notes=tuple(notes))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=2))

    def replace(self, **changes: Any) -> Plan:
        return replace(self, **changes)

    def describe(self) -> str:
        parts = [f"{d.name}:{d.layers}" + (f"({d.gpu_layers} gpu)" if d.gpu_layers else "") for d in self.devices]
        return f"k={self.k} " + " ".join(parts)


# -------------------------------------------------------------------- memory accounting
@dataclass(frozen=True)
class DeviceMemory:
    """Bytes a plan puts on one device."""

    weights_cpu: float  # layer (+ input/output) weights computed on the CPU (mmap'd or pinned)
    weights_gpu: float  # weights resident in VRAM
    kv_cpu: float
    kv_gpu: float
    buffers_cpu: float
    buffers_gpu: float

    @property
    def ram_need(self) -> float:
        return self.weights_cpu + self.kv_cpu + self.buffers_cpu

    @property
    def vram_need(self) -> float:
        return self.weights_gpu + self.kv_gpu + self.buffers_gpu

    def as_dict(self) -> dict[str, float]:
        return asdict(self) | {"ram_need": self.ram_need, "vram_need": self.vram_need}


def device_memory(plan: Plan, model: ModelSpec, cluster: ClusterSpec) -> dict[str, DeviceMemory]:
    """Per-device memory a plan needs (weights, KV cache for n_ctx, compute buffers)."""
    out: dict[str, DeviceMemory] = {}
    tot = plan.totals()
    kv_layer = model.kv_bytes_per_token() * plan.n_ctx
    n_seq = int(plan.options.get("S", 1)) if plan.schedule == "rpp" else 1
    n_dev_tp = max(1, len(plan.active))
    for d in plan.devices:
        dev = cluster.device(d.name)
        lm, lg = tot[d.name]
        if plan.schedule == "tp":
            frac = 1.0 / n_dev_tp if lm else 0.0
            w_cpu = model.layer_bytes * model.n_layers * frac
            if d.name == plan.head:
                w_cpu += model.input_bytes + model.output_bytes * frac
            else:
                w_cpu += model.output_bytes * frac
            kv = kv_layer * model.n_layers * frac
            out[d.name] = DeviceMemory(w_cpu, 0.0, kv, 0.0, model.compute_buffer_bytes(plan.n_ctx) * frac if lm else 0.0, 0.0)
            continue
        is_head = d.name == plan.head
        w_gpu = lg * model.layer_bytes
        w_cpu = (lm - lg) * model.layer_bytes
        if is_head:
            w_cpu += model.input_bytes + model.output_bytes
        kv_cpu = (lm - lg) * kv_layer * n_seq
        kv_gpu = lg * kv_layer * n_seq
        buf_cpu = model.compute_buffer_bytes(plan.n_ctx) if lm or is_head else 0.0
        buf_gpu = dev.gpu.compute_buffer if (dev.gpu is not None and lg > 0) else 0.0
        out[d.name] = DeviceMemory(w_cpu, w_gpu, kv_cpu, kv_gpu, buf_cpu, buf_gpu)
    return out


# -------------------------------------------------------------------- validation
@dataclass(frozen=True)
class Violation:
    device: str  # "" for plan-wide problems
    problem: str
    fix: str

    def __str__(self) -> str:
        who = f"device {self.device}: " if self.device else ""
        return f"{who}{self.problem} (fix: {self.fix})"


def violations(plan: Plan, model: ModelSpec, cluster: ClusterSpec) -> list[Violation]:
    """Every way `plan` is invalid for `model` on `cluster`; empty if it is valid."""
    v: list[Violation] = []
    if plan.model and model.name and plan.model != model.name:
        v.append(Violation("", f"plan is for model {plan.model!r}, not {model.name!r}",
                           f"re-plan with `primasim plan --model {model.name}`"))
    if plan.n_layers != model.n_layers:
        v.append(Violation("", f"plan covers {plan.n_layers} layers but the model has {model.n_layers}",
                           "re-plan for this model"))
        return v
    if not plan.devices:
        return [Violation("", "plan has no devices", "assign layers to at least one device")]
    names = [d.name for d in plan.devices]
    if len(set(names)) != len(names):
        v.append(Violation("", f"a device appears twice in {names}", "list each device once"))
    known = set(cluster.names)
    for d in plan.devices:
        if d.name not in known:
            v.append(Violation(d.name, "not in the cluster", f"use devices of {cluster.name}: {cluster.names}"))
        if d.layers < 0 or d.gpu_layers < 0:
            v.append(Violation(d.name, "negative layer count", "layers and gpu_layers must be >= 0"))
        if d.gpu_layers > d.layers:
            v.append(Violation(d.name, f"gpu_layers {d.gpu_layers} > layers {d.layers} (n_m <= w_m)",
                               "lower gpu_layers to at most the window"))
    if v:
        return v
    if plan.W == 0:
        return [Violation("", "no device has layers", "give at least one device a window > 0")]
    if plan.k < 1:
        v.append(Violation("", f"k must be >= 1, got {plan.k}", "set k >= 1"))
    if plan.schedule != "tp":
        covered = sum(lm for lm, _ in plan.totals().values())
        if covered != plan.n_layers:
            v.append(Violation("", f"layers assigned ({covered}) != model layers ({plan.n_layers})", "fix the windows"))
        k_needed = math.ceil(plan.n_layers / plan.W)
        if plan.k != k_needed:
            v.append(Violation("", f"k = {plan.k} but windows summing to W = {plan.W} need k = ceil(L/W) = {k_needed}",
                               f"set k = {k_needed} or change the windows"))
    mem = device_memory(plan, model, cluster)
    for d in plan.devices:
        if d.name not in known:
            continue
        dev = cluster.device(d.name)
        m = mem[d.name]
        if d.gpu_layers > 0 and dev.gpu is None:
            v.append(Violation(d.name, f"{d.gpu_layers} gpu_layers but the device has no GPU", "set gpu_layers = 0"))
            continue
        if dev.gpu is not None and not dev.uma and m.vram_need > dev.gpu.vram_avail:
            v.append(Violation(d.name, f"GPU needs {m.vram_need / GiB:.2f} GiB but {dev.gpu.vram_avail / GiB:.2f} GiB VRAM is available",
                               "move GPU layers to the CPU (lower gpu_layers)"))
        if plan.weights == "pinned":
            budget = dev.ram_avail  # UMA: RAM and VRAM are one pool, counted in `need`
            need = m.ram_need + (m.vram_need if dev.uma else 0.0)
            if need > budget:
                v.append(Violation(d.name, f"pinned weights + KV + buffers need {need / GiB:.2f} GiB but "
                                   f"{budget / GiB:.2f} GiB RAM is available (OOM)",
                                   "give this device fewer layers, or use mmap'd weights (prima, llama.cpp)"))
        else:
            # mmap'd weights may be evicted and re-read; the KV cache and buffers may not.
            anon = m.kv_cpu + m.buffers_cpu + (m.kv_gpu + m.buffers_gpu if dev.uma else 0.0)
            budget = dev.ram_avail + dev.swap_avail
            if anon > budget:
                v.append(Violation(d.name, f"KV cache + buffers need {anon / GiB:.2f} GiB but {budget / GiB:.2f} GiB "
                                   "RAM + swap is available (OOM)", "shorten the context (n_ctx) or move layers away"))
    return v


def validate(plan: Plan, model: ModelSpec, cluster: ClusterSpec) -> None:
    """Raise PlanError listing every violation (per device) if the plan is invalid."""
    vs = violations(plan, model, cluster)
    if vs:
        lines = "\n  ".join(str(x) for x in vs)
        raise PlanError(f"invalid plan for {model.name} on {cluster.name}:\n  {lines}", where=plan.system,
                        fix="see the per-device problems above")
