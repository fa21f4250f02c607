"""What every planner shares: its context and interface, and the ring helpers they plan with."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from primasim.core.cluster import ClusterSpec
from primasim.core.device import DeviceSpec
from primasim.core.errors import PlanError, SpecError
from primasim.core.model import ModelSpec
from primasim.core.plan import DevicePlan, Plan
from primasim.core.units import GiB


@dataclass(frozen=True)
class Ctx:
    """What every planner gets besides model and cluster."""

    n_ctx: int
    prompt_tokens: int
    options: dict[str, Any]

    def opt(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)


PlannerFn = Callable[[ModelSpec, ClusterSpec, Ctx], "Plan | tuple[Plan, dict[str, Any]]"]


# a planner mode the simulator adds (planner=sim): (system, prefetch, model, cluster, ctx, Halda's
# keyword arguments) -> (plan, extra)
SimPlanner = Callable[[str, bool, ModelSpec, ClusterSpec, "Ctx", dict[str, Any]], "tuple[Plan, dict[str, Any]]"]


@dataclass(frozen=True)
class Planner:
    """How one system of the registry (primasim.core.systems) splits a model, and its options."""

    name: str
    fn: PlannerFn
    options: dict[str, str] = field(default_factory=dict)  # option -> help


class Infeasible(PlanError):
    """The system cannot run this case (raised by planners; becomes feasible=False)."""


# ------------------------------------------------------------------------------ helpers
def ring_order(cluster: ClusterSpec) -> list[str]:
    names = cluster.names
    h = names.index(cluster.head)
    return names[h:] + names[:h]


def gib(x: float) -> str:
    """A memory size for a message: GiB, or MiB below 1 GiB (small test devices read "0.0 GiB" otherwise)."""
    return f"{x / GiB:.1f} GiB" if x >= GiB else f"{x / 2**20:.1f} MiB"


def _bp(model: ModelSpec, n_ctx: int) -> float:
    return model.layer_bytes_with_kv(n_ctx)


def gpu_fit_layers(dev: DeviceSpec, model: ModelSpec, n_ctx: int, *, head: bool = False) -> int:
    """Layers (weights + KV) that fit in a device's free VRAM after its compute buffer."""
    if dev.gpu is None:
        return 0
    free = dev.gpu.vram_avail - dev.gpu.compute_buffer - (model.output_bytes if (head and dev.has_metal) else 0.0)
    return max(0, int(math.floor(free / _bp(model, n_ctx) + 1e-9)))


def largest_remainder(weights: np.ndarray, total: int, minimum: int = 0) -> np.ndarray:
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


def ring_plan(system: str, model: ModelSpec, names: list[str], w: np.ndarray, n: np.ndarray, ctx: Ctx, *,
               all_names: list[str], k: int = 1, weights: str = "mmap", prefetch: bool = True,
               options: dict[str, Any] | None = None, notes: tuple[str, ...] = ()) -> Plan:
    got = {nm: (int(w[i]), int(n[i])) for i, nm in enumerate(names)}
    devs = tuple(DevicePlan(nm, *got.get(nm, (0, 0))) for nm in names + [x for x in all_names if x not in names])
    return Plan(system=system, model=model.name, n_layers=model.n_layers, k=k, devices=devs, quant=model.quant,
                schedule="ring", weights=weights, prefetch=prefetch, n_ctx=ctx.n_ctx, options=dict(options or {}),
                notes=notes)


def opt_bool(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.lower() in ("0", "false", "no", "off"):
        return False
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise SpecError(f"option {name} must be true or false, got {v!r}", where=f"--option {name}", fix=f"{name}=true")


def opt_int(v: Any, name: str, lo: int = 1) -> int:
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


def opt_names(v: Any, cluster: ClusterSpec, name: str) -> list[str]:
    items = v.split(",") if isinstance(v, str) else list(v)
    items = [str(x).strip() for x in items if str(x).strip()]
    for x in items:
        if x not in cluster.names:
            raise SpecError(f"option {name} names {x!r}, which is not a device of {cluster.name}",
                            where=f"--option {name}", fix=f"use names from {cluster.names}")
    if not items:
        raise SpecError(f"option {name} is empty", where=f"--option {name}", fix=f"{name}=D1,D2")
    return items
