"""Trace and metrics: one schema for what the simulator predicts and what the runtime measures.

A Trace holds per-token timestamps, per-device busy intervals per resource, counters sampled over
time (page-cache residency, memory in use) and per-device totals (disk bytes, link bytes, page
faults). `metrics()` turns either side's trace into the same numbers; `result_json()` gives the
`--json` object of the command-line contract; `to_chrome()` a Chrome/Perfetto timeline.

Metric definitions (LLMServingSim's, used on both sides):
- TTFT = time of the first generated token - request arrival (prefill and queueing included)
- TPOT = (t_last - t_first) / (n_out - 1) per request; P50/P90 over all inter-token gaps
- throughput = generated tokens / (last token time - first arrival)
- memory pressure (prima.cpp) = (mem_available before - mem_available during) / mem_total,
  where available counts free + reclaimable pages, so only non-reclaimable use counts
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from .io import atomic_write_text

RESOURCES = ("cpu", "gpu", "disk", "net", "send", "recv", "wait", "pcie", "prefetch")


@runtime_checkable
class Recorder(Protocol):
    """What records one device's run in this schema, simulated or measured: spans of work on its
    resources (a Span without the device), samples of a quantity over time, counters. The
    simulator's (`primasim.sim.Recorder.device(name)`, straight into a Trace) and the worker's
    (`primasim.runtime.worker.Recorder`, spilled to disk, then filed by the head under the device
    with `Trace.add_device`) both are one."""

    def span(self, resource: str, start: float, end: float, name: str = "", seq: int = 0, token: int = -1,
             nbytes: float = 0.0) -> None: ...

    def sample(self, name: str, t: float, value: float) -> None: ...

    def add(self, key: str, v: float) -> None: ...


@dataclass
class Span:
    device: str
    resource: str  # one of RESOURCES
    start: float  # seconds from the trace origin
    end: float
    name: str = ""
    seq: int = 0
    token: int = -1
    nbytes: float = 0.0


@dataclass
class TokenStamp:
    seq: int  # request / sequence id
    index: int  # 0 = first generated token
    time: float
    token_id: int = -1


@dataclass
class Sample:
    device: str
    name: str  # e.g. "resident_bytes", "mem_used_bytes"
    time: float
    value: float


@dataclass
class Request:
    seq: int
    arrival: float
    prompt_tokens: int
    max_new_tokens: int


@dataclass
class Trace:
    source: Literal["sim", "run"]
    system: str
    requests: list[Request] = field(default_factory=list)
    tokens: list[TokenStamp] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    # device -> totals: disk_read_bytes, net_tx_bytes, net_rx_bytes, page_faults, mem_total,
    # mem_avail_before, mem_avail_min, ...
    device_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # -------------------------------------------------------------- building
    def span(self, device: str, resource: str, start: float, end: float, name: str = "", **kw: Any) -> None:
        self.spans.append(Span(device, resource, start, end, name, **kw))

    def token(self, seq: int, index: int, time: float, token_id: int = -1) -> None:
        self.tokens.append(TokenStamp(seq, index, time, token_id))

    def add_stat(self, device: str, key: str, value: float) -> None:
        d = self.device_stats.setdefault(device, {})
        d[key] = d.get(key, 0.0) + value

    def add_device(self, device: str, spans: list[list[Any]], samples: list[list[Any]], offset: float) -> None:
        """File one device's recorded spans [resource, start, end, name, seq, token, nbytes] and
        samples [name, time, value] (a worker Recorder's `stats()`), times shifted by -offset;
        spans that ended before the offset (the run's start) are left out."""
        for res, a, b, name, seq, tok, nb in spans:
            if b >= offset - 1e-3:
                self.span(device, res, max(0.0, a - offset), b - offset, name, seq=seq, token=tok, nbytes=nb)
        for name, t, v in samples:
            self.samples.append(Sample(device, name, t - offset, float(v)))

    # -------------------------------------------------------------- views
    def tokens_frame(self) -> Any:
        import pandas as pd  # frames only (pandas is slow to import)

        return pd.DataFrame([asdict(t) for t in self.tokens], columns=["seq", "index", "time", "token_id"])

    def spans_frame(self) -> Any:
        import pandas as pd  # frames only (pandas is slow to import)

        cols = ["device", "resource", "start", "end", "name", "seq", "token", "nbytes"]
        df = pd.DataFrame([asdict(s) for s in self.spans], columns=cols)
        df["duration"] = df["end"] - df["start"]
        return df

    def samples_frame(self) -> Any:
        import pandas as pd  # frames only (pandas is slow to import)

        return pd.DataFrame([asdict(s) for s in self.samples], columns=["device", "name", "time", "value"])

    def busy(self, device: str, resource: str, t0: float = 0.0, t1: float = math.inf) -> float:
        """Busy time of a resource, overlapping spans merged, clipped to [t0, t1]."""
        return _merged_length([(s.start, s.end) for s in self.spans if s.device == device and s.resource == resource],
                              t0, t1)

    # -------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "system": self.system, "meta": self.meta,
                "requests": [asdict(r) for r in self.requests], "tokens": [asdict(t) for t in self.tokens],
                "spans": [asdict(s) for s in self.spans], "samples": [asdict(s) for s in self.samples],
                "device_stats": self.device_stats}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trace:
        return cls(source=d["source"], system=d["system"], meta=d.get("meta", {}),
                   requests=[Request(**r) for r in d.get("requests", [])],
                   tokens=[TokenStamp(**t) for t in d.get("tokens", [])],
                   spans=[Span(**s) for s in d.get("spans", [])],
                   samples=[Sample(**s) for s in d.get("samples", [])],
                   device_stats=d.get("device_stats", {}))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict()))

    def to_chrome(self) -> dict[str, Any]:
        """Chrome trace-event JSON (open in chrome://tracing or ui.perfetto.dev)."""
        devices = sorted({s.device for s in self.spans} | {s.device for s in self.samples} | set(self.device_stats))
        pid = {d: i + 1 for i, d in enumerate(devices)}
        tid = {r: i + 1 for i, r in enumerate(RESOURCES)}
        ev: list[dict[str, Any]] = []
        for d, p in pid.items():
            ev.append({"ph": "M", "name": "process_name", "pid": p, "args": {"name": d}})
            for r, t in tid.items():
                ev.append({"ph": "M", "name": "thread_name", "pid": p, "tid": t, "args": {"name": r}})
        for s in self.spans:
            ev.append({"ph": "X", "name": s.name or s.resource, "cat": s.resource, "pid": pid[s.device],
                       "tid": tid.get(s.resource, len(tid) + 1), "ts": s.start * 1e6,
                       "dur": max(0.0, s.end - s.start) * 1e6,
                       "args": {"seq": s.seq, "token": s.token, "bytes": s.nbytes}})
        for t in self.tokens:
            ev.append({"ph": "i", "name": f"token {t.index} (seq {t.seq})", "s": "g", "ts": t.time * 1e6,
                       "pid": 0, "tid": 0, "args": {"token_id": t.token_id}})
        for s in self.samples:
            ev.append({"ph": "C", "name": s.name, "pid": pid[s.device], "ts": s.time * 1e6, "args": {s.name: s.value}})
        return {"traceEvents": ev, "displayTimeUnit": "ms",
                "otherData": {"source": self.source, "system": self.system, **{k: str(v) for k, v in self.meta.items()}}}

    def save_chrome(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_chrome()))


