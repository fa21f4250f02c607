"""Request streams: when requests arrive and how long their prompts and outputs are.

One `Workload` drives both sides: the simulator serves it (primasim.sim.serve_workload) and the load
generator replays it against `primasim serve` (primasim.serve.loadgen), so predicted and measured
latencies come from the same arrivals and lengths.

Arrival processes (as serving simulators model them, reference speculation-and-serving.md 4.1):
- ``poisson:RATE[,N]``: exponential gaps with mean 1/RATE (no clipping; Vidur clips at 3/RATE);
- ``gamma:RATE,CV[,N]``: gamma gaps of mean 1/RATE and coefficient of variation CV (shape 1/CV^2;
  CV > 1 is burstier than Poisson, CV = 1 is Poisson, CV < 1 more regular);
- ``onoff:RATE,ON,OFF[,N]``: bursty on/off source: Poisson at RATE during ON seconds, silent for
  OFF seconds, repeated (mean rate RATE * ON / (ON + OFF));
- ``constant:RATE[,N]``: one request every 1/RATE seconds;
- a trace file: CSV (``arrival_s,prompt_tokens,output_tokens``; Vidur's
  ``arrived_at,num_prefill_tokens,num_decode_tokens`` too) or JSONL (LLMServingSim's
  ``arrival_time_ns,input_toks,output_toks`` or our own keys), one request per row.

Synthetic streams take fixed prompt and output lengths (the CLI's --prompt-tokens / --tokens), or
a range ``(lo, hi)`` drawn uniformly per request; everything is seeded.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import SpecError
from .io import atomic_write_text

Length = int | tuple[int, int]

#: column names accepted in trace files, per field (first match wins); times are seconds unless
#: the name says otherwise
ARRIVAL_KEYS = {"arrival_s": 1.0, "arrival": 1.0, "arrived_at": 1.0, "arrival_time": 1.0,
                "arrival_time_ms": 1e-3, "arrival_time_us": 1e-6, "arrival_time_ns": 1e-9, "timestamp": 1.0}
PROMPT_KEYS = ("prompt_tokens", "num_prefill_tokens", "input_toks", "input_tokens", "prompt_len")
OUTPUT_KEYS = ("output_tokens", "num_decode_tokens", "output_toks", "max_tokens", "output_len")
MAX_REQUESTS = 1_000_000


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: arrival time (seconds from the start), prompt and output lengths."""

    rid: int
    arrival: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Workload:
    """A finite stream of requests, sorted by arrival time."""

    requests: tuple[RequestSpec, ...]
    name: str = "workload"
    meta: dict[str, object] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.requests:
            raise SpecError("a workload needs at least one request", where=self.name,
                            fix="give N >= 1 or a trace file with rows")
        if any(b.arrival < a.arrival for a, b in zip(self.requests, self.requests[1:])):
            object.__setattr__(self, "requests", tuple(sorted(self.requests, key=lambda r: (r.arrival, r.rid))))

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.requests)

    @property
    def duration(self) -> float:
        """Seconds from the first to the last arrival."""
        return self.requests[-1].arrival - self.requests[0].arrival

    @property
    def rate(self) -> float:
        """Mean arrival rate (requests per second) over the stream; inf if all arrive at once."""
        n = len(self.requests)
        return (n - 1) / self.duration if self.duration > 0 else math.inf

    @property
    def max_prompt(self) -> int:
        return max(r.prompt_tokens for r in self.requests)

    @property
    def max_output(self) -> int:
        return max(r.output_tokens for r in self.requests)

    def scaled(self, time_scale: float) -> Workload:
        """The same requests with every arrival time multiplied by `time_scale` (> 1: slower)."""
        if not time_scale > 0:
            raise SpecError(f"time scale must be > 0, got {time_scale}", where=self.name, fix="use e.g. 0.5 or 2")
        return Workload(tuple(replace(r, arrival=r.arrival * time_scale) for r in self.requests),
                        f"{self.name} x{time_scale:g}", dict(self.meta))

    def head(self, n: int) -> Workload:
        return Workload(self.requests[:n], self.name, dict(self.meta))

    def to_csv(self) -> str:
        lines = ["rid,arrival_s,prompt_tokens,output_tokens"]
        lines += [f"{r.rid},{r.arrival:.6f},{r.prompt_tokens},{r.output_tokens}" for r in self.requests]
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_csv())


# ------------------------------------------------------------------------------------ arrivals
def _lengths(rng: np.random.Generator, spec: Length, n: int, what: str) -> np.ndarray:
    if isinstance(spec, tuple):
        lo, hi = spec
        if not 1 <= lo <= hi:
            raise SpecError(f"{what} range {spec} must satisfy 1 <= lo <= hi", where="workload", fix="e.g. (16, 64)")
        return rng.integers(lo, hi + 1, n)
    if int(spec) < 1:
        raise SpecError(f"{what} must be >= 1, got {spec}", where="workload", fix=f"give {what} >= 1")
    return np.full(n, int(spec))


