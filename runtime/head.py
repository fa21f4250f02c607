"""The driver of a run: checks the inputs, starts or connects one worker per device, hands each its
part of the plan, runs generation, and turns what every worker measured into one `Trace`.

Schedules (`Plan.schedule`):

- ``ring``: prima.cpp's piped ring. A token makes k laps; every device runs its window per lap, in
  the order of `Plan.segments()`. k = 1 is the plain pipeline (exo-like; with ``weights="pinned"``
  the weights are copied into anonymous memory as exo does).
- ``rpp``: MDI-LLM's recurrent pipeline: S sequences circulate at once (``options["S"]``, default
  the number of devices), each with its own KV cache on every device, so no device idles.
- ``batch``: Bud's batched decode of many requests on one worker, with a paged KV pool and
  admission by memory (runtime/batch.py).

Everything the driver waits for has a timeout; a worker that dies, stops answering heartbeats or
reports an error ends the run with a `WorkerError` naming the device, and every local worker is
stopped. The driver runs in the `primasim run` process; the head *device* (embedding, output layer,
sampling) is a worker like the others, so it can be emulated with its own limits.

Longer than ~600 lines: the driver's one protocol with its workers (connect, SETUP, LOAD, GENERATE,
STATS, heartbeats and fault diagnosis); being reworked under issue 14, split after that.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zmq

from primasim.core.cluster import ClusterSpec
from primasim.core.errors import (
    CheckpointError,
    PlanError,
    PrimasimError,
    SpecError,
    WireError,
    WorkerError,
)
from primasim.core.model import ModelSpec
from primasim.core.model_sources import load_model
from primasim.core.paths import cache_dir
from primasim.core.plan import Plan, violations
from primasim.core.runtime_facts import residency_mode
from primasim.core.speculation import check_compatible, summarize
from primasim.core.systems import RUNTIME_SCHEDULES
from primasim.core.trace import Request, Trace, metrics, result_json

from . import wire
from .checkpoint import open_checkpoint, write_random_checkpoint
from .emulate import EmulatedCluster
from .wire import Message, MsgType

RUNNABLE = RUNTIME_SCHEDULES  # the schedules this runtime executes, as the registry of systems states them


@dataclass(frozen=True)
class RunOptions:
    """How to run a plan (sampling, schedule knobs, timeouts)."""

    max_new_tokens: int = field(default=16, metadata={"help": "tokens to generate per sequence"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0 = all)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1 = off)"})
    seed: int = field(default=0, metadata={"help": "sampling and jitter seed"})
    prefetch: bool | None = field(default=None, metadata={"help": "override Plan.prefetch"})
    in_flight: int | None = field(default=None, metadata={"help": "RPP: sequences in flight (default plan S)"})
    n_requests: int | None = field(default=None, metadata={"help": "batch: number of requests"})
    stop_ids: tuple[int, ...] = field(default=(), metadata={"help": "stop a sequence at these token ids"})
    return_logits: bool = field(default=False, metadata={"help": "send the head's logits with every token"})
    emulate: bool = field(default=True, metadata={"help": "emulate local devices' limits (root)"})
    keys: str | None = field(default=None, metadata={"help": "CurveZMQ key folder"})
    max_seq: int | None = field(default=None, metadata={"help": "KV length (default Plan.n_ctx)"})
    cold_start: bool = field(default=True, metadata={"help": "drop weight pages, then load within budgets"})
    residency: str = field(default="planned", metadata={
        "help": "planned: a worker short of memory keeps part of each layer and streams the rest (evicted "
                "after use); lru: mmap + prefetch of the next window, the kernel's LRU decides (prima.cpp)"})
    connect_timeout: float = field(default=60.0, metadata={"help": "s to start and reach every worker"})
    ring_timeout: float | None = field(default=None, metadata={
        "help": "s a device may take to reach its ring successor's data port (default: connect_timeout)"})
    setup_timeout: float = field(default=900.0, metadata={"help": "s to load weights and compile"})
    token_timeout: float = field(default=300.0, metadata={"help": "s without progress before giving up"})
    heartbeat_interval: float = field(default=0.5, metadata={"help": "s between pings"})
    heartbeat_timeout: float = field(default=15.0, metadata={"help": "s without a pong = worker dead"})
    link_timeout: float = field(default=60.0, metadata={
        "help": "s an activation may spend on a ring link, its receiver idle, before the link counts as stalled"})
    compute_timeout: float = field(default=30.0, metadata={
        "help": "s one window may compute (and at least 50x the device's median window) before the device counts "
                "as hung while it still answers heartbeats; 0 = off"})
    worker_env: tuple[tuple[str, str], ...] = field(default=(), metadata={"help": "extra env for local workers"})
    draft: str | None = field(default=None, metadata={
        "help": "draft checkpoint for speculative decoding, run on the head (same vocabulary as the model)"})
    draft_tokens: int = field(default=4, metadata={"help": "tokens the draft proposes per ring pass (K)"})


@dataclass
class RunResult:
    plan: Plan
    trace: Trace
    token_ids: list[list[int]]
    logits: list[list[list[float]]]
    emulation: dict[str, Any]
    loads: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        m = metrics(self.trace)
        out = result_json(self.plan.system, feasible=True, plan=self.plan, m=m,
                          token_ids=self.token_ids[0] if self.token_ids else [], measured=True,
                          source="run", emulation=self.emulation,
                          page_faults={d: s.get("page_faults", 0.0) for d, s in self.trace.device_stats.items()},
                          busy=m.busy)
        if len(self.token_ids) > 1:
            out["token_ids_all"] = self.token_ids
        # how each device held its weights (fits, streams, lru, pinned), beside what it used
        out["residency"] = self.trace.meta.get("residency", "")
        if "speculation" in self.trace.meta:  # tokens per pass, alpha-hat, accepted-length histogram
            out["speculation"] = {k: v for k, v in self.trace.meta["speculation"].items() if k != "pass_log"}
        for n, dev in out.get("devices", {}).items():
            if "residency" in self.loads.get(n, {}):
                dev["residency"] = self.loads[n]["residency"]
        return out


# ======================================================================================== checks
_ARCH = ("family", "n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab", "tie_embeddings",
         "qkv_bias")


def check_plan(plan: Plan, spec: ModelSpec, cluster: ClusterSpec) -> list[str]:
    """Raise PlanError if `plan` cannot run on these weights and this cluster; return notes."""
    notes: list[str] = []
    if plan.schedule not in RUNNABLE:
        raise PlanError(f"schedule {plan.schedule!r} is simulated only; the runtime executes {', '.join(RUNNABLE)}",
                        where=f"plan ({plan.system})", fix="run a prima/llama.cpp/exo/mdi-llm/bud plan")
    if plan.n_layers != spec.n_layers:
        raise PlanError(f"plan covers {plan.n_layers} layers but the weights have {spec.n_layers} "
                        f"(plan for {plan.model!r}, weights are {spec.name!r})", where=f"plan ({plan.system})",
                        fix=f"re-plan for these weights: primasim plan --model {spec.source or spec.name} --json")
    if plan.model and plan.model != spec.name:
        other: ModelSpec | None = None
        with contextlib.suppress(PrimasimError, OSError):
            other = load_model(plan.model)
        if other is None:
            raise PlanError(f"plan is for model {plan.model!r} but the weights are {spec.name!r}",
                            where=f"plan ({plan.system})",
                            fix=f"re-plan for these weights: primasim plan --model {spec.source or spec.name} --json")
        diff = [f for f in _ARCH if getattr(other, f) != getattr(spec, f)]
        if diff:
            raise PlanError(f"plan is for model {plan.model!r}, whose architecture differs from the weights' "
                            f"({', '.join(f'{f}: {getattr(other, f)} vs {getattr(spec, f)}' for f in diff)})",
                            where=f"plan ({plan.system})",
                            fix=f"re-plan for these weights: primasim plan --model {spec.source or spec.name} --json")
        notes.append(f"plan names {plan.model!r}; the weights ({spec.name!r}) have the same architecture")
    if plan.quant != spec.quant:
        notes.append(f"plan assumed {plan.quant} weights; the checkpoint is {spec.quant}")
    vs = [v for v in violations(plan, spec, cluster) if "plan is for model" not in v.problem]
    if vs:
        raise PlanError("invalid plan for these weights and cluster:\n  " + "\n  ".join(str(v) for v in vs),
                        where=f"plan ({plan.system})", fix="see the per-device problems above")
    if plan.schedule == "batch":
        act = plan.active
        if len(act) != 1 or act[0].layers != spec.n_layers:
            raise PlanError("a batch (Bud) plan runs the whole model on one device", where=f"plan ({plan.system})",
                            fix="give one device all layers")
    if any(d.gpu_layers for d in plan.devices):
        notes.append("the runtime computes on CPUs only: gpu_layers run on the CPU")
    return notes


def open_weights(ref: str | Path) -> Any:
    """Open a checkpoint (GGUF file or config.json + safetensors directory), or explain."""

    p = Path(ref)
    if not p.exists():
        spec = None
        with contextlib.suppress(PrimasimError):
            spec = load_model(str(ref))
        if spec is not None:
            raise CheckpointError(f"{ref!r} is an architecture from the catalogue, not a file with weights",
                                  where="--model",
                                  fix="pass a GGUF file or a directory with config.json + *.safetensors, or add "
                                      "--random-weights to generate random weights for it into the cache")
        raise CheckpointError("no such file or directory", where=str(ref),
                              fix="pass a GGUF file or a directory with config.json + *.safetensors")
    if p.is_file() and p.suffix == ".json":
        p = p.parent
    return open_checkpoint(p)


def cached_random_weights(spec: ModelSpec, *, fmt: str = "safetensors", seed: int = 0) -> Path:
    """Random weights for a catalogue architecture, written once into the cache directory
    (`primasim.core.paths.cache_dir()/weights/<name>-<quant>-<fmt>-s<seed>`) and reused afterwards."""



    # <cache>/weights/<name>-<quant>-<fmt>-s<seed>/<name>: the checkpoint directory carries the
    # catalogue name, which is the name a config.json-only checkpoint gets (plans match by name)
    key = cache_dir() / "weights" / f"{spec.name}-{spec.quant}-{fmt}-s{seed}"
    final = key / spec.name
    out = final / "model.gguf" if fmt == "gguf" else final
    if (key / "COMPLETE").exists():
        return out
    key.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=key))
    try:
        inner = tmp / spec.name
        write_random_checkpoint(spec, inner if fmt == "safetensors" else inner / "model.gguf", fmt=fmt,  # type: ignore[arg-type]
                                seed=seed)
        if final.exists():
            shutil.rmtree(final)
        inner.rename(final)
        (key / "COMPLETE").write_text("ok\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def checkpoint_files(ckpt: Any) -> list[str]:
    path = Path(ckpt.path)
    if path.is_file():
        return [str(path)]
    return sorted(str(f) for f in path.iterdir() if f.suffix in (".safetensors", ".gguf"))


def device_copy(ckpt_path: str | Path, device: str) -> Path:
    """A copy of the checkpoint for one emulated device (lru residency, see Driver.setup): same
    names and bytes, another inode on the same disk, so the device has a page cache of its own for
    its weights. Made once, reused while it matches the source's size and is not older."""
    src = Path(ckpt_path).resolve()
    dst = src.parent / f".{src.name}.per-device" / device / src.name
    files = [src] if src.is_file() else sorted(f for f in src.iterdir() if f.is_file())
    for f in files:
        out = dst if src.is_file() else dst / f.name
        st = f.stat()
        if out.exists() and out.stat().st_size == st.st_size and out.stat().st_mtime >= st.st_mtime:
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        shutil.copyfile(f, tmp)
        os.replace(tmp, out)
        drop_file_cache([str(out)])  # written pages would otherwise start the run warm
    return dst