# ------------------------------------------------------------------ metrics
@dataclass
class Metrics:
    tpot_ms: float
    tpot_p50_ms: float
    tpot_p90_ms: float
    ttft_ms: float
    throughput_tok_s: float
    n_tokens: int
    makespan_s: float
    memory_pressure: dict[str, float]
    gpu_util: dict[str, float]
    busy: dict[str, dict[str, float]]  # device -> resource -> fraction of makespan
    disk_read_bytes: dict[str, float]
    net_tx_bytes: dict[str, float]
    devices: dict[str, dict[str, float]] = field(default_factory=dict)  # device_memory()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _merged_length(intervals: list[tuple[float, float]], t0: float = 0.0, t1: float = math.inf) -> float:
    """Length of the union of `intervals`, clipped to [t0, t1]."""
    iv = sorted((max(a, t0), min(b, t1)) for a, b in intervals if b > t0 and a < t1)
    total, cur_s, cur_e = 0.0, 0.0, None
    for a, b in iv:
        if cur_e is None or a > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def metrics(trace: Trace) -> Metrics:
    """The contract's metrics, computed the same way from a simulated or a measured trace."""
    by_seq: dict[int, list[TokenStamp]] = {}
    for t in trace.tokens:
        by_seq.setdefault(t.seq, []).append(t)
    arrivals = {r.seq: r.arrival for r in trace.requests}
    ttfts, tpots, gaps = [], [], []
    for seq, toks in by_seq.items():
        toks.sort(key=lambda t: t.index)
        first = toks[0].time
        ttfts.append(first - arrivals.get(seq, 0.0))
        if len(toks) > 1:
            tpots.append((toks[-1].time - first) / (len(toks) - 1))
            gaps.extend(np.diff([t.time for t in toks]).tolist())
    n = len(trace.tokens)
    t_start = min(arrivals.values()) if arrivals else 0.0
    t_end = max((t.time for t in trace.tokens), default=0.0)
    span_end = max((s.end for s in trace.spans), default=t_end)
    makespan = max(t_end, span_end) - t_start
    devices = sorted(set(trace.device_stats) | {s.device for s in trace.spans})
    pressure = {}
    for d in devices:
        st = trace.device_stats.get(d, {})
        if "memory_pressure" in st:
            pressure[d] = st["memory_pressure"]
        elif {"mem_total", "mem_avail_before", "mem_avail_min"} <= st.keys() and st["mem_total"] > 0:
            pressure[d] = max(0.0, (st["mem_avail_before"] - st["mem_avail_min"]) / st["mem_total"])
    by_res: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for s in trace.spans:  # one pass over the spans (a long simulated run has millions)
        by_res.setdefault((s.device, s.resource), []).append((s.start, s.end))
    busy = {d: {r: (_merged_length(by_res[(d, r)], t_start, t_start + makespan) / makespan if makespan > 0 else 0.0)
                for r in RESOURCES if (d, r) in by_res}
            for d in devices}
    gpu_util = {d: b["gpu"] for d, b in busy.items() if "gpu" in b}
    return Metrics(
        tpot_ms=float(np.mean(tpots) * 1e3) if tpots else float("nan"),
        tpot_p50_ms=float(np.percentile(gaps, 50) * 1e3) if gaps else float("nan"),
        tpot_p90_ms=float(np.percentile(gaps, 90) * 1e3) if gaps else float("nan"),
        ttft_ms=float(np.mean(ttfts) * 1e3) if ttfts else float("nan"),
        throughput_tok_s=n / (t_end - t_start) if t_end > t_start else float("nan"),
        n_tokens=n,
        makespan_s=makespan,
        memory_pressure=pressure,
        gpu_util=gpu_util,
        busy=busy,
        disk_read_bytes={d: trace.device_stats.get(d, {}).get("disk_read_bytes", 0.0) for d in devices},
        net_tx_bytes={d: trace.device_stats.get(d, {}).get("net_tx_bytes", 0.0) for d in devices},
        devices=device_memory(trace, n),
    )