def _check_rate(rate: float, where: str) -> None:
    if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
        raise SpecError(f"arrival rate must be a positive number, got {rate!r}", where=where,
                        fix="give requests per second, e.g. poisson:2")


def _check_n(n: int, where: str) -> None:
    if not 1 <= n <= MAX_REQUESTS:
        raise SpecError(f"number of requests must be 1..{MAX_REQUESTS}, got {n}", where=where, fix="e.g. ,100")


def _build(name: str, gaps: np.ndarray, prompt: Length, output: Length, rng: np.random.Generator,
           meta: dict[str, object]) -> Workload:
    n = len(gaps)
    t = np.cumsum(gaps) - gaps[0]  # the first request arrives at t = 0
    p = _lengths(rng, prompt, n, "prompt tokens")
    o = _lengths(rng, output, n, "output tokens")
    return Workload(tuple(RequestSpec(i, float(t[i]), int(p[i]), int(o[i])) for i in range(n)), name, meta)


def poisson(rate: float, n: int, *, prompt: Length = 16, output: Length = 32, seed: int = 0) -> Workload:
    """Poisson arrivals: exponential gaps of mean 1/rate."""
    _check_rate(rate, "poisson")
    _check_n(n, "poisson")
    rng = np.random.default_rng([seed, 1])
    return _build(f"poisson:{rate:g},{n}", rng.exponential(1.0 / rate, n), prompt, output, rng,
                  {"process": "poisson", "rate": rate, "seed": seed})


def gamma(rate: float, cv: float, n: int, *, prompt: Length = 16, output: Length = 32, seed: int = 0) -> Workload:
    """Gamma-distributed gaps of mean 1/rate and coefficient of variation cv (shape 1/cv^2)."""
    _check_rate(rate, "gamma")
    _check_n(n, "gamma")
    if not (math.isfinite(cv) and cv > 0):
        raise SpecError(f"coefficient of variation must be > 0, got {cv}", where="gamma",
                        fix="e.g. gamma:2,3 (CV 3: bursty)")
    shape = 1.0 / cv**2
    rng = np.random.default_rng([seed, 2])
    return _build(f"gamma:{rate:g},{cv:g},{n}", rng.gamma(shape, 1.0 / (rate * shape), n), prompt, output, rng,
                  {"process": "gamma", "rate": rate, "cv": cv, "seed": seed})


def onoff(rate: float, on_s: float, off_s: float, n: int, *, prompt: Length = 16, output: Length = 32,
          seed: int = 0) -> Workload:
    """Bursty on/off source: Poisson at `rate` for `on_s` seconds, then nothing for `off_s`, repeated."""
    _check_rate(rate, "onoff")
    _check_n(n, "onoff")
    if not (on_s > 0 and off_s >= 0):
        raise SpecError(f"on/off periods must be > 0 and >= 0 s, got {on_s}, {off_s}", where="onoff",
                        fix="e.g. onoff:4,5,10")
    rng = np.random.default_rng([seed, 3])
    times: list[float] = []
    t = 0.0  # time within the 'on' clock (off periods inserted below)
    while len(times) < n:
        t += float(rng.exponential(1.0 / rate))
        cycle = math.floor(t / on_s)
        times.append(t + cycle * off_s)
    arr = np.asarray(times)
    gaps = np.diff(np.concatenate([[arr[0]], arr]))
    gaps[0] = 0.0
    return _build(f"onoff:{rate:g},{on_s:g},{off_s:g},{n}", gaps, prompt, output, rng,
                  {"process": "onoff", "rate": rate, "on_s": on_s, "off_s": off_s, "seed": seed,
                   "mean_rate": rate * on_s / (on_s + off_s)})


def constant(rate: float, n: int, *, prompt: Length = 16, output: Length = 32, seed: int = 0) -> Workload:
    """One request every 1/rate seconds."""
    _check_rate(rate, "constant")
    _check_n(n, "constant")
    rng = np.random.default_rng([seed, 4])
    return _build(f"constant:{rate:g},{n}", np.full(n, 1.0 / rate), prompt, output, rng,
                  {"process": "constant", "rate": rate, "seed": seed})


# ------------------------------------------------------------------------------------ trace files
def _pick(row: dict[str, str], keys: Iterable[str]) -> str | None:
    for k in keys:
        if k in row and str(row[k]).strip() != "":
            return row[k]
    return None


