"""Speculative decoding on the ring: a draft model proposes K tokens, one ring pass verifies K + 1.

Per pass (prima.cpp's `llama-speculative`, reference speculation-and-serving.md section 2.3):

1. the draft, standalone on its device (the head by default, its CPU or GPU; pinned, never
   faulted), drafts K tokens one after the other; its first step also takes the token(s) it has
   not seen yet (the last pass's new token, and its last draft when all K were accepted);
2. the head embeds the K + 1 positions (the last accepted token and the drafts) and they walk the
   ring as one batch: every window computes all K + 1 positions (weights read once, FLOPs, KV
   appends and activations scale with K + 1), the head computes K + 1 rows of logits;
3. the acceptance model (`primasim.core.speculation`) says how many drafts pass; the pass emits
   them and one token of the target's own at its end (a burst), and the KV caches roll back to the
   accepted positions (the next pass overwrites the rest: nothing to move or free).

The draft's memory is taken from its device before anything else (`with_draft`): the target's
page cache and the runtime's residency budget see the device without it, as prima.cpp's target
sees the head with the draft already pinned. With a draft on another device than the head, the
head sends it the accepted tokens and it sends back the drafts (two small messages per pass).

`SimConfig(runtime=True)` models primasim's runtime doing the same (runtime/speculative.py): one
jitted call per draft step (embedding, all draft blocks, head), the verification as one batched
call per window and one call for the K + 1 rows of logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from primasim.core.errors import SpecError
from primasim.core.model import ModelSpec
from primasim.core.plan import violations
from primasim.core.runtime_facts import draft_reserve
from primasim.core.speculation import (
    DraftSpec,
    check_compatible,
    draft_bytes,
    draft_placement,
    parse_acceptance,
    summarize,
    with_draft,
)
from primasim.plan.draft import plan_speculative

from ._context import SimContext, SimResult, infeasible
from ._devices import SimDevice
from ._engine import Proc
from ._ring import Ring, RingOptions, _shift, ring_head
from ._runtime import MIN_SPAN, RuntimeRing, attention_span
from ._systems import get_system
from ._timing import DeviceTiming, kv_span

TOKEN_MSG_BYTES = 64.0  # a few token ids plus the ring's message header


class Drafter:
    """The draft model on its device: per-step service times and the acceptance draws."""

    def __init__(self, ctx: SimContext, draft: DraftSpec, head: str, *, runtime: bool, max_seq: int) -> None:
        self.ctx, self.draft, self.head = ctx, draft, head
        self.name, self.where = draft_placement(draft, ctx.cluster, head, ctx.plan.n_ctx if ctx.plan else 1024)
        if runtime:
            self.where = "cpu"  # primasim's runtime computes on CPUs only
        self.dev: SimDevice = ctx.dev(self.name)
        self.model: ModelSpec = draft.model
        self.runtime = runtime
        self.max_seq = max_seq
        self.acceptance = parse_acceptance(draft.acceptance)
        if hasattr(self.acceptance, "i"):
            self.acceptance = dataclasses.replace(self.acceptance, i=0)  # a replay starts at its first pass
        self.rng = np.random.default_rng([ctx.cfg.seed, 18])
        self.passes: list[tuple[int, int]] = []
        self._timing: dict[float, DeviceTiming] = {}

    # ---------------------------------------------------------------- service times
    def _tm(self, rows: int) -> DeviceTiming:
        sp = self.dev.spec
        bw = sp.gemm_bw_at(rows) if (self.runtime and rows > 1) else 0.0
        key = bw if bw > 0 else 0.0
        if key not in self._timing:
            spec = sp.replace(ram_bw=bw) if bw > 0 else sp
            self._timing[key] = DeviceTiming(spec, self.model, roofline=self.ctx.cfg.roofline and not self.runtime)
        return self._timing[key]

    def step_time(self, n_tokens: int, filled: int) -> float:
        """One draft step: `n_tokens` new tokens with `filled` positions in the draft's context,
        through every draft block and its output layer (last position only)."""
        tm = self._tm(n_tokens)
        if self.runtime:
            span = attention_span(filled, self.max_seq)
            layer = tm.layer("cpu", n_tokens, span, pos=min(span, MIN_SPAN))
            return self.model.n_layers * layer + tm.output(1) + self.dev.spec.call_overhead
        n_kv, pos = kv_span(self.ctx.cfg.kv_read, self.ctx.plan.n_ctx if self.ctx.plan else 1024, filled)
        layer = tm.layer(self.where, n_tokens, n_kv, pos)
        out = tm.output(1, self.where)
        copies = 2 * tm.host_copy(4.0 * self.model.vocab) if self.where == "gpu" else 0.0
        return self.model.n_layers * layer + out + copies

    def server(self) -> Any:
        return self.dev.gpu if (self.where == "gpu" and self.dev.gpu is not None) else self.dev.cpu

    # ---------------------------------------------------------------- processes
    def prefill(self, prompt: int, seq: int) -> Proc:
        yield from self.server().serve(self.step_time(prompt, prompt), name=f"draft prefill {prompt}", seq=seq,
                                       token=0)

    def propose(self, k: int, first: int, filled: int, seq: int, token: int) -> Proc:
        """Draft k tokens; the first step feeds `first` tokens (1, or 2 after a full acceptance),
        the draft's context holding `filled` positions after that first step."""
        if k <= 0:
            return
        net = self.ctx.net
        if self.name != self.head:  # the accepted tokens go to the draft's device
            yield from net.send(self.head, self.name, TOKEN_MSG_BYTES, name="tokens", seq=seq, token=token)
        srv = self.server()
        for i in range(k):
            n = first if i == 0 else 1
            yield from srv.serve(self.step_time(n, filled + i), name=f"draft {i + 1}/{k}", seq=seq, token=token)
        if self.name != self.head:
            yield from net.send(self.name, self.head, TOKEN_MSG_BYTES, name="drafts", seq=seq, token=token)

    def accept(self, k: int) -> int:
        n = self.acceptance.draw(self.rng, k) if k > 0 else 0
        self.passes.append((k, n))
        return n


