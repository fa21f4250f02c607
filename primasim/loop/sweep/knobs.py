"""The knobs a sweep cell may set: what each means, the values it takes, where it goes.

One table, read by the spec parser (validation, one clear line per mistake), the evaluator (which
knob goes to the cluster, the planner or the simulator) and the docs (`primasim sweep --knobs`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from primasim.core.errors import SpecError
from primasim.plan.planners import PLANNERS


@dataclass(frozen=True)
class Knob:
    name: str
    help: str
    kind: str  # str | int | float | bool | choice
    target: str  # cell (model/cluster/system) | cluster (edits the cluster) | sim (SimConfig) | plan | common | draft
    low: float | None = None  # smallest allowed value
    above: bool = False  # the value must be strictly above `low`
    choices: tuple[str, ...] = ()
    high: float | None = None  # largest allowed value
    option: str = ""  # planner option this knob becomes; only the systems that take it accept it
    evaluate: tuple[str, ...] = ("plan", "simulate")  # evaluators the knob means something to

    def check(self, value: Any) -> str | None:
        """None if `value` is allowed, else what is wrong with it (one phrase)."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"{value!r} is not true/false"
        if self.kind in ("str", "choice"):
            if not isinstance(value, str):
                return f"{value!r} is not a string"
            if self.choices and value not in self.choices:
                return f"{value!r} is not one of {', '.join(self.choices)}"
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{value!r} is not a number"
        if self.kind == "int" and not float(value).is_integer():
            return f"{value!r} is not a whole number"
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return f"{value!r} must be {'>' if self.above else '>='} {self.low:g}"
        if self.high is not None and value > self.high:
            return f"{value!r} must be <= {self.high:g}"
        return None

    def coerce(self, value: Any) -> Any:
        if self.kind == "int":
            return int(value)
        if self.kind == "float":
            return float(value)
        return value


_PLAN_TUNING = ("k", "planner", "solver", "general", "comm", "variant")

KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("model", "model: a built-in name, a config.json or a GGUF file", "str", "cell"),
    Knob("cluster", "cluster: a built-in name, a cluster TOML file, or a [generate.NAME] family", "str", "cell"),
    Knob("system", "the system to evaluate (primasim's registry)", "str", "cell"),
    Knob("quant", "weight quantisation", "choice", "cell", choices=("f32", "f16", "q8_0", "q4k")),
    Knob("k", "laps per token (prima's piped ring); default: Halda picks", "int", "plan", low=1, option="k"),
    Knob("prefetch", "prefetch the next window (ring systems on mmap'd weights)", "bool", "sim", evaluate=("simulate",)),
    Knob("bandwidth_mbps", "every link's bandwidth, Mbit/s (replaces per-link figures)", "float", "cluster", low=0,
         above=True),
    Knob("latency_ms", "every link's one-way latency, ms", "float", "cluster", low=0),
    Knob("ram_scale", "multiply every device's available RAM (capped at its total; on unified-memory devices "
         "the GPU's share too, not a discrete GPU's VRAM)", "float", "cluster", low=0,
         above=True),
    Knob("disk_scale", "multiply every disk's throughput", "float", "cluster", low=0, above=True),
    Knob("S", "sequences in flight (mdi-llm's recurrent pipeline)", "int", "sim", low=1, option="S"),
    Knob("batch", "requests in flight (bud) or batch size (pipo, flexgen)", "int", "sim", low=1, option="batch"),
    Knob("tokens", "tokens generated per sequence", "int", "sim", low=1, evaluate=("simulate",)),
    Knob("prompt_tokens", "prompt length", "int", "common", low=1),
    Knob("seed", "seed of the simulation's random draws (network jitter, request lengths)", "int", "sim",
         evaluate=("simulate",)),
    Knob("n_ctx", "context length the KV cache is sized for", "int", "common", low=1),
    Knob("planner", "Halda's planner for the prima systems", "choice", "plan", choices=("global", "loop", "sim"),
         option="planner"),
    Knob("solver", "Halda's subproblem solver", "choice", "plan", choices=("relax", "exact"), option="solver"),
    Knob("general", "Halda: allow a partial last lap", "bool", "plan", option="general"),
    Knob("comm", "Halda: add per-hop communication to its cost", "bool", "plan", option="comm"),
    Knob("variant", "the cost model Halda optimises", "choice", "plan", choices=("code", "paper"), option="variant"),
    Knob("draft", "speculative decoding: the draft model (a built-in name, config.json or GGUF; the target's "
         "vocabulary); planned with the draft loaded and K + 1 positions per pass", "str", "draft"),
    Knob("draft_tokens", "tokens the draft proposes per pass (K; 0 = no draft)", "int", "draft", low=0),
    Knob("acceptance", "per-token acceptance of the draft's tokens (i.i.d.; default 0.7)", "float", "draft", low=0,
         high=1),
    Knob("draft_on", "device (and side) running the draft, DEV[:cpu|gpu]; default the head, GPU if it fits", "str",
         "draft"),
)}
REQUIRED = ("model", "cluster", "system")


def knob(name: str, where: str) -> Knob:
    """The knob called `name`, or a SpecError naming the key with the closest knob as the fix."""
    try:
        return KNOBS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), KNOBS, n=1)
        fix = f"did you mean {close[0]!r}?" if close else f"knobs are {', '.join(KNOBS)}"
        raise SpecError(f"unknown knob {name!r}", where=where, fix=fix) from None


def system_takes(system: str, k: Knob) -> bool:
    """Whether `system` accepts knob `k` (a planner option only the systems that have it take)."""
    if not k.option:
        return True
    entry = PLANNERS.get(system)
    return entry is not None and k.option in entry.options


def systems_taking(k: Knob) -> list[str]:
    return [s for s, e in PLANNERS.items() if not k.option or k.option in e.options]


def knobs_table() -> list[tuple[str, str, str]]:
    """(name, values, help) rows for `primasim sweep --knobs` and the docs."""
    rows = []
    for k in KNOBS.values():
        if k.choices:
            values = ", ".join(k.choices)
        elif k.kind in ("int", "float"):
            values = k.kind + ("" if k.low is None else f" {'>' if k.above else '>='} {k.low:g}") + (
                "" if k.high is None else f", <= {k.high:g}")
        else:
            values = k.kind
        extra = f" (systems: {', '.join(systems_taking(k))})" if k.option else ""
        rows.append((k.name, values, k.help + extra))
    return rows