def drop_file_cache(files: list[str]) -> None:
    """Evict files from the page cache (unmapped pages): a run starts cold and every device pays
    for its own pages (cgroup v1 charges a page to whoever first reads it)."""
    for f in files:
        with contextlib.suppress(OSError):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # dirty pages (a file just written) are not dropped until written back
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ======================================================================================== driver
@dataclass
class Peer:
    name: str
    control: str
    sock: zmq.Socket
    local: bool
    data: str = ""
    offset: float = 0.0  # worker clock - driver clock
    last_pong: float = field(default_factory=time.monotonic)
    last_ping: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    ring: dict[str, Any] | None = None  # the worker's ring state from its last PONG
    ring_at: float = 0.0  # when that PONG arrived (driver's monotonic clock)


class Driver:
    """Start/connect workers for a plan and run it. Use as a context manager."""

    def __init__(self, plan: Plan, ckpt: Any, cluster: ClusterSpec, options: RunOptions = RunOptions()) -> None:
        self.plan = plan
        self.ckpt = ckpt
        self.spec: ModelSpec = ckpt.spec
        self.cluster = cluster
        self.opt = options
        self.ring = [plan.devices[0].name] + [d.name for d in plan.devices[1:] if d.layers > 0]
        self.ctx = zmq.Context()
        self.keys = wire.load_keys(options.keys) if options.keys else None
        self.peers: dict[str, Peer] = {}
        self.emu: Any = None
        self.tokens: list[dict[str, Any]] = []
        self.loads: dict[str, dict[str, Any]] = {}
        self.phase = "start-up"
        self.fingerprint = ckpt.fingerprint()
        self.advertise = ""
        self._on_token: Callable[[dict[str, Any]], None] | None = None
        self.unresponsive: set[str] = set()  # devices that stopped answering (not waited for at close)
        self._next_link_check = 0.0
        self.keep_tokens = True  # a server keeps none (its engine tracks requests)
        self.driver_cpu_s = 0.0

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------- start
    def start(self) -> None:
        local = [n for n in self.ring if not self.cluster.device(n).address]
        remote = [n for n in self.ring if self.cluster.device(n).address]
        if local and remote:
            # remote devices must reach the local ones: listen on every interface, advertise the
            # address this host uses towards the first remote device
            self.advertise = _local_ip_towards(_endpoint(str(self.cluster.device(remote[0]).address)))
        if local:
            self.emu = EmulatedCluster(self.cluster, local, checkpoint_files=checkpoint_files(self.ckpt),
                                       emulate=self.opt.emulate, heartbeat_timeout=self.opt.heartbeat_timeout,
                                       network=not remote, listen_host="0.0.0.0" if remote else "127.0.0.1")
            self.emu.__enter__()
            extra = ["--keys", self.opt.keys] if self.opt.keys else []
            for n in local:
                self.emu.spawn(n, extra, env=dict(self.opt.worker_env))
            for n in local:
                ready = self.emu.wait_ready(n, self.opt.connect_timeout)
                self._connect(n, ready["control"].replace("0.0.0.0", "127.0.0.1"), local=True)
        for n in remote:
            self._connect(n, _endpoint(str(self.cluster.device(n).address)), local=False)
        self._hello()

    def _connect(self, name: str, endpoint: str, *, local: bool) -> None:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if self.keys:
            wire.curve_client(s, self.keys)
        s.connect(endpoint)
        self.peers[name] = Peer(name, endpoint, s, local)

    def _hello(self) -> None:
        self.phase = "handshake"
        for p in self.peers.values():
            best = None
            for _ in range(3):  # clock offset: keep the exchange with the smallest round trip
                t0 = time.time()
                wire.send(p.sock, MsgType.HELLO, obj=wire.hello_payload("driver", device=p.name, time=t0))
                got = self._recv_from(p, self.opt.connect_timeout, "answer HELLO")
                t1 = time.time()
                msg = got
                if msg.type == MsgType.ERROR:
                    raise WorkerError(msg.obj.get("what", "refused the connection"), where=f"device {p.name}",
                                      fix=msg.obj.get("fix", ""))
                if msg.type != MsgType.HELLO_ACK:
                    raise WireError(f"expected HELLO_ACK, got {msg.type.name}", where=f"device {p.name}",
                                    fix="is this address a primasim worker?")
                if best is None or t1 - t0 < best[0]:
                    best = (t1 - t0, msg.obj["time"] - (t0 + t1) / 2, msg.obj)
            assert best is not None
            p.offset = best[1]
            p.info = best[2]
            if p.info.get("protocol") != wire.PROTOCOL_VERSION:
                raise WireError(f"worker speaks protocol v{p.info.get('protocol')}, the head v{wire.PROTOCOL_VERSION}",
                                where=f"device {p.name}", fix="install the same primasim version everywhere")
            port = p.info["data"].rsplit(":", 1)[1]
            host = self.advertise if p.local and self.advertise else p.control[len("tcp://"):].rsplit(":", 1)[0]
            p.data = f"tcp://{host}:{port}"
            p.last_pong = time.monotonic()

    def _recv_from(self, p: Peer, timeout: float, what: str) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(what)
            got = wire.recv(p.sock, 0.1, peer=f"device {p.name}")
            if got is not None:
                return got[1]
        raise WorkerError(f"did not {what} within {timeout:.0f} s ({p.control})", where=f"device {p.name}",
                          fix="check that `primasim worker` runs there and the address/port is reachable")

    # ---------------------------------------------------------------------------- liveness
    def _check_alive(self, what: str) -> None:
        if self.emu is None:
            return
        for n, ed in self.emu.devices.items():
            if ed.process is not None and ed.process.poll() is not None:
                raise WorkerError(f"worker died ({self.emu.exit_reason(n)}) while the run was at: {what}\n"
                                  f"{self.emu.log_tail(n)}", where=f"device {n}",
                                  fix="see the worker log above; a memory limit below the KV cache and "
                                      "buffers is OOM-killed")

    def _pump(self, done: Callable[[str, Message], bool], timeout: float, what: str,
              progress: bool = False, *, extra: dict[zmq.Socket, Callable[[zmq.Socket], bool]] | None = None,
              busy: Callable[[], bool] | None = None) -> None:
        """Handle messages from every worker until `done` returns True for one of them. `extra`:
        other sockets to wait on, whose callback returns True to stop; `busy`: the no-progress
        timeout runs only while it returns True (a server idle between requests is not stuck)."""
        poller = zmq.Poller()
        by_sock = {}
        for p in self.peers.values():
            poller.register(p.sock, zmq.POLLIN)
            by_sock[p.sock] = p
        for sock in extra or {}:
            poller.register(sock, zmq.POLLIN)
        checks = what in ("generate tokens", "serve requests")
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if busy is not None and not busy():
                deadline = now + timeout
            if now > deadline:
                where, why = self._diagnose(now)
                raise WorkerError(f"no progress for {timeout:.0f} s while waiting to {what}" + (f": {why}" if why else ""),
                                  where=where, fix="raise the timeout (--timeout) or check the devices' logs")
            if checks and now >= self._next_link_check:
                self._next_link_check = now + 0.25
                self._check_links(now)
                self._check_compute()
            for p in self.peers.values():
                if now - p.last_ping > self.opt.heartbeat_interval:
                    with contextlib.suppress(zmq.ZMQError):
                        wire.send(p.sock, MsgType.PING)
                    p.last_ping = now
                if now - p.last_pong > self.opt.heartbeat_timeout:
                    self._check_alive(what)
                    self.unresponsive.add(p.name)
                    state = self.emu.process_state(p.name) if self.emu is not None and p.local else ""
                    raise WorkerError(f"stopped answering heartbeats ({now - p.last_pong:.0f} s) while the run was "
                                      f"at: {what}" + (f"; its process is {state}" if state else ""),
                                      where=f"device {p.name}",
                                      fix="the device crashed, hangs or lost its network; restart its worker")
            self._check_alive(what)
            # sleep until a message or the next ping / check is due: a driver that woke every 50 ms
            # took CPU from the workers' compute on a host with few cores
            due = min([p.last_ping + self.opt.heartbeat_interval for p in self.peers.values()]
                      + ([self._next_link_check] if checks else []) + [deadline])
            for sock, _ in poller.poll(max(1, min(200, int((due - time.monotonic()) * 1000) + 1))):
                if extra and sock in extra:
                    if extra[sock](sock):
                        return
                    continue
                p = by_sock[sock]
                _, msg = wire.recv(sock, 0, peer=f"device {p.name}")  # type: ignore[misc]
                p.last_pong = time.monotonic()
                if msg.type == MsgType.PONG:
                    if isinstance(msg.obj.get("ring"), dict):
                        p.ring, p.ring_at = msg.obj["ring"], p.last_pong
                    continue
                if msg.type == MsgType.ERROR:
                    o = msg.obj
                    cls = WireError if o.get("kind") == "wire" else WorkerError
                    raise cls(o.get("what", "failed"), where=o.get("where") or f"device {p.name}",
                              fix=o.get("fix") or "see the worker's log")
                if msg.type == MsgType.TOKEN:
                    if self.keep_tokens:
                        self.tokens.append(msg.obj | {"device": p.name})
                    if self._on_token is not None:
                        self._on_token(msg.obj)
                    if progress:
                        deadline = time.monotonic() + timeout
                if done(p.name, msg):
                    return

    def serve_pump(self, on_message: Callable[[str, Message], None], *,
                   extra: dict[zmq.Socket, Callable[[zmq.Socket], bool]], busy: Callable[[], bool],
                   timeout: float) -> None:
        """A server's loop (primasim.serve.engine): every worker message goes to `on_message`,
        liveness and stall checks run as during generation, until an `extra` callback says stop.
        A dead, silent, hung or cut-off device raises WorkerError naming it."""
        self.keep_tokens = False

        def done(name: str, msg: Message) -> bool:
            on_message(name, msg)
            return False

        self._pump(done, timeout, "serve requests", progress=True, extra=extra, busy=busy)

    # ---------------------------------------------------------------------------- stalls
    def _links(self, now: float) -> list[dict[str, Any]]:
        """Every ring link with activations sent but not yet received, from the workers' last PONGs:
        {src, dst, in_flight, age (s since the oldest of them left src), dst_idle (s dst has been
        waiting for input, None if computing), fresh (both PONGs recent)}."""
        out = []
        fresh_within = max(2.0, 4 * self.opt.heartbeat_interval)
        for i, a in enumerate(self.ring):
            b = self.ring[(i + 1) % len(self.ring)]
            pa, pb = self.peers.get(a), self.peers.get(b)
            if a == b or pa is None or pb is None or pa.ring is None or pb.ring is None:
                continue
            ra, rb = pa.ring, pb.ring
            in_flight = int(ra.get("tx", 0)) - int(rb.get("rx", 0))
            if in_flight <= 0:
                continue
            first = int(rb.get("rx", 0)) + 1  # FIFO per link: the oldest message not received
            ages = [float(age) for n, age in ra.get("tx_log", []) if int(n) == first]
            if not ages:
                continue
            age = ages[0] + (now - pa.ring_at)
            idle = rb.get("idle_age")
            out.append({"src": a, "dst": b, "in_flight": in_flight, "age": age,
                        "dst_idle": None if idle is None else float(idle) + (now - pb.ring_at),
                        "fresh": now - pa.ring_at < fresh_within and now - pb.ring_at < fresh_within})
        return out

    def _check_links(self, now: float) -> None:
        """A ring link whose receiver has waited for input longer than `link_timeout` while an
        activation sent to it has not arrived is stalled (a dead link, a shaper at ~0, a firewall):
        fail now, naming both ends, instead of at the token timeout."""
        lt = self.opt.link_timeout
        for ln in self._links(now):
            if ln["fresh"] and ln["dst_idle"] is not None and min(ln["age"], ln["dst_idle"]) > lt:
                raise WorkerError(
                    f"ring link {ln['src']} -> {ln['dst']} stalled: {ln['in_flight']} activation(s) sent by "
                    f"{ln['src']} {ln['age']:.1f} s ago have not reached {ln['dst']}, which has been waiting for "
                    f"input for {ln['dst_idle']:.1f} s (both devices answer heartbeats)",
                    where=f"link {ln['src']} -> {ln['dst']} (devices {ln['src']}, {ln['dst']})",
                    fix="check the network between the two devices (Wi-Fi, cable, firewall, traffic shaping); "
                        "raise --link-timeout for links this slow")

    def _check_compute(self) -> None:
        """A device whose compute thread has run one window for far longer than its usual window
        while its control thread answers heartbeats (a deadlock, a starved or swapping device) is
        hung: fail naming it instead of waiting for the token timeout. Uses the age reported in the
        last PONG, so a late PONG never overstates it."""
        floor = self.opt.compute_timeout
        if floor <= 0:
            return
        for p in self.peers.values():
            r = p.ring or {}
            if r.get("item_age") is None or r.get("item_median") is None:
                continue
            age, med = float(r["item_age"]), max(float(r["item_median"]), 1e-6)
            if age > max(floor, 50 * med):
                raise WorkerError(
                    f"one window has been computing for {age:.1f} s, {age / med:.0f}x its median of "
                    f"{med * 1e3:.0f} ms, while the worker still answers heartbeats",
                    where=f"device {p.name}",
                    fix="the device's compute is hung or starved (swapping, CPU throttling, another load); check its "
                        "log and load, or raise --compute-timeout for devices this irregular")

    def _diagnose(self, now: float) -> tuple[str, str]:
        """Where a run without progress is stuck: (where, why) from the workers' last PONGs."""
        stuck = [ln for ln in self._links(now)]
        if stuck:
            ln = max(stuck, key=lambda x: x["age"])
            return (f"link {ln['src']} -> {ln['dst']} (devices {ln['src']}, {ln['dst']})",
                    f"{ln['in_flight']} activation(s) sent by {ln['src']} {ln['age']:.0f} s ago have not been taken "
                    f"in by {ln['dst']}" + (" (which is computing)" if ln["dst_idle"] is None else ""))
        busy = [(float(p.ring["busy_age"]) + (now - p.ring_at), p.name) for p in self.peers.values()
                if p.ring is not None and p.ring.get("busy_age") is not None]
        if busy:
            age, name = max(busy)
            return f"device {name}", f"it has been computing for {age:.0f} s"
        return "devices " + ", ".join(self.ring), "every device is waiting for input"

    def _broadcast_and_wait(self, mtype: MsgType, reply: MsgType, objs: dict[str, dict[str, Any]], timeout: float,
                            what: str) -> dict[str, dict[str, Any]]:
        got: dict[str, dict[str, Any]] = {}
        for n, o in objs.items():
            wire.send(self.peers[n].sock, mtype, obj=o)

        def done(name: str, msg: Message) -> bool:
            if msg.type == reply and name in objs:
                got[name] = msg.obj
            return len(got) == len(objs)

        self._pump(done, timeout, what)
        return got

    # ---------------------------------------------------------------------------- set-up
    def model_paths(self) -> dict[str, str]:
        """The checkpoint each device maps. Emulated devices in lru residency get a copy each
        (`device_copy`): they share this host's page cache, and the kernel's readahead around one
        device's page faults read its neighbours' layers -- the same file's pages, charged to the
        device that read them and found in memory by the neighbour (measured 2026-12-07, fidelity
        stream-3-lru/even-k4-noprefetch: a laptop with 36.5 MB of layers in 35 MB of room read 15.8
        MB a token; alone, with its own file, it reads 2.75x its layers: experiments/lru_readaround.py).
        Real devices have a page cache each. Planned residency reads exactly its own ranges (no
        read-around): one file serves every device."""
        path = str(Path(self.ckpt.path).resolve())
        out = {n: path for n in self.ring}
        emulated = [n for n in self.ring if self.emu is not None and self.emu.active and n in self.emu.devices]
        if residency_mode(self.opt.residency) == "lru" and len(emulated) > 1 and self.plan.weights == "mmap":
            for n in emulated:
                out[n] = str(device_copy(path, n))
        return out

    def setup(self, warmup_lengths: list[int], max_seq: int, max_batch: int = 1) -> None:
        self.phase = "load"
        segs = [[s.device, s.lap, s.start, s.end] for s in self.plan.segments()]
        prefetch = self.plan.prefetch if self.opt.prefetch is None else self.opt.prefetch
        paths = self.model_paths()
        objs = {}
        for i, n in enumerate(self.ring):
            succ = self.ring[(i + 1) % len(self.ring)]
            p = self.peers[n]
            lat, jit = 0.0, 0.0
            if p.local:  # emulated link: real devices have real latency
                lat = self.cluster.network.link(n, succ)[1] if succ != n else 0.0
                jit = self.cluster.network.jitter if succ != n else 0.0
            objs[n] = {"device": n, "head": i == 0, "segments": segs, "ring": self.ring, "successor": succ,
                       "successor_data": self.peers[succ].data, "model_path": paths[n],
                       "fingerprint": self.fingerprint, "max_seq": max_seq, "weights": self.plan.weights,
                       "prefetch": prefetch, "warmup_lengths": warmup_lengths, "latency": lat, "jitter": jit,
                       "seed": self.opt.seed,
                       "schedule": self.plan.schedule, "max_batch": max_batch, "options": dict(self.plan.options),
                       "connect_timeout": self.opt.ring_timeout or self.opt.connect_timeout, "residency": residency_mode(self.opt.residency),
                       "memory_hint": self._memory_hint(n),
                       "in_flight": int(self.opt.in_flight or self.plan.options.get("S") or len(self.ring))
                       if self.plan.schedule == "rpp" else 1}
            if self.opt.draft:  # every window verifies K + 1 positions per pass; the head runs the draft
                objs[n]["decode_lengths"] = [1, self.opt.draft_tokens + 1]
                if i == 0:
                    objs[n]["draft"] = {"path": str(Path(self.opt.draft).resolve()), "tokens": self.opt.draft_tokens}
        # set-up compiles without reading weights or allocating model memory; then (a cold start)
        # the few pages the checkpoint's checks read are dropped, each emulated device's memory is
        # limited to the runtime's own footprint + the device's memory, and only then are weights
        # mapped, KV caches allocated and weights read: every byte the model takes is inside the limit
        ready = self._broadcast_and_wait(MsgType.SETUP, MsgType.READY, objs, self.opt.setup_timeout, "compile")
        if self.opt.cold_start:
            self.phase = "release"
            self._broadcast_and_wait(MsgType.RELEASE, MsgType.ACK, {n: {} for n in self.ring}, 120, "drop weight pages")
        if self.emu is not None:
            for n in self.ring:
                if n in self.emu.devices:
                    self.emu.set_memory_budget(n)
        self.phase = "load"
        loads = self._broadcast_and_wait(MsgType.LOAD, MsgType.ACK, {n: {} for n in self.ring},
                                         self.opt.setup_timeout, "load weights within the memory budget")
        self.loads = {n: {**{f"setup_{k}": v for k, v in ready.get(n, {}).items() if k != "windows"}, **ld}
                      for n, ld in loads.items()}

    def _memory_hint(self, name: str) -> float | None:
        """The memory an emulated device will have for the model (its limit on top of the runtime's
        footprint), so its worker knows at set-up whether it may have to stream."""
        dev = self.cluster.device(name)
        if self.emu is not None and self.emu.active and name in self.emu.devices and dev.emulate is not None:
            return float(dev.emulate.memory_limit) or None
        return None

    # ---------------------------------------------------------------------------- generate
    def generate(self, prompts: list[list[int]], on_token: Callable[[dict[str, Any]], None] | None = None) -> Trace:
        self.phase = "generate"
        self._on_token = on_token
        self._broadcast_and_wait(MsgType.RESET, MsgType.ACK, {n: {} for n in self.ring}, 60, "reset")
        sched = self.plan.schedule
        in_flight = 1
        if sched == "rpp":
            in_flight = int(self.opt.in_flight or self.plan.options.get("S") or len(self.ring))
            if len(prompts) == 1:
                prompts = prompts * in_flight
        if sched == "batch":
            n = int(self.opt.n_requests or self.plan.options.get("requested_batch") or len(prompts))
            if len(prompts) < n:
                prompts = [prompts[i % len(prompts)] for i in range(n)]
        obj = {"prompts": prompts, "max_new_tokens": self.opt.max_new_tokens, "temperature": self.opt.temperature,
               "top_k": self.opt.top_k, "top_p": self.opt.top_p, "seed": self.opt.seed,
               "stop_ids": list(self.opt.stop_ids), "in_flight": in_flight, "schedule": sched,
               "return_logits": self.opt.return_logits, "options": dict(self.plan.options)}
        head = self.peers[self.ring[0]]
        self.tokens = []
        t0 = time.time()
        cpu0 = time.process_time()
        wire.send(head.sock, MsgType.GENERATE, obj=obj)
        done: dict[str, Any] = {}

        def finished(n: str, m: Message) -> bool:
            if m.type == MsgType.DONE and n == head.name:
                done.update(m.obj)
                return True
            return False

        self._pump(finished, self.opt.token_timeout, "generate tokens", progress=True)
        self.speculation = done.get("speculation")
        self.driver_cpu_s = time.process_time() - cpu0  # what the driver took from the devices' CPUs
        self.phase = "stats"
        stats = self._broadcast_and_wait(MsgType.STATS_REQ, MsgType.STATS, {n: {} for n in self.ring}, 60,
                                         "report measurements")
        return self._trace(t0, prompts, stats)

    def _trace(self, t0: float, prompts: list[list[int]], stats: dict[str, dict[str, Any]]) -> Trace:
        tr = Trace(source="run", system=self.plan.system)
        for i, pr in enumerate(prompts):
            tr.requests.append(Request(i, 0.0, len(pr), self.opt.max_new_tokens))
        head = self.peers[self.ring[0]]
        for t in self.tokens:
            tr.token(int(t["seq"]), int(t["index"]), t["time"] - head.offset - t0, int(t["token_id"]))
        for n, st in stats.items():
            off = self.peers[n].offset + t0
            mem = [["mem_available_bytes", t, v] for t, v in st.get("mem_samples", [])]
            tr.add_device(n, st["spans"], st["samples"] + mem, off)
            ds = dict(st["stats"])
            if self.emu is not None and n in self.emu.devices:
                ds.update(self.emu.cgroup_stats(n))
            ds.update({f"load_{k}": float(v) for k, v in self.loads.get(n, {}).items()
                       if isinstance(v, int | float) and not isinstance(v, bool)})
            tr.device_stats[n] = ds
        tr.meta = {"plan": self.plan.to_json(), "model": str(self.ckpt.path), "fingerprint": self.fingerprint,
                   "emulation": self.emu.describe() if self.emu is not None else {"emulated": False},
                   "ring": self.ring, "driver_cpu_s": self.driver_cpu_s,
                   "residency": residency_mode(self.opt.residency)}
        sp = getattr(self, "speculation", None)
        if sp:
            passes = [(int(d), int(a)) for d, a in sp["passes"]]
            tr.meta["speculation"] = {"draft": sp["draft"], "k": sp["k"], "draft_s": sp["draft_s"],
                                      **summarize(passes), "pass_log": [list(p) for p in passes]}
        return tr

    # ---------------------------------------------------------------------------- shutdown
    def close(self) -> None:
        for p in self.peers.values():
            with contextlib.suppress(zmq.ZMQError):
                wire.send(p.sock, MsgType.SHUTDOWN, obj={"reason": f"run ended at {self.phase}"})
        if self.emu is not None:
            # give workers a moment to exit on their own, then the emulator stops the rest
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and any(
                    d.process is not None and d.process.poll() is None for n, d in self.emu.devices.items()
                    if n not in self.unresponsive):
                time.sleep(0.02)
            self.emu.close()
        self.ctx.destroy(linger=0)