def device_memory(trace: Trace, n_tokens: int) -> dict[str, dict[str, float]]:
    """Per device, the memory a user sees (MB = 1e6 bytes): `anon_mb`, anonymous memory the run
    added (KV caches, activations, any copy of weights; measured: the worker's peak RssAnon since
    generation began above its footprint after set-up -- Python, JAX, compiled code; predicted: what
    the device reserves); `file_mb`, its weights resident in the page cache (measured with mincore
    at the end of the run; predicted: what the residency keeps); `disk_read_mb_per_token`."""
    out: dict[str, dict[str, float]] = {}
    for d, st in trace.device_stats.items():
        if "anon_peak_bytes" in st and "anon_footprint_bytes" in st:
            anon = max(0.0, st["anon_peak_bytes"] - st["anon_footprint_bytes"])
            file_ = st.get("file_resident_bytes", 0.0)
        elif "anon_bytes" in st:
            last = [x.value for x in sorted(trace.samples, key=lambda x: x.time)
                    if x.device == d and x.name == "resident_bytes"]
            anon, file_ = st["anon_bytes"], st.get("resident_weight_bytes", last[-1] if last else 0.0)
        else:
            continue
        out[d] = {"anon_mb": anon / 1e6, "file_mb": file_ / 1e6,
                  "disk_read_mb_per_token": st.get("disk_read_bytes", 0.0) / max(1, n_tokens) / 1e6}
    return out


def result_json(system: str, *, feasible: bool, plan: Any = None, m: Metrics | None = None,
                reason: str = "", **extra: Any) -> dict[str, Any]:
    """The `--json` object of the command-line contract (simulate, run, plan)."""
    plan_json = None
    if plan is not None:
        pj = plan.to_json() if hasattr(plan, "to_json") else dict(plan)
        plan_json = pj
    out: dict[str, Any] = {
        "system": system,
        "feasible": feasible,
        "reason": reason,
        "tpot_ms": None, "tpot_p50_ms": None, "tpot_p90_ms": None, "ttft_ms": None,
        "throughput_tok_s": None, "memory_pressure": {},
        "plan": plan_json,
    }
    if m is not None:
        out.update(tpot_ms=_nan_to_none(m.tpot_ms), tpot_p50_ms=_nan_to_none(m.tpot_p50_ms),
                   tpot_p90_ms=_nan_to_none(m.tpot_p90_ms), ttft_ms=_nan_to_none(m.ttft_ms),
                   throughput_tok_s=_nan_to_none(m.throughput_tok_s), memory_pressure=m.memory_pressure,
                   gpu_util=m.gpu_util, disk_read_bytes=m.disk_read_bytes, net_tx_bytes=m.net_tx_bytes,
                   n_tokens=m.n_tokens, devices=m.devices)
    out.update(extra)
    return out