def _generate(ctx: SimContext, drafter: Drafter, k: int, seq: int, walk: Any) -> Proc:
    """One sequence: draft prefill, target prefill (first token), then passes of K drafts + one
    verification until `tokens` are out. `walk(n_tokens, filled_before, token, logits)` is the
    schedule's ring pass."""
    cfg = ctx.cfg
    P, N = cfg.prompt_tokens, cfg.tokens
    ctx.request(seq, P, N)
    yield from drafter.prefill(P, seq)
    yield from walk(P, 0, 0, 1)
    ctx.emit(seq, 0)
    made, filled, first = 1, P, 1  # tokens out; positions in the target's KV cache; draft's first step
    if seq == 0:
        ctx.sample_residency()
    while made < N:
        yield from drafter.propose(k, first, filled + first, seq, made)
        yield from walk(k + 1, filled, made, k + 1)
        n = drafter.accept(k)
        for _ in range(n + 1):
            if made < N:
                ctx.emit(seq, made)
                made += 1
        filled += n + 1
        first = 2 if (n == k and k > 0) else 1
        if seq == 0:
            ctx.sample_residency()


class SpecRing(Ring):
    """prima.cpp's piped ring (and llama.cpp's single device) with a draft on the head."""

    def __init__(self, ctx: SimContext, opts: RingOptions, draft: DraftSpec) -> None:
        super().__init__(ctx, opts)
        self.draft = draft
        self.drafter = Drafter(ctx, draft, self.head, runtime=False, max_seq=self.plan.n_ctx)

    def sequence(self, seq: int) -> Proc:
        def walk(n: int, filled: int, token: int, logits: int) -> Proc:
            return self.walk(n, self.n_kv(filled + n), seq, token, logits=logits)

        yield from _generate(self.ctx, self.drafter, self.draft.tokens, seq, walk)


class SpecRuntimeRing(RuntimeRing):
    """primasim's runtime with a draft on the head worker."""

    def __init__(self, ctx: SimContext, draft: DraftSpec) -> None:
        super().__init__(ctx)
        self.draft = draft
        self.drafter = Drafter(ctx, draft, self.head, runtime=True, max_seq=self.max_seq + draft.tokens)

    def sequence(self, seq: int) -> Proc:
        def walk(n: int, filled: int, token: int, logits: int) -> Proc:
            return self.walk(n, filled, seq, token, logits=logits)

        yield from _generate(self.ctx, self.drafter, self.draft.tokens, seq, walk)


def _result(ctx: SimContext, drafter: Drafter, draft: DraftSpec, original_avail: float, extra: dict[str, Any]) -> SimResult:
    # the draft's memory counts in its device's memory pressure (the context saw the device without it)
    st = ctx.trace.device_stats.setdefault(drafter.name, {})
    if "mem_avail_before" in st:
        st["mem_avail_before"] = original_avail
    n_ctx = ctx.plan.n_ctx if ctx.plan is not None else 1024
    need = draft_reserve(draft.model, n_ctx) if ctx.cfg.runtime else draft_bytes(draft.model, n_ctx)
    spec = {"draft": draft.to_json() | {"device": drafter.name, "where": drafter.where, "bytes": float(need)},
            "acceptance": drafter.acceptance.describe(), **summarize(drafter.passes),
            "pass_log": [list(p) for p in drafter.passes]}
    ctx.trace.meta["speculation"] = spec
    return ctx.result(extra={**extra, "speculation": {k: v for k, v in spec.items() if k != "pass_log"}})


