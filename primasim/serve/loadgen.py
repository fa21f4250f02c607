"""Load generator: replay a `Workload` against an OpenAI-compatible server and measure every request.

Each request is sent at its arrival time (open loop: arrivals do not wait for earlier answers) as a
streaming completion with a prompt of exactly its prompt length in token ids and
``max_tokens`` = its output length with ``ignore_eos`` (so lengths match the workload, as
benchmarkers do with vLLM's ``min_tokens``/``ignore_eos``). Client-side times give TTFT, TPOT,
ITL and E2E per request (`primasim.core.serving.RequestRecord`, the simulator's schema); the
server's ``timings`` in the last chunk give the queueing delay (admission - receipt).

    python -m primasim.serve.loadgen --url http://127.0.0.1:8000/v1 --model M --workload poisson:1,40 --out r.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from primasim.core.serving import SLO, RequestRecord, summarize
from primasim.core.workload import Workload, parse_workload


def prompt_ids(rid: int, n: int, vocab: int) -> list[int]:
    """A deterministic prompt of n token ids (distinct per request, never 0)."""
    return [1 + (rid * 7919 + 31 * i) % (vocab - 1) for i in range(n)]


async def _one(client: Any, model: str, spec: Any, t0: float, vocab: int, rec: RequestRecord,
               timeout: float) -> None:
    delay = t0 + spec.arrival - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    sent = time.monotonic()
    rec.arrival = sent - t0  # the real send time (late if the client lagged)
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt_ids(spec.rid, spec.prompt_tokens, vocab), max_tokens=spec.output_tokens,
            temperature=0, stream=True, timeout=timeout, extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.monotonic() - t0
            if not chunk.choices:
                continue
            ch = chunk.choices[0]
            if ch.finish_reason is None:
                rec.token_times.append(now)
            else:
                rec.finish_reason = ch.finish_reason
                tm = (chunk.model_extra or {}).get("timings") or {}
                if tm.get("queue_ms") is not None:
                    rec.admitted = rec.arrival + float(tm["queue_ms"]) / 1e3
                # the server's wall-clock times on this clock (same host: time.time() - time.monotonic())
                off = time.time() - time.monotonic() + t0
                rec.server = {k: float(tm[k]) - off for k in ("received", "admitted", "first_token")
                              if tm.get(k) is not None}
                rec.restarts = int(tm.get("restarts") or 0)
        if rec.n_out != spec.output_tokens:
            rec.status, rec.error = "error", f"{rec.n_out} of {spec.output_tokens} tokens"
    except Exception as exc:  # every failure is a result, not a crash of the generator
        rec.status, rec.error = "error", f"{type(exc).__name__}: {exc}"


async def replay_async(url: str, model: str, workload: Workload, *, api_key: str = "x", vocab: int = 32000,
                       timeout: float = 600.0, t0: float | None = None) -> list[RequestRecord]:
    """`t0`: the time.monotonic() of the workload's time 0 (default: now); record times are relative to it."""
    import httpx2 as httpx
    import openai

    limits = httpx.Limits(max_connections=len(workload) + 8, max_keepalive_connections=len(workload) + 8)
    client = openai.AsyncOpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=timeout,
                                http_client=openai.DefaultAsyncHttpxClient(limits=limits))
    recs = [RequestRecord(r.rid, r.arrival, r.prompt_tokens, r.output_tokens) for r in workload]
    t0 = time.monotonic() + 0.05 if t0 is None else t0
    try:
        await asyncio.gather(*(_one(client, model, spec, t0, vocab, rec, timeout)
                               for spec, rec in zip(workload, recs)))
    finally:
        await client.close()
    return recs


def replay(url: str, model: str, workload: Workload, **kw: Any) -> list[RequestRecord]:
    """Replay `workload` against the server at `url` (blocking); one record per request."""
    return asyncio.run(replay_async(url, model, workload, **kw))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m primasim.serve.loadgen", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="base URL with /v1, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", required=True, help="model id the server serves")
    ap.add_argument("--workload", required=True, help="FILE | poisson:RATE[,N] | gamma:RATE,CV[,N] | ...")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=32000, help="prompt ids are drawn below this")
    ap.add_argument("--api-key", default="x")
    ap.add_argument("--slo", default=None, help="ttft:MS,tpot:MS for goodput")
    ap.add_argument("--out", default=None, help="write records + summary as JSON")
    a = ap.parse_args(argv)
    from primasim.core.errors import PrimasimError
    from primasim.core.io import atomic_write_json

    try:
        wl = parse_workload(a.workload, prompt=a.prompt_tokens, output=a.tokens, seed=a.seed)
        slo = SLO.parse(a.slo) if a.slo else None
    except PrimasimError as exc:
        print(f"loadgen: error: {exc.message}", file=sys.stderr)
        return 2
    recs = replay(a.url, a.model, wl, api_key=a.api_key, vocab=a.vocab)
    out = {"workload": wl.name, "summary": summarize(recs, slo), "requests": [r.to_json() for r in recs]}
    if a.out:
        atomic_write_json(a.out, out)
    print(json.dumps(out["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
