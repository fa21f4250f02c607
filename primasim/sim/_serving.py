"""Request streams on the simulated systems: arrivals, admission, batching, per-request latency,
and a device that leaves mid-stream.

`serve_workload(system, model, cluster, workload)` serves a `primasim.core.workload.Workload` (arrival
times, prompt and output lengths) and returns one `RequestRecord` per request (TTFT, TPOT, E2E,
queueing delay) plus the workload-level summary of `primasim.core.serving` (percentiles, goodput
under an SLO). Three ways to share the devices between requests:

- ``slots`` (ring systems, and primasim's runtime): S sequences in flight, each its own KV cache,
  walking the ring independently and queueing FIFO at busy devices -- MDI-LLM's recurrent
  pipeline, which is what ``primasim serve`` executes. A request waits for a free slot, is
  prefilled as one pass, then decodes one token per pass.
- ``continuous`` (ring systems): llama.cpp's server (prima.cpp's ``-np N --cont-batching``): one
  ring pass per step carries every active slot's next token plus the prompts of newly admitted
  requests as one batch, so the weights are read once per step for all of them.
- ``batch`` (Bud): iteration-level batching on one device over a paged KV pool with admission by
  memory (primasim/sim/_batch.py, fed by the stream's arrivals).

A departure (`Departure`: a device killed, or its link stalled, at a time) splits the run in two:
the stream is served on the full cluster until the departure; the server then notices
(`Recovery.detect_*`), re-plans on the survivors with the system's planner (timed here, as the
server times it), sets the survivors up again and reads the layers that moved to them from disk
(bytes / the device's read rate), and serves the rest -- the in-flight requests first, each
re-prefilled with its prompt plus the tokens it had produced -- on the new plan. If the survivors
cannot hold the model, every request not finished fails with the planner's reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import simpy

from primasim.core.cluster import ClusterSpec
from primasim.core.errors import SpecError
from primasim.core.model import ModelSpec
from primasim.core.plan import Plan
from primasim.core.serving import SLO, RequestRecord, summarize
from primasim.core.trace import Request, Trace
from primasim.core.workload import Workload

from ._batch import _Req, run_batch
from ._config import SimConfig
from ._context import SimContext
from ._engine import Proc
from ._planning import plan_for
from ._ring import Ring, RingOptions, _shift
from ._runtime import RuntimeRing
from ._systems import SystemEntry, get_system

MODES = ("slots", "continuous", "batch")


@dataclass(frozen=True)
class Departure:
    """A device that leaves: `kind` kill (its process dies) or stall (its link stops carrying data)."""

    time: float
    device: str
    kind: Literal["kill", "stall"] = "kill"


@dataclass(frozen=True)
class Recovery:
    """How the server notices a departure and recovers (the numbers `primasim serve` uses)."""

    detect_kill_s: float = field(default=0.05, metadata={
        "help": "a dead local worker process is seen at the next poll of the driver's loop"})
    detect_stall_s: float = field(default=5.0, metadata={
        "help": "a stalled link or silent device: the serve engine's link / heartbeat timeout"})
    replan_s: float | None = field(default=None, metadata={"help": "re-plan time; None = time the planner here"})
    setup_s: float | dict[str, float] | Callable[[str, float, Plan], float] = field(default=0.0, metadata={
        "help": "seconds a survivor needs to set up its new windows (spawn, compile, warm) besides its disk reads: "
                "one value, per device, or fn(device, bytes it reads, new plan) -> seconds; "
                "measured by the server at its start"})
    reload: Literal["all", "moved", "none"] = field(default="moved", metadata={
        "help": "what a survivor reads from its disk before serving again: its whole resident window (a cold "
                "restart, as `primasim serve` does), only the layers that moved to it, or nothing"})
    warmup: int = field(default=0, metadata={
        "help": "short requests (a bucket's prompt, 2 tokens) the server runs before serving again "
                "(`primasim serve` runs one per slot)"})
    buckets: tuple[int, ...] = field(default=(), metadata={"help": "the server's compiled prompt lengths"})


@dataclass
class ServeResult:
    """What serving a workload predicts."""

    system: str
    mode: str
    feasible: bool
    reason: str
    plan: Plan | None
    records: list[RequestRecord]
    summary: dict[str, Any]
    trace: Trace | None = None
    phases: list[dict[str, Any]] = field(default_factory=list)
    recovery: dict[str, Any] | None = None

    def to_json(self, per_request: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"system": self.system, "mode": self.mode, "feasible": self.feasible,
                               "reason": self.reason, "plan": self.plan.to_json() if self.plan else None,
                               "serving": self.summary, "phases": self.phases}
        if self.recovery is not None:
            out["recovery"] = self.recovery
        if per_request:
            out["requests"] = [r.to_json() for r in self.records]
        return out


# ------------------------------------------------------------------------------------ walkers
class _Walker:
    """One forward pass of a ring (paper engine or primasim's runtime), by filled context."""

    def __init__(self, ctx: SimContext, runtime: bool, buckets: tuple[int, ...] = ()) -> None:
        self.ctx = ctx
        self.runtime = runtime
        self.buckets = sorted(buckets)
        if runtime:

            self.rr = RuntimeRing(ctx)
            self.rr.hold_head = True  # primasim serve's head: output + the slot's next window in one go
            self.rr.setup_stats()
        else:

            self.ring = Ring(ctx, RingOptions())

    def step(self, n_tokens: int, filled: int, seq: int, token: int) -> Proc:
        """`n_tokens` new tokens of a sequence whose cache holds `filled` positions."""
        if self.runtime:
            if filled == 0 and n_tokens > 1:  # the server pads a prompt to its next compiled length
                n_tokens = next((b for b in self.buckets if b >= n_tokens), n_tokens)
            yield from self.rr.walk(n_tokens, filled, seq, token)
        else:
            yield from self.ring.walk(n_tokens, self.ring.n_kv(filled + n_tokens), seq, token)

    def release(self, slot: int) -> None:
        if self.runtime:
            self.rr.release_head(slot)

    def batch_step(self, rows: list[tuple[int, int]], step: int) -> Proc:
        """One pass carrying several sequences' new tokens: rows = [(n_tokens, filled)]."""
        ring = self.ring
        n_tok = sum(n for n, _ in rows)
        kv = [ring.n_kv(f + n) for n, f in rows]
        n_kv = sum(k for k, _ in kv)
        pos = round(sum(n * p for (n, _), (_, p) in zip(rows, kv)) / max(1, n_tok))
        yield from ring.walk(n_tok, (n_kv, pos), -1, step)
        if len(rows) > 1:  # logits for every sequence of the batch, not one
            head = self.ctx.dev(ring.head)
            extra = head.timing.output(len(rows)) - head.timing.output(1)
            yield from head.cpu.serve(extra, name=f"output x{len(rows)}", seq=-1, token=step)

    def warmup(self, prompt: int) -> Proc:
        """The paper engines' untimed warm-up pass (the runtime model starts cold, without one)."""
        if self.runtime or not self.ctx.cfg.warmup:
            return
        env = self.ctx.env
        yield from self.ring.walk(1, self.ring.n_kv(prompt), -1, -1)
        while True:
            pending = [ev for d in self.ctx.devices.values() for ev in d.loading.values()]
            if not pending:
                break
            yield env.all_of(pending)
        self.ring._reset_counters()


# ------------------------------------------------------------------------------------ one phase
@dataclass
class _Job:
    rec: RequestRecord
    prompt: int  # tokens to prefill (the prompt, plus the tokens produced before a restart)
    left: int  # tokens still to generate
    arrival: float  # phase-local arrival time


class _Phase:
    """Serve jobs on one plan until they finish or `until` (phase-local seconds)."""

    def __init__(self, ctx: SimContext, mode: str, slots: int, offset: float, runtime: bool) -> None:
        self.ctx, self.mode, self.slots, self.offset = ctx, mode, slots, offset
        self.env = ctx.env
        self.runtime = runtime
        self.queue: simpy.Store = simpy.Store(self.env)
        self.active: dict[int, _Job] = {}  # slot (or rid in batch modes) -> job
        self.done_ev = self.env.event()
        self.remaining = 0
        self.t0 = 0.0

    # -- bookkeeping shared by the modes
    def _token(self, job: _Job) -> None:
        job.rec.token_times.append(self.env.now - self.t0 + self.offset)
        job.left -= 1
        idx = job.rec.n_out - 1
        self.ctx.emit(job.rec.rid, idx)

    def _admit(self, job: _Job) -> None:
        if job.rec.admitted is None:
            job.rec.admitted = self.env.now - self.t0 + self.offset

    def _finish(self, job: _Job) -> None:
        job.rec.finish_reason = "length"
        self.remaining -= 1
        if self.remaining == 0 and not self.done_ev.triggered:
            self.done_ev.succeed()

    def feed(self, jobs: list[_Job]) -> Proc:
        """Put each job into the queue at its (phase-local) arrival time."""
        for job in sorted(jobs, key=lambda j: j.arrival):
            wait = self.t0 + job.arrival - self.env.now
            if wait > 0:
                yield self.env.timeout(wait)
            self.ctx.trace.requests.append(Request(job.rec.rid, self.t0 + job.arrival, job.prompt, job.left))
            yield self.queue.put(job)

    # -- slots: independent sequences in flight (MDI-LLM; primasim serve)
    def slot(self, walker: _Walker, i: int) -> Proc:
        while True:
            if not self.queue.items:  # idle: the head's CPU kept after this slot's last output is free
                walker.release(i)
            job: _Job = yield self.queue.get()
            self.active[i] = job
            self._admit(job)
            filled = 0
            yield from walker.step(job.prompt, 0, i, job.rec.n_out)
            filled = job.prompt
            self._token(job)
            while job.left > 0:
                yield from walker.step(1, filled, i, job.rec.n_out)
                filled += 1
                self._token(job)
            del self.active[i]
            self._finish(job)

    # -- continuous: one pass per step for every active slot (llama.cpp server)
    def continuous(self, walker: _Walker) -> Proc:
        running: list[tuple[_Job, int]] = []  # (job, filled)
        step = 0
        while True:
            while not running and not self.queue.items:
                job = yield self.queue.get()
                self.queue.items.insert(0, job)
            new = []
            while self.queue.items and len(running) + len(new) < self.slots:
                job = self.queue.items.pop(0)
                self._admit(job)
                new.append(job)
            rows = [(1, f) for _, f in running] + [(j.prompt, 0) for j in new]
            for j in new:
                self.active[id(j)] = j
            yield from walker.batch_step(rows, step)
            step += 1
            nxt = []
            for j, f in running:
                self._token(j)
                nxt.append((j, f + 1))
            for j in new:
                self._token(j)
                nxt.append((j, j.prompt))
            running = []
            for j, f in nxt:
                if j.left > 0:
                    running.append((j, f))
                else:
                    self.active.pop(id(j), None)
                    self._finish(j)


def _mode_for(entry: SystemEntry, mode: str | None, runtime: bool, plan: Plan) -> str:
    if mode is None:
        return "batch" if (entry.schedule == "batch" or plan.schedule == "batch") else "slots"
    if mode not in MODES:
        raise SpecError(f"unknown serving mode {mode!r}", where="--serve-mode", fix=f"use one of {', '.join(MODES)}")
    if mode == "batch" and entry.schedule != "batch":
        raise SpecError(f"{entry.name} does not batch requests on one device", where="--serve-mode",
                        fix="use --system bud, or --serve-mode slots|continuous")
    if mode in ("slots", "continuous") and entry.schedule != "ring":
        raise SpecError(f"{entry.name} is not a ring system ({entry.schedule})", where="--serve-mode",
                        fix="serve ring systems (prima, llama.cpp, exo, mdi-llm, ...) or bud")
    if mode == "batch" and runtime:
        raise SpecError("the runtime model serves ring plans (slots); Bud's batch is served by the paper engine",
                        where="--serve-mode", fix="drop --runtime for bud, or serve a ring plan")
    if mode == "continuous" and runtime:
        raise SpecError("primasim's runtime serves requests in slots (sequences in flight), not as one batch",
                        where="--serve-mode", fix="use --serve-mode slots with the runtime model")
    return mode


def _run_phase(system: str, entry: SystemEntry, model: ModelSpec, cluster: ClusterSpec, plan: Plan,
               cfg: SimConfig, mode: str, slots: int, jobs: list[_Job], offset: float,
               until: float | None, warm: bool, buckets: tuple[int, ...] = ()) -> tuple[_Phase, SimContext, float]:
    """Serve `jobs` on `plan` from phase-local time 0; stop at `until` (phase-local) or when done.
    Returns the phase, its context and the phase-local time the stream started (after warm-up)."""
    ctx = SimContext(system, model, cluster, plan, cfg)
    runtime = cfg.runtime
    ph = _Phase(ctx, mode, slots, offset, runtime)
    ph.remaining = len(jobs)
    if mode == "batch":
        return _run_bud(ph, entry, jobs, until), ctx, 0.0
    walker = _Walker(ctx, runtime, buckets)
    env = ctx.env
    started = env.event()

    def main() -> Proc:
        if warm:
            yield from walker.warmup(max((j.prompt for j in jobs), default=1))
        ph.t0 = env.now
        started.succeed()
        env.process(ph.feed(jobs))
        if mode == "slots":
            for i in range(slots):
                env.process(ph.slot(walker, i))
        else:
            env.process(ph.continuous(walker))
        if jobs:
            yield ph.done_ev

    def stopper() -> Proc:
        yield started
        yield env.timeout(until)

    proc = env.process(main())
    env.run(until=proc if until is None else env.process(stopper()))
    return ph, ctx, ph.t0


def _run_bud(ph: _Phase, entry: SystemEntry, jobs: list[_Job], until: float | None) -> _Phase:
    by_rid = {j.rec.rid: j for j in jobs}
    reqs = [_Req(j.rec.rid, j.prompt, j.left, arrival=j.arrival) for j in jobs]
    ctx = ph.ctx

    def on_admit(r: _Req) -> None:
        ph._admit(by_rid[r.rid])

    res = run_batch(ctx, entry, reqs, on_admit)
    if not res.feasible:
        raise _Infeasible(res.reason)
    assert res.trace is not None
    for t in sorted(res.trace.tokens, key=lambda t: t.time):
        j = by_rid[t.seq]
        j.rec.token_times.append(t.time + ph.offset)
        j.left -= 1
        if j.left == 0:
            j.rec.finish_reason = "length"
    return ph


class _Infeasible(Exception):
    pass


# ------------------------------------------------------------------------------------ public API
def serve_workload(system: str, model: ModelSpec, cluster: ClusterSpec, workload: Workload, *,
                   plan: Plan | None = None, config: SimConfig | None = None, mode: str | None = None,
                   slots: int | None = None, slo: SLO | None = None, departure: Departure | None = None,
                   recovery: Recovery | None = None, replan: Callable[[ClusterSpec], Any] | None = None,
                   buckets: tuple[int, ...] = (), path: tuple[float, float] = (0.0, 0.0),
                   **plan_options: Any) -> ServeResult:
    """Serve `workload` with `system` on `cluster` (planned by the system's planner unless `plan`).

    `slots`: sequences in flight (slots mode) or the batch cap (continuous); default the plan's
    S option or the number of devices in the ring (slots), 4 (continuous). `config.runtime=True`
    models primasim's runtime (what `primasim serve` runs). `replan(survivors)` overrides how
    the plan after a departure is made (default: the system's planner on the survivors).
    `buckets`: the compiled prompt lengths of the server a runtime model pads prompts to.
    `path`: the server's own path around the devices, as measured on it (seconds): from a client's
    send until the head has the request (HTTP, the engine's hop to the head), and from a token
    sampled on the head until the client reads it (the SSE stream); arrivals and token times stay
    on the client's clock, as the load generator measures them."""
    cfg = config or SimConfig()
    entry = get_system(system)
    cfg = cfg.replace(prompt_tokens=max(cfg.prompt_tokens, workload.max_prompt),
                      tokens=max(cfg.tokens, workload.max_output))
    if plan is None:
        outcome = plan_for(system, model, cluster, cfg, **plan_options)
        if not outcome.feasible or outcome.plan is None:
            return ServeResult(system, mode or "", False, outcome.reason or "no feasible plan", outcome.plan, [], {})
        plan = outcome.plan
    m = _mode_for(entry, mode, cfg.runtime, plan)
    n_slots = int(slots or plan.options.get("S") or (len(plan.active) if m == "slots" else 4))
    if n_slots < 1:
        raise SpecError(f"slots must be >= 1, got {n_slots}", where="--slots", fix="e.g. --slots 4")
    need = workload.max_prompt + workload.max_output
    if need > plan.n_ctx:
        plan = plan.replace(n_ctx=need)
    if m == "slots":
        plan = plan.replace(options={**plan.options, "S": n_slots})
        cfg = cfg.replace(S=n_slots)
    records = [RequestRecord(r.rid, r.arrival, r.prompt_tokens, r.output_tokens) for r in workload]
    path_in, path_out = (max(0.0, float(x)) for x in path)
    jobs = [_Job(rec, rec.prompt_tokens, rec.max_tokens, rec.arrival + path_in) for rec in records]
    phases: list[dict[str, Any]] = []
    rec_out: dict[str, Any] | None = None
    trace: Trace | None = None
    if departure is not None and departure.device not in [d.name for d in plan.active]:
        if departure.device not in cluster.names:
            raise SpecError(f"no device named {departure.device!r}", where="--depart", fix=f"use one of {cluster.names}")
        phases.append({"note": f"{departure.device} left at {departure.time:g} s but the plan does not use it"})
        departure = None
    try:
        if departure is None:
            ph, ctx, t0 = _run_phase(system, entry, model, cluster, plan, cfg, m, n_slots, jobs, 0.0, None, True,
                                     buckets)
            trace = _trace(ctx, t0)
            phases.append({"plan": plan.describe(), "start_s": 0.0, "devices": [d.name for d in plan.active]})
        else:
            rcv = recovery or Recovery()
            if buckets and not rcv.buckets:
                rcv = replace(rcv, buckets=buckets)
            trace, rec_out = _with_departure(system, entry, model, cluster, plan, cfg, m, n_slots, jobs, departure,
                                             rcv, replan, phases, plan_options)
    except _Infeasible as exc:
        return ServeResult(system, m, False, str(exc), plan, records, summarize(records, slo))
    if rec_out and rec_out.get("recovery_s") is not None:  # the client sees the next token path_out later
        rec_out["recovery_s"] += path_out
    for r in records:
        r.token_times = [t + path_out for t in r.token_times]
        if r.status == "ok" and r.n_out < r.max_tokens:
            r.status, r.error = "error", r.error or "not finished"
    if trace is not None:
        trace.requests = [Request(r.rid, r.arrival, r.prompt_tokens, r.max_tokens) for r in records]
    return ServeResult(system, m, True, "", plan, records, summarize(records, slo), trace, phases, rec_out)


def _trace(ctx: SimContext, t0: float) -> Trace:
    _shift(ctx, t0)
    ctx.result()  # fills the trace's meta and cache statistics
    return ctx.trace


def _reload_bytes(model: ModelSpec, old: Plan, new: Plan, cluster: ClusterSpec, cfg: SimConfig, slots: int,
                  how: str) -> dict[str, float]:
    """Per survivor, the bytes it reads before serving on `new`: its whole resident window (`all`,
    a cold restart; the runtime model's residency decides what is resident) or only the layers it
    did not hold in `old` (`moved`), plus the output layer on a new head."""
    def layers(p: Plan, name: str) -> set[int]:
        return {i for s in p.segments() if s.device == name for i in range(s.start, s.end)}

    out: dict[str, float] = {}
    if how == "none":
        return out
    for d in new.active:
        head = d.name == new.devices[0].name
        if how == "all":
            if cfg.runtime:
                from ._runtime import residency

                r = residency(new, model, cluster.device(d.name).ram_avail, d.name,
                              max_seq=max(new.n_ctx, cfg.prompt_tokens + cfg.tokens), in_flight=slots)
                out[d.name] = float(r.resident_bytes)
            else:
                out[d.name] = len(layers(new, d.name)) * float(model.layer_bytes) + (model.output_bytes if head else 0.0)
            continue
        b = len(layers(new, d.name) - layers(old, d.name)) * float(model.layer_bytes)
        if head and old.devices[0].name != d.name:
            b += float(model.output_bytes)
        out[d.name] = b
    return out


def _read_time(dev: Any, nbytes: float) -> float:
    """Seconds to read `nbytes` from a device's disk from idle (a throttle's slices, as the runtime model)."""
    if nbytes <= 0 or dev.disk_speed <= 0:
        return 0.0
    from types import SimpleNamespace

    from ._runtime import DiskBucket

    return DiskBucket(SimpleNamespace(spec=dev)).duration(0.0, nbytes)  # type: ignore[arg-type]


def _with_departure(system: str, entry: SystemEntry, model: ModelSpec, cluster: ClusterSpec, plan: Plan,
                    cfg: SimConfig, mode: str, slots: int, jobs: list[_Job], dep: Departure, rcv: Recovery,
                    replan: Callable[[ClusterSpec], Any] | None, phases: list[dict[str, Any]],
                    plan_options: dict[str, Any]) -> tuple[Trace, dict[str, Any]]:
    if dep.device not in cluster.names:
        raise SpecError(f"no device named {dep.device!r}", where="--depart", fix=f"use one of {cluster.names}")
    if mode == "batch":
        raise SpecError("a departure needs a multi-device ring; bud runs on one device", where="--depart",
                        fix="serve a ring system")
    ph1, ctx1, t0 = _run_phase(system, entry, model, cluster, plan, cfg, mode, slots, jobs, 0.0, dep.time, True,
                               rcv.buckets)
    trace = _trace(ctx1, t0)
    phases.append({"plan": plan.describe(), "start_s": 0.0, "end_s": dep.time,
                   "devices": [d.name for d in plan.active]})
    in_flight = {id(j) for j in ph1.active.values()}
    # tokens stamped after the departure cannot exist: the pass that produced them never finished
    for j in jobs:
        while j.rec.token_times and j.rec.token_times[-1] > dep.time:
            j.rec.token_times.pop()
            j.left += 1
    left = [j for j in jobs if j.left > 0]
    survivors = [d.name for d in plan.active if d.name != dep.device]
    info: dict[str, Any] = {"device": dep.device, "kind": dep.kind, "time_s": dep.time,
                            "in_flight": len(in_flight), "survivors": survivors}
    detect = rcv.detect_kill_s if dep.kind == "kill" else rcv.detect_stall_s
    rest = [n for n in cluster.names if n != dep.device]
    surv = cluster.subset(rest)
    t_plan = time.perf_counter()
    outcome = replan(surv) if replan is not None else plan_for(system, model, surv, cfg,
                                                               **{"n_ctx": plan.n_ctx, **plan_options})
    replan_s = rcv.replan_s if rcv.replan_s is not None else time.perf_counter() - t_plan
    new_plan = getattr(outcome, "plan", outcome)
    feasible = getattr(outcome, "feasible", new_plan is not None)
    info.update(detect_s=detect, replan_s=replan_s)
    if not feasible or new_plan is None:
        reason = getattr(outcome, "reason", "") or "no feasible plan"
        for j in left:
            j.rec.status = "error"
            j.rec.error = f"the remaining devices cannot hold the model: {reason}"
        info.update(feasible=False, reason=reason)
        return trace, info
    new_plan = new_plan.replace(n_ctx=max(new_plan.n_ctx, plan.n_ctx))
    if mode == "slots":
        new_plan = new_plan.replace(options={**new_plan.options, "S": slots})
    moved = _reload_bytes(model, plan, new_plan, surv, cfg, slots, rcv.reload)
    setup = {}
    for d in new_plan.active:
        if callable(rcv.setup_s):
            s = float(rcv.setup_s(d.name, moved.get(d.name, 0.0), new_plan))
        else:
            s = rcv.setup_s.get(d.name, 0.0) if isinstance(rcv.setup_s, dict) else float(rcv.setup_s)
        setup[d.name] = s + _read_time(cluster.device(d.name), moved.get(d.name, 0.0))
    t_setup = max(setup.values(), default=0.0)
    resume = dep.time + detect + replan_s + t_setup
    info.update(feasible=True, plan=new_plan.describe(), setup_s=t_setup, setup_by_device=setup,
                moved_bytes=moved, resume_s=resume)
    # phase 2: in-flight requests first (by admission), re-prefilled with what they produced
    order = sorted(left, key=lambda j: (0 if id(j) in in_flight or j.rec.n_out > 0 else 1,
                                        j.rec.admitted if j.rec.admitted is not None else math.inf, j.arrival))
    jobs2 = [_Job(RequestRecord(-1 - i, 0.0, rcv.buckets[0] if rcv.buckets else 16, 2),
                  rcv.buckets[0] if rcv.buckets else 16, 2, 0.0) for i in range(rcv.warmup)]
    for j in order:
        if j.rec.n_out > 0 or id(j) in in_flight:
            j.rec.restarts += 1
        jobs2.append(_Job(j.rec, j.rec.prompt_tokens + j.rec.n_out, j.left, max(0.0, j.arrival - resume)))
    # the queue is FIFO by arrival: restarted ones share time 0 and keep their order
    ph2, ctx2, t0b = _run_phase(system, entry, model, surv, new_plan, cfg, mode, slots, jobs2, resume, None, False,
                                rcv.buckets)
    phases.append({"plan": new_plan.describe(), "start_s": resume, "devices": [d.name for d in new_plan.active]})
    after = [t for j in jobs2 if j.rec.rid >= 0 for t in j.rec.token_times if t >= resume]
    info["first_token_after_s"] = min(after) if after else None
    info["recovery_s"] = (min(after) - dep.time) if after else None
    _merge(trace, ctx2.trace, resume)
    return trace, info


def _merge(into: Trace, other: Trace, offset: float) -> None:
    """Append a later phase's trace, its times shifted by `offset`."""
    for t in other.tokens:
        into.token(t.seq, t.index, t.time + offset, t.token_id)
    for s in other.spans:
        into.spans.append(replace(s, start=s.start + offset, end=s.end + offset))
    for d, st in other.device_stats.items():
        for k, v in st.items():
            if k in ("disk_read_bytes", "net_tx_bytes", "net_rx_bytes", "page_faults"):
                into.add_stat(d, k, v)