def run_speculative(ctx: SimContext, entry: Any, draft: DraftSpec, original_avail: float) -> SimResult:
    """Simulate `ctx.plan` with speculative decoding (ring schedules; `ctx.cluster` is the cluster
    with the draft already loaded, `original_avail` the draft device's RAM before it)."""
    plan, cfg = ctx.plan, ctx.cfg
    assert plan is not None
    if plan.schedule != "ring":
        return infeasible(ctx.system, f"speculative decoding runs on ring schedules (one sequence), not {plan.schedule!r}",
                          plan, cfg)
    if cfg.runtime:
        rr = SpecRuntimeRing(ctx, draft)
        if rr.drafter.name != rr.head:
            return infeasible(ctx.system, "primasim's runtime runs the draft on the head device only (as prima.cpp)",
                              plan, cfg)
        rr.setup_stats()
        done = ctx.env.process(rr.main())
        ctx.run(until=done)
        extra = {"disk_read_bytes_per_token": {n: d.disk_bytes / cfg.tokens for n, d in ctx.devices.items()},
                 "residency": {n: {"mode": r.mode, "keep_fraction": r.keep_fraction, "budget": r.budget,
                                   "streamed_bytes": sum(r.streamed.values()), "resident_bytes": r.resident_bytes,
                                   "stream_prefetch": r.stream_prefetch} for n, r in rr.res.items()},
                 "engine": "primasim-runtime"}
        return _result(ctx, rr.drafter, draft, original_avail, extra)
    assert entry.ring is not None
    if entry.ring.sequences != 1 or entry.name in ("exo", "mdi-llm"):
        return infeasible(ctx.system, f"{entry.name} has no speculative decoding (prima.cpp and llama.cpp do)", plan, cfg)
    opts = entry.ring
    if plan.options.get("output_on_gpu"):
        opts = dataclasses.replace(opts, output_on_gpu=True)
    ring = SpecRing(ctx, opts, draft)
    ring.t0 = 0.0
    done = ctx.env.process(ring.main())
    ctx.run(until=done)
    _shift(ctx, getattr(ring, "t0", 0.0))
    extra = {"disk_read_bytes_per_token": {n: d.disk_bytes / cfg.tokens for n, d in ctx.devices.items()}}
    return _result(ctx, ring.drafter, draft, original_avail, extra)


def simulate_speculative(system: str, model: ModelSpec, cluster: Any, plan: Any, cfg: Any,
                         **plan_options: Any) -> SimResult:
    """`simulate()` with `cfg.draft` set: place the draft, load it (the cluster loses its bytes on
    that device), plan the target for K + 1 positions per pass unless a plan is given, simulate."""
    draft: DraftSpec = cfg.draft
    check_compatible(model, draft.model)
    entry = get_system(system)
    n_ctx = plan.n_ctx if plan is not None else int(plan_options.get("n_ctx", 1024))
    head = plan.devices[0].name if plan is not None else cluster.head
    try:
        dev, where = draft_placement(draft, cluster, head, n_ctx)
    except SpecError as exc:
        return infeasible(system, exc.what, plan, cfg)
    if cfg.runtime:
        if dev != head:
            return infeasible(system, "primasim's runtime runs the draft on the head device only (as prima.cpp)",
                              plan, cfg)
        where = "cpu"
    draft = draft.replace(device=dev, where=where)
    if plan is None:
        opts = {k: v for k, v in plan_options.items() if k != "n_ctx"}
        dp = plan_speculative(system, model, cluster, draft, n_ctx=n_ctx, prompt_tokens=cfg.prompt_tokens,
                              ks=(draft.tokens,), fixed_k=draft.tokens, where_options=[(dev, where)],
                              runtime=bool(cfg.runtime), **opts)
        if not dp.best.feasible or dp.best.plan is None:
            return infeasible(system, dp.best.reason or "no feasible plan with the draft loaded", None, cfg)
        plan = dp.best.plan
    if cfg.prefetch is not None and entry.schedule == "ring" and plan.weights == "mmap":
        plan = plan.replace(prefetch=cfg.prefetch)
    head = plan.devices[0].name if cfg.runtime else ring_head(plan)
    try:
        cl = with_draft(cluster, draft, head, n_ctx, runtime=bool(cfg.runtime))
    except SpecError as exc:
        return infeasible(system, exc.what, plan, cfg)
    vs = violations(plan, model, cl)
    if vs:
        return infeasible(system, "with the draft loaded: " + "; ".join(str(v) for v in vs), plan, cfg)
    if dev not in {d.name for d in plan.devices}:
        return infeasible(system, f"the draft's device {dev} is not in the plan", plan, cfg)
    ctx = SimContext(system, model, cl, plan, cfg)
    return run_speculative(ctx, entry, draft, cluster.device(dev).ram_avail)