def _from_rows(rows: Sequence[dict[str, object]], where: str) -> list[RequestSpec]:
    out: list[RequestSpec] = []
    for i, raw in enumerate(rows):
        row = {str(k).strip().lower(): str(v) for k, v in raw.items() if k is not None}
        akey = next((k for k in ARRIVAL_KEYS if k in row and row[k].strip() != ""), None)
        p, o = _pick(row, PROMPT_KEYS), _pick(row, OUTPUT_KEYS)
        if akey is None or p is None or o is None:
            missing = [n for n, v in (("arrival", akey), ("prompt tokens", p), ("output tokens", o)) if v is None]
            raise SpecError(f"row {i + 1} has no {' / '.join(missing)} column", where=where,
                            fix="columns arrival_s,prompt_tokens,output_tokens (or Vidur's arrived_at,"
                                "num_prefill_tokens,num_decode_tokens; LLMServingSim's arrival_time_ns,input_toks,"
                                "output_toks)")
        try:
            arrival = float(row[akey]) * ARRIVAL_KEYS[akey]
            pt, ot = int(float(p)), int(float(o))
        except ValueError:
            raise SpecError(f"row {i + 1}: not a number ({row[akey]!r}, {p!r}, {o!r})", where=where,
                            fix="arrival in seconds, token counts as integers") from None
        if not (math.isfinite(arrival) and arrival >= 0) or pt < 1 or ot < 1:
            raise SpecError(f"row {i + 1}: arrival must be >= 0 and lengths >= 1 (got {arrival}, {pt}, {ot})",
                            where=where, fix="fix or drop the row")
        rid = int(float(row["rid"])) if row.get("rid", "").strip() not in ("",) and "rid" in row else i
        out.append(RequestSpec(rid, arrival, pt, ot))
        if len(out) > MAX_REQUESTS:
            raise SpecError(f"more than {MAX_REQUESTS} requests", where=where, fix="split the trace")
    if len({r.rid for r in out}) != len(out):
        raise SpecError("request ids (rid) repeat", where=where, fix="give every row a distinct rid or drop the column")
    return out


def load_trace(path: str | Path) -> Workload:
    """A workload from a CSV or JSONL trace file (arrival times shifted so the first is 0)."""
    p = Path(path)
    where = str(path)
    if not p.is_file():
        raise SpecError("no such trace file", where=where, fix="give a CSV/JSONL file or poisson:RATE[,N]")
    text = p.read_text(encoding="utf-8", errors="replace")
    rows: list[dict[str, object]]
    if p.suffix.lower() in (".jsonl", ".ndjson") or text.lstrip().startswith("{"):
        rows = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SpecError(f"line {i + 1} is not JSON ({exc.msg})", where=where, fix="one JSON object per line") from None
            if not isinstance(obj, dict):
                raise SpecError(f"line {i + 1} is not a JSON object", where=where, fix="one JSON object per line")
            rows.append(obj)
    else:
        rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise SpecError("the trace has no requests", where=where, fix="add rows after the header")
    reqs = _from_rows(rows, where)
    t0 = min(r.arrival for r in reqs)
    reqs = [replace(r, arrival=r.arrival - t0) for r in reqs]
    return Workload(tuple(sorted(reqs, key=lambda r: (r.arrival, r.rid))), p.name, {"process": "trace", "file": where})


# ------------------------------------------------------------------------------------ the CLI form
PROCESSES = ("poisson", "gamma", "onoff", "constant")


def parse_workload(spec: str, *, prompt: Length = 16, output: Length = 32, seed: int = 0,
                   default_n: int = 100) -> Workload:
    """`FILE | poisson:RATE[,N] | gamma:RATE,CV[,N] | onoff:RATE,ON,OFF[,N] | constant:RATE[,N]`."""
    s = spec.strip()
    head, sep, rest = s.partition(":")
    if not sep or head.lower() not in PROCESSES:
        if Path(s).exists() or not sep:
            return load_trace(s)
        raise SpecError(f"unknown arrival process {head!r}", where=f"--workload {spec}",
                        fix=f"use FILE or one of {', '.join(p + ':RATE[,...]' for p in PROCESSES)}")
    kind = head.lower()
    try:
        args = [float(x) for x in rest.split(",") if x.strip() != ""]
    except ValueError:
        raise SpecError(f"{rest!r} are not numbers", where=f"--workload {spec}", fix="e.g. poisson:2,100") from None
    need = {"poisson": 1, "constant": 1, "gamma": 2, "onoff": 3}[kind]
    if not need <= len(args) <= need + 1:
        forms = {"poisson": "poisson:RATE[,N]", "constant": "constant:RATE[,N]", "gamma": "gamma:RATE,CV[,N]",
                 "onoff": "onoff:RATE,ON_S,OFF_S[,N]"}
        raise SpecError(f"{kind} takes {need} or {need + 1} numbers, got {len(args)}", where=f"--workload {spec}",
                        fix=f"use {forms[kind]}")
    n_f = args[need] if len(args) > need else float(default_n)
    if n_f != int(n_f):
        raise SpecError(f"number of requests must be an integer, got {n_f}", where=f"--workload {spec}", fix="e.g. ,100")
    n = int(n_f)
    kw = {"prompt": prompt, "output": output, "seed": seed}
    where = f"--workload {spec}"
    try:
        if kind == "poisson":
            return poisson(args[0], n, **kw)  # type: ignore[arg-type]
        if kind == "constant":
            return constant(args[0], n, **kw)  # type: ignore[arg-type]
        if kind == "gamma":
            return gamma(args[0], args[1], n, **kw)  # type: ignore[arg-type]
        return onoff(args[0], args[1], args[2], n, **kw)  # type: ignore[arg-type]
    except SpecError as exc:
        raise SpecError(exc.what, where=where, fix=exc.fix) from None
