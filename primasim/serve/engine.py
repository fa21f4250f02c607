"""The serving engine: a long-running head over the runtime's workers.

One `Engine` starts the cluster's workers once (`primasim.runtime.head.Driver`: spawn or connect,
compile, load the weights within each device's memory), then keeps them warm and feeds the head
worker a stream of requests (`MsgType.SUBMIT` / `CANCEL`): the head runs up to `slots` sequences
in flight on the plan's ring, each in its own KV cache (runtime/worker/serving.py), and sends every
token back as it is sampled. The engine is the authoritative copy of every request (prompt,
sampler, tokens produced), so that when a device leaves -- its worker dies, stops answering, or
its link stalls -- it can:

1. name the device (the driver's `WorkerError` says which; a stalled link blames its sender),
2. re-plan on the survivors with the same planner (`make_plan` on the cluster without it),
3. start the survivors on the new plan (the same start-up as at the beginning), and
4. re-submit every unfinished request, in-flight ones first, each re-prefilled with its prompt plus
   the tokens it already produced; clients only see a delay (SSE streams get `: recovering`
   comments). If the survivors cannot hold the model, every unfinished request fails with that reason.

Everything runs on one engine thread that owns the zmq sockets; other threads (the HTTP server)
call `submit` / `cancel`, which queue a command and wake the thread through an inproc socket.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from primasim.core.cluster import ClusterSpec
from primasim.core.errors import PlanError, PrimasimError, WorkerError
from primasim.core.plan import Plan
from primasim.runtime import wire
from primasim.runtime.head import Driver, RunOptions, check_plan, checkpoint_files, drop_file_cache
from primasim.runtime.wire import MsgType

Sink = Callable[[str, dict[str, Any]], None]
WAKE = "inproc://primasim-engine-wake"
_ids = itertools.count(1)


def worker_setup_s(load: dict[str, Any]) -> float:
    """A worker's own start-up after its spawn, from its READY + LOAD replies: SETUP's compile
    (`setup_warmup_s`) then LOAD (`load_s`). LOAD's `load_s` spans all of LOAD -- mapping, the
    warm-up run of every compiled shape (`warm_s`, reported on its own) and the weight reads -- so
    `warm_s` is inside it, not beside it (runtime/worker/session.py `Session.load`; the residency's
    own `load_s`, weights only, is overwritten by the session's). Summing all three counted the
    warm-up twice: 21.6 s for the laptop's start whose whole set-up phase took 13.3 s (2026-12-07)."""
    return float(load.get("setup_warmup_s", load.get("warmup_s", 0.0)) or 0.0) + float(load.get("load_s", 0.0) or 0.0)


@dataclass
class EngineRequest:
    """One request as the engine tracks it (times on this host's clock, time.time())."""

    ids: list[int]
    max_tokens: int
    sink: Sink  # called from the engine thread: ("token" | "finish" | "error" | "recovering", info)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    rid: int = field(default_factory=lambda: next(_ids))
    received: float = field(default_factory=time.time)
    admitted: float | None = None
    out: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    restarts: int = 0
    done: bool = False
    finish_reason: str = ""
    cancelled: bool = False

    def submit_obj(self) -> dict[str, Any]:
        """What the head needs to (re)start it: prompt + tokens so far, what is left to generate."""
        return {"rid": self.rid, "ids": self.ids + self.out, "max_new": self.max_tokens - len(self.out),
                "index0": len(self.out), "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "seed": self.seed, "stop_ids": list(self.stop_ids),
                "min_new": max(0, self.min_tokens - len(self.out))}


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs the cluster (`primasim serve` flags)."""

    slots: int | None = field(default=None, metadata={"help": "sequences in flight (default: devices in the ring)"})
    n_ctx: int | None = field(default=None, metadata={"help": "KV length per slot (default: the plan's n_ctx)"})
    recover: bool = field(default=True, metadata={"help": "re-plan on the survivors when a device leaves"})
    system: str = field(default="prima", metadata={"help": "planner for the start and for re-planning"})
    plan_options: tuple[tuple[str, Any], ...] = field(default=(), metadata={"help": "planner options (re-planning)"})
    prefill_buckets: tuple[int, ...] = field(default=(), metadata={
        "help": "prompt lengths compiled at set-up (a prompt is padded to the next one; () = powers of two)"})
    run: RunOptions = field(default_factory=lambda: RunOptions(heartbeat_timeout=5.0, link_timeout=5.0,
                                                                compute_timeout=30.0))


def prefill_buckets(n_ctx: int, given: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Prompt lengths the workers compile: powers of two from 16 up to the context (or `given`)."""
    if given:
        return tuple(sorted({int(b) for b in given if 0 < int(b) <= n_ctx} | {n_ctx}))
    out, b = [], 16
    while b < n_ctx:
        out.append(b)
        b *= 2
    return (*out, n_ctx)


def culprit(exc: WorkerError) -> str | None:
    """The device a runtime failure names: `device X`, or the sender of a stalled link `a -> b`."""
    where = exc.where or ""
    m = re.search(r"link (\S+) -> (\S+)", where)
    if m:
        return m.group(1)
    m = re.search(r"device (\S+)", where)
    return m.group(1).rstrip(":,") if m else None


class Engine:
    """Serve requests on `plan` over `cluster` until `close()`. See the module docstring."""

    def __init__(self, plan: Plan, ckpt: Any, cluster: ClusterSpec, options: EngineOptions = EngineOptions(),
                 *, replan: Callable[[ClusterSpec, int], Any] | None = None) -> None:
        self.ckpt = ckpt
        self.spec = ckpt.spec
        self.cluster = cluster
        self.opt = options
        self.n_ctx = int(options.n_ctx or plan.n_ctx)
        check_plan(plan, self.spec, cluster)
        if plan.schedule not in ("ring", "rpp"):
            raise PlanError(f"primasim serve runs ring plans; this plan's schedule is {plan.schedule!r}",
                            where=f"plan ({plan.system})", fix="serve a prima / llama.cpp / exo / mdi-llm plan")
        self.slots = int(options.slots or plan.options.get("S") or len([d for d in plan.devices if d.layers]) or 1)
        self.plan = self._serving_plan(plan)
        self.replan = replan
        self.buckets = prefill_buckets(self.n_ctx, options.prefill_buckets)
        self.requests: dict[int, EngineRequest] = {}
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        # submissions put / taken from the inbox (each written by one thread): the ones in between
        # count as waiting, so a burst that arrives before the engine thread drains is bounded too
        self._put = self._taken = 0
        self.state = "starting"  # starting | ready | recovering | failed | closed
        self.error = ""
        self.events: list[dict[str, Any]] = []  # start-ups, departures, recoveries (what /status shows)
        self.plan_warm_s = 0.0
        self.driver: Driver | None = None
        self.lost: list[str] = []  # devices that left
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop = threading.Event()
        self._wake_ctx = zmq.Context.instance()
        self._wake_lock = threading.Lock()
        self._wake_socks: dict[int, zmq.Socket] = {}
        self.setup_s: dict[str, float] = {}  # per device: set-up without reading weights (for the simulator)

    def _serving_plan(self, plan: Plan) -> Plan:
        return plan.replace(schedule="rpp", n_ctx=self.n_ctx, options={**plan.options, "S": self.slots, "serving": True})

    # ---------------------------------------------------------------------------- life cycle
    def start(self, timeout: float = 1800.0) -> None:
        """Start the workers (in the engine thread) and wait until the engine serves or failed."""
        self._thread = threading.Thread(target=self._main, name="primasim-engine", daemon=True)
        self._thread.start()
        self._started.wait(timeout)
        if self.state == "failed":
            raise WorkerError(self.error, where="serve start-up", fix="see the message above")
        if not self._started.is_set():
            raise WorkerError(f"the cluster did not start within {timeout:.0f} s", where="serve start-up",
                              fix="check the workers' logs")

    def close(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for s in self._wake_socks.values():
            with contextlib.suppress(Exception):
                s.close(linger=0)
        self.state = "closed"

    # ---------------------------------------------------------------------------- any thread
    def submit(self, req: EngineRequest) -> None:
        if self.state in ("failed", "closed"):
            raise WorkerError(self.error or "the engine is not running", where="serve",
                              fix="restart primasim serve")
        self._put += 1
        self.inbox.put(("submit", req))
        self._wake()

    def cancel(self, rid: int) -> None:
        self.inbox.put(("cancel", rid))
        self._wake()

    def counts(self) -> dict[str, int]:
        reqs = list(self.requests.values())
        return {"running": sum(r.admitted is not None and not r.done for r in reqs),
                "waiting": sum(r.admitted is None and not r.done for r in reqs) + self._put - self._taken}

    def status(self) -> dict[str, Any]:
        d = self.driver
        devices = {}
        if d is not None and d.emu is not None:
            for n, ed in d.emu.devices.items():
                devices[n] = {"pid": ed.process.pid if ed.process is not None else None}
        return {"state": self.state, "error": self.error, "plan": self.plan.describe(), "plan_json": self.plan.to_json(),
                "slots": self.slots, "n_ctx": self.n_ctx, "ring": list(d.ring) if d is not None else [],
                "devices": devices, "lost": list(self.lost), "events": list(self.events), **self.counts()}

    def _wake(self) -> None:
        tid = threading.get_ident()
        with self._wake_lock:
            s = self._wake_socks.get(tid)
            if s is None:
                s = self._wake_socks[tid] = self._wake_ctx.socket(zmq.PUSH)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(WAKE)
        with contextlib.suppress(zmq.ZMQError):
            s.send(b"", zmq.NOBLOCK)

    # ---------------------------------------------------------------------------- engine thread
    def _main(self) -> None:
        wake = self._wake_ctx.socket(zmq.PULL)
        wake.bind(WAKE)
        try:
            if self.opt.recover and self.replan is None:
                # plan once now (as a re-plan would): the planner's modules and solver are loaded before a
                # device leaves, so a re-plan then costs only its solve (cold, ~8 s on a loaded host)
                t0 = time.perf_counter()
                with contextlib.suppress(PrimasimError):
                    self._plan_on(self.cluster)
                self.plan_warm_s = time.perf_counter() - t0
            try:
                self._boot(self.plan, "start")
            except PrimasimError as exc:
                self._fail(f"start-up failed: {exc.message}")
                return
            finally:
                self._started.set()
            while not self._stop.is_set():
                try:
                    self._serve(wake)
                except WorkerError as exc:
                    if self._stop.is_set():
                        break
                    self._recover(exc)
                    if self.state == "failed":
                        break
        except Exception as exc:  # a bug must not leave clients hanging
            self._fail(f"internal error: {type(exc).__name__}: {exc}")
            raise
        finally:
            self._shutdown_driver()
            wake.close(linger=0)
            self._started.set()

    def _boot(self, plan: Plan, why: str) -> None:
        """Start workers for `plan`, set them up, and open the head's request stream."""
        t0 = time.time()
        cluster = self.cluster.subset([n for n in self.cluster.names if n not in self.lost]) if self.lost \
            else self.cluster
        drop_file_cache(checkpoint_files(self.ckpt))
        d = Driver(plan, self.ckpt, cluster, self.opt.run)
        self.driver = d
        d.start()
        t1 = time.time()
        d.setup(list(self.buckets) + [1], self.n_ctx, 1)
        t2 = time.time()
        head = d.peers[d.ring[0]]
        wire.send(head.sock, MsgType.GENERATE, obj={"serve": True, "slots": self.slots, "schedule": "rpp",
                                                    "buckets": list(self.buckets), "options": dict(plan.options)})
        d.phase = "serve"
        self._warm(d)
        for n, ld in d.loads.items():  # set-up without the weight reads: what a restart costs before loading
            self.setup_s[n] = (t1 - t0) + float(ld.get("setup_warmup_s", ld.get("warmup_s", 0.0)) or 0.0)
        self.plan = plan
        self.state = "ready"
        self.events.append({"event": why, "plan": plan.describe(), "ring": list(d.ring), "start_s": t0,
                            **({"plan_warm_s": self.plan_warm_s} if why == "start" else {}),
                            "connect_s": t1 - t0, "setup_s": t2 - t1, "ready_at": time.time(),
                            "loads": {n: {k: v for k, v in ld.items() if isinstance(v, int | float | str)}
                                      for n, ld in d.loads.items()}})

    def _warm(self, d: Driver) -> None:
        """One short request per slot before serving: the first execution of each compiled shape
        (XLA's lazy initialisation, ~0.1-0.5 s) happens here, not in a client's first token."""
        head = d.peers[d.ring[0]]
        pending = set()
        for i in range(self.slots):
            rid = -(i + 1)
            pending.add(rid)
            wire.send(head.sock, MsgType.SUBMIT, obj={"rid": rid, "ids": [1] * self.buckets[0], "max_new": 2,
                                                      "temperature": 0.0, "seed": 0, "stop_ids": []})

        def done(_name: str, msg: Any) -> bool:
            if msg.type == MsgType.FINISHED:
                pending.discard(int(msg.obj["rid"]))
            return not pending

        d._pump(done, self.opt.run.setup_timeout, "warm up the request stream")

    def _serve(self, wake: zmq.Socket) -> None:
        d = self.driver
        assert d is not None
        for r in sorted((r for r in self.requests.values() if not r.done), key=self._order):
            self._send_submit(r)  # after a (re)start: everything unfinished, in-flight first

        def on_wake(_sock: zmq.Socket) -> bool:
            while True:
                try:
                    wake.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
            self._drain_inbox()
            return self._stop.is_set()

        d.serve_pump(self._on_message, extra={wake: on_wake}, busy=lambda: any(not r.done for r in self.requests.values()),
                     timeout=self.opt.run.token_timeout)

    @staticmethod
    def _order(r: EngineRequest) -> tuple[int, float, float]:
        return (0 if r.out or r.admitted is not None else 1, r.admitted or 0.0, r.received)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, arg = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self.requests[arg.rid] = arg
                self._taken += 1
                if self.state == "ready":
                    self._send_submit(arg)
            elif kind == "cancel":
                r = self.requests.get(arg)
                if r is not None and not r.done:
                    r.cancelled = True
                    if self.state == "ready" and self.driver is not None:
                        wire.send(self._head_sock(), MsgType.CANCEL, obj={"rid": r.rid})
                    else:
                        self._finished(r, "cancelled")

    def _head_sock(self) -> zmq.Socket:
        d = self.driver
        assert d is not None
        return d.peers[d.ring[0]].sock

    def _send_submit(self, r: EngineRequest) -> None:
        wire.send(self._head_sock(), MsgType.SUBMIT, obj=r.submit_obj())

    def _on_message(self, name: str, msg: Any) -> None:
        d = self.driver
        assert d is not None
        o = msg.obj
        if msg.type == MsgType.TOKEN:
            r = self.requests.get(int(o["rid"]))
            if r is None or r.done:
                return
            off = d.peers[name].offset
            t = float(o["time"]) - off
            if o.get("admitted") is not None and r.admitted is None:
                r.admitted = float(o["admitted"]) - off
            if int(o["index"]) != len(r.out):
                return  # a duplicate from before a restart
            r.out.append(int(o["token_id"]))
            r.times.append(t)
            r.sink("token", {"token_id": int(o["token_id"]), "index": int(o["index"]), "time": t})
        elif msg.type == MsgType.FINISHED:
            r = self.requests.get(int(o["rid"]))
            if r is not None and not r.done:
                self._finished(r, str(o.get("reason", "length")))

    def _finished(self, r: EngineRequest, reason: str) -> None:
        r.done = True
        r.finish_reason = reason
        r.sink("finish", {"reason": reason, "admitted": r.admitted, "restarts": r.restarts})
        self.requests.pop(r.rid, None)

    # ---------------------------------------------------------------------------- a device leaves
    def _recover(self, exc: WorkerError) -> None:
        t_fail = time.time()
        dev = culprit(exc)
        ev: dict[str, Any] = {"event": "device left", "device": dev, "error": exc.message, "detected_at": t_fail}
        self.events.append(ev)
        self.state = "recovering"
        self._shutdown_driver()
        unfinished = [r for r in self.requests.values() if not r.done]
        for r in unfinished:
            if r.out or r.admitted is not None:
                r.restarts += 1
                r.sink("recovering", {"device": dev})
        if not self.opt.recover or dev is None or dev not in self.cluster.names:
            self._fail(f"a device failed and the engine cannot recover: {exc.message}")
            return
        self.lost.append(dev)
        survivors = self.cluster.subset([n for n in self.cluster.names if n not in self.lost])
        t0 = time.perf_counter()
        try:
            outcome = self.replan(survivors, self.n_ctx) if self.replan is not None else self._plan_on(survivors)
        except PrimasimError as e:
            outcome = None
            reason = e.message
        else:
            reason = getattr(outcome, "reason", "") or "no feasible plan"
        ev["replan_s"] = time.perf_counter() - t0
        new = getattr(outcome, "plan", None) if outcome is not None and getattr(outcome, "feasible", True) else None
        if new is None:
            ev["feasible"] = False
            self._fail(f"device {dev} left and the remaining devices ({', '.join(survivors.names)}) cannot hold "
                       f"the model: {reason}")
            return
        ev["feasible"] = True
        ev["plan"] = new.describe()
        try:
            self._boot(self._serving_plan(new), "restart")
        except PrimasimError as e:
            self._fail(f"device {dev} left and the survivors could not be started on the new plan: {e.message}")
            return
        ev["resumed_at"] = time.time()

    def _plan_on(self, survivors: ClusterSpec) -> Any:
        return plan_for_runtime(self.opt.system, self.spec, survivors, self.n_ctx, dict(self.opt.plan_options))

    def _fail(self, message: str) -> None:
        self.state = "failed"
        self.error = message
        for r in list(self.requests.values()):
            if not r.done:
                r.done = True
                r.finish_reason = "error"
                r.sink("error", {"message": message})
        self.requests.clear()

    def _shutdown_driver(self) -> None:
        d, self.driver = self.driver, None
        if d is not None:
            with contextlib.suppress(Exception):
                d.close()


def plan_for_runtime(system: str, spec: Any, cluster: ClusterSpec, n_ctx: int, options: dict[str, Any]) -> Any:
    """Plan `spec` on `cluster` for primasim's runtime (its f32 KV cache and activation reserve in
    the memory accounting), as the server plans at its start and after a device left."""
    from primasim.core.runtime_facts import runtime_model
    from primasim.plan.planners import make_plan

    return make_plan(system, runtime_model(spec), cluster, n_ctx=n_ctx, **options)