def _endpoint(addr: str) -> str:
    return addr if addr.startswith("tcp://") else f"tcp://{addr}"


def _local_ip_towards(endpoint: str) -> str:
    """The address of this host's interface on the route to `endpoint` (no packet is sent)."""

    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, int(port or 9)))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


# ======================================================================================== one call
def run_plan(plan: Plan, weights: str | Path | Any, cluster: ClusterSpec, prompts: list[list[int]],
             options: RunOptions = RunOptions(),
             on_token: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Check everything, run `plan` on `cluster` with these weights, return the measured trace.
    All input errors are raised before any worker starts."""
    try:
        residency_mode(options.residency)
    except ValueError as exc:
        raise PlanError(str(exc), where="--residency", fix="use --residency lru or --residency planned") from None
    ckpt = open_weights(weights) if isinstance(weights, str | Path) else weights
    spec: ModelSpec = ckpt.spec
    notes = check_plan(plan, spec, cluster)
    if not prompts or any(not p for p in prompts):
        raise PlanError("empty prompt", where="--prompt", fix="give at least one token")
    bad = [t for p in prompts for t in p if not 0 <= t < spec.vocab]
    if bad:
        raise PlanError(f"token id(s) {sorted(set(bad))[:5]} outside the vocabulary (0..{spec.vocab - 1})",
                        where="--prompt-ids", fix="use ids below the vocabulary size")
    k = 0
    if options.draft:  # speculative decoding: checked here, before any worker starts
        if plan.schedule != "ring":
            raise PlanError(f"speculative decoding runs on ring plans, not {plan.schedule!r}", where="--draft",
                            fix="plan with a prima or llama.cpp system")
        if options.draft_tokens < 1:
            raise PlanError(f"--draft-tokens must be >= 1, got {options.draft_tokens}", where="--draft-tokens",
                            fix="e.g. --draft-tokens 4 (or drop --draft)")
        try:
            check_compatible(spec, open_weights(options.draft).spec)
        except SpecError as exc:
            raise PlanError(exc.what, where="--draft", fix=exc.fix) from None
        k = options.draft_tokens
    need = max(len(p) for p in prompts) + options.max_new_tokens + k  # a pass may write K positions past the end
    max_seq = options.max_seq or plan.n_ctx
    if need > max_seq:
        if options.max_seq is None and need <= spec.max_context:
            max_seq = need
            notes.append(f"prompt + tokens ({need}) exceed the plan's n_ctx ({plan.n_ctx}); KV sized to {need}")
        else:
            raise PlanError(f"prompt + tokens = {need} exceed the context ({max_seq})", where="--tokens",
                            fix="generate fewer tokens or shorten the prompt")
    if plan.schedule == "rpp" and options.in_flight is not None:
        plan = replace(plan, options={**plan.options, "S": options.in_flight})
    drop_file_cache(checkpoint_files(ckpt) + (checkpoint_files(open_weights(options.draft)) if options.draft else []))
    lengths = sorted({len(p) for p in prompts} | {1} | ({k + 1} if k else set()))
    max_batch = 1
    if plan.schedule == "batch":
        n_req = int(options.n_requests or plan.options.get("requested_batch") or len(prompts))
        max_batch = min(n_req, int(plan.options.get("batch", 64)))
    with Driver(plan, ckpt, cluster, options) as d:
        d.start()
        d.setup(lengths, max_seq, max_batch)
        trace = d.generate(prompts, on_token)
        emu = d.emu.describe() if d.emu is not None else {"emulated": False, "limitations": []}
        loads = d.loads
    emu = dict(emu)
    emu["notes"] = notes
    trace.meta["notes"] = notes
    by_seq: dict[int, list[tuple[int, int]]] = {}
    logits: dict[int, list[tuple[int, list[float]]]] = {}
    for t in d.tokens:
        by_seq.setdefault(int(t["seq"]), []).append((int(t["index"]), int(t["token_id"])))
        if "logits" in t:
            logits.setdefault(int(t["seq"]), []).append((int(t["index"]), t["logits"]))
    ids = [[tid for _, tid in sorted(v)] for _, v in sorted(by_seq.items())]
    lg = [[x for _, x in sorted(v)] for _, v in sorted(logits.items())]
    return RunResult(plan, trace, ids, lg, emu, loads)
