"""Per-request serving metrics, defined once for the simulator and the load generator.

Definitions (LLMServingSim's and vLLM bench's, reference speculation-and-serving.md 4.4):
- TTFT = first token - arrival (queueing and prefill included);
- TPOT = (last token - first token) / (output tokens - 1), per request (vLLM's convention, which
  SLOs gate on);
- ITL = every gap between consecutive tokens, pooled over requests;
- E2E = last token - arrival; queueing delay = admission (the request got a slot or joined a
  batch) - arrival;
- goodput = requests per second that meet every SLO given (TTFT, TPOT, E2E), over the time from
  the first arrival to the last token; attainment = those requests / all requests (failed ones
  count as missing the SLO, as BLIS counts them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import SpecError

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class SLO:
    """Latency objectives in milliseconds (None: not gated)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @classmethod
    def parse(cls, text: str) -> SLO:
        """`ttft:2000,tpot:200[,e2e:MS]` (milliseconds), as vLLM bench's --goodput."""
        vals: dict[str, float] = {}
        for part in text.split(","):
            k, sep, v = part.partition(":")
            k = k.strip().lower()
            if not sep or k not in ("ttft", "tpot", "e2e", "e2el"):
                raise SpecError(f"{part!r} is not KEY:MS with KEY ttft, tpot or e2e", where=f"--slo {text}",
                                fix="e.g. --slo ttft:2000,tpot:200")
            try:
                x = float(v)
            except ValueError:
                raise SpecError(f"{v!r} is not a number of milliseconds", where=f"--slo {text}", fix="e.g. tpot:200") from None
            if not x > 0:
                raise SpecError(f"{k} must be > 0 ms", where=f"--slo {text}", fix="e.g. tpot:200")
            vals["e2e" if k == "e2el" else k] = x
        return cls(vals.get("ttft"), vals.get("tpot"), vals.get("e2e"))

    def to_json(self) -> dict[str, float | None]:
        return {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "e2e_ms": self.e2e_ms}

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None


@dataclass
class RequestRecord:
    """What happened to one request (times in seconds on one clock, the workload's origin)."""

    rid: int
    arrival: float
    prompt_tokens: int
    max_tokens: int
    token_times: list[float] = field(default_factory=list)
    admitted: float | None = None
    status: str = "ok"  # ok | error | cancelled | rejected
    error: str = ""
    restarts: int = 0  # times it was re-prefilled after a device left
    finish_reason: str = ""
    # measured only: the server's own times of this request on the same clock (received, admitted,
    # first_token: where a client-side TTFT goes -- HTTP in, queue, prefill, SSE out); empty when predicted
    server: dict[str, float] = field(default_factory=dict)

    @property
    def n_out(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival if self.token_times else math.nan

    @property
    def tpot(self) -> float:
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else math.nan

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.arrival if self.token_times else math.nan

    @property
    def queue(self) -> float:
        return self.admitted - self.arrival if self.admitted is not None else math.nan

    def itl(self) -> list[float]:
        return np.diff(self.token_times).tolist() if len(self.token_times) > 1 else []

    def meets(self, slo: SLO) -> bool:
        if self.status != "ok" or not self.token_times:
            return False
        for lim, v in ((slo.ttft_ms, self.ttft), (slo.tpot_ms, self.tpot), (slo.e2e_ms, self.e2e)):
            if lim is not None and not (math.isnan(v) or v * 1e3 <= lim):
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        def ms(x: float) -> float | None:
            return None if math.isnan(x) else round(x * 1e3, 4)

        return {"rid": self.rid, "arrival_s": round(self.arrival, 6), "prompt_tokens": self.prompt_tokens,
                "max_tokens": self.max_tokens, "output_tokens": self.n_out, "status": self.status,
                "ttft_ms": ms(self.ttft), "tpot_ms": ms(self.tpot), "e2e_ms": ms(self.e2e),
                "queue_ms": ms(self.queue), "restarts": self.restarts, "finish_reason": self.finish_reason,
                **({"error": self.error} if self.error else {})}


def stats(values: Iterable[float], percentiles: Sequence[int] = PERCENTILES) -> dict[str, float | None]:
    """Mean and percentiles (ms) of seconds `values`, NaNs dropped; None when there are none."""
    v = np.asarray([x for x in values if not math.isnan(x)], float) * 1e3
    if v.size == 0:
        return {"mean": None, **{f"p{p}": None for p in percentiles}, "n": 0}
    out: dict[str, float | None] = {"mean": float(v.mean())}
    out.update({f"p{p}": float(np.percentile(v, p)) for p in percentiles})
    out["n"] = int(v.size)
    return out


def summarize(records: Sequence[RequestRecord], slo: SLO | None = None) -> dict[str, Any]:
    """Workload-level numbers: counts, throughput, TTFT/TPOT/E2E/queue/ITL stats, goodput."""
    slo = slo or SLO()
    ok = [r for r in records if r.status == "ok"]
    t0 = min((r.arrival for r in records), default=0.0)
    t1 = max((r.token_times[-1] for r in records if r.token_times), default=t0)
    dur = t1 - t0
    toks = sum(r.n_out for r in records)
    good = [r for r in records if r.meets(slo)]
    out: dict[str, Any] = {
        "requests": len(records), "completed": len(ok),
        "failed": sum(r.status == "error" for r in records),
        "cancelled": sum(r.status == "cancelled" for r in records),
        "rejected": sum(r.status == "rejected" for r in records),
        "restarted": sum(r.restarts > 0 for r in records),
        "duration_s": dur,
        "throughput_req_s": len(ok) / dur if dur > 0 else None,
        "throughput_tok_s": toks / dur if dur > 0 else None,
        "ttft_ms": stats(r.ttft for r in ok), "tpot_ms": stats(r.tpot for r in ok),
        "e2e_ms": stats(r.e2e for r in ok), "queue_ms": stats(r.queue for r in ok),
        "itl_ms": stats(x for r in ok for x in r.itl()),
        "slo": slo.to_json(),
        "goodput_req_s": len(good) / dur if dur > 0 else None,
        "slo_attainment": len(good) / len(records) if records else None,
    }
    return out
