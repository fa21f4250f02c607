"""The worker process: binds the control and data sockets, serves the driver on a control thread
and runs the session's ring on the compute thread."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import zmq

from primasim.core.errors import PrimasimError, WireError, WorkerError

from .. import wire
from .._measure import name_thread
from ..wire import Message, MsgType
from .serving import serve_command
from .session import Session

CMD_ENDPOINT = "inproc://primasim-cmd"


class Worker:
    """The worker process: a control thread (driver link, heartbeat) and a compute loop (ring)."""

    def __init__(self, listen: str, *, name: str = "", keys: str | None = None, model_override: str | None = None,
                 once: bool = False, heartbeat_timeout: float = 10.0, ready_file: str | None = None,
                 parent_pid: int | None = None) -> None:
        self.name = name or os.uname().nodename
        self.once = once
        self.heartbeat_timeout = heartbeat_timeout
        self.model_override = model_override
        self.parent_pid = parent_pid
        self.ctx = zmq.Context()
        self.keys = wire.load_keys(keys) if keys else None
        self.auth = None
        self.refused_peers = 0
        if self.keys:
            self.auth = self._start_authenticator()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.keys:
            wire.curve_server(self.control, self.keys)
        self.control_ep = _bind(self.control, listen)
        self.data = self.ctx.socket(zmq.PULL)
        self.data.setsockopt(zmq.LINGER, 0)
        self.data.setsockopt(zmq.RCVHWM, 1000)
        if self.keys:
            wire.curve_server(self.data, self.keys)
        host, port = self.control_ep.rsplit(":", 1)
        want = listen.rsplit(":", 1)[1]
        self.data_ep = _bind(self.data, f"{host}:{int(port) + 1}" if want not in ("0", "*") else f"{host}:0")
        self.driver: bytes | None = None
        self.closing = False
        self.last_heard = time.monotonic()
        self.session: Session | None = None
        self.stop_flag = threading.Event()
        self.cmd_ctl = self.ctx.socket(zmq.PAIR)
        self.cmd_ctl.bind(CMD_ENDPOINT)
        self.cmd = self.ctx.socket(zmq.PAIR)
        self.cmd.connect(CMD_ENDPOINT)
        self._emit_lock = threading.Lock()
        if ready_file:
            tmp = ready_file + ".tmp"
            Path(tmp).write_text(json.dumps({"control": self.control_ep, "data": self.data_ep, "pid": os.getpid()}))
            os.replace(tmp, ready_file)

    def _start_authenticator(self) -> Any:
        """Admit only peers presenting the cluster's public key; name the first few refusals."""
        assert self.keys is not None

        def refused() -> None:
            self.refused_peers += 1
            if self.refused_peers <= 5:
                print(f"primasim worker {self.name}: refused a peer presenting another key", file=sys.stderr,
                      flush=True)

        return wire.start_authenticator(self.ctx, self.keys, on_refused=refused)

    # ---------------------------------------------------------------------------- control thread
    def _control_loop(self) -> None:
        name_thread()
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.cmd_ctl, zmq.POLLIN)
        while not self.stop_flag.is_set():
            events = dict(poller.poll(100))
            if self.control in events:
                try:
                    got = wire.recv(self.control, 0, peer="driver", router=True)
                except WireError as exc:
                    print(f"primasim worker {self.name}: {exc.message}", file=sys.stderr, flush=True)
                    got = None
                if got is not None:
                    try:
                        self._on_control(*got)
                    except zmq.ZMQError as exc:  # a reply to a peer that has gone (ROUTER_MANDATORY)
                        if exc.errno != zmq.EHOSTUNREACH:
                            raise
                        print(f"primasim worker {self.name}: a driver left before the reply to its "
                              f"{got[1].type.name}", file=sys.stderr, flush=True)
            if self.cmd_ctl in events:
                frames = self.cmd_ctl.recv_multipart()
                if self.driver is not None:
                    with contextlib.suppress(zmq.ZMQError):
                        self.control.send_multipart([self.driver, *frames])
                    if self.closing and wire.decode(frames, peer="compute thread").type == MsgType.ACK:
                        self.driver, self.closing = None, False  # session over: accept the next driver
            if self.driver is not None and time.monotonic() - self.last_heard > self.heartbeat_timeout:
                print(f"primasim worker {self.name}: no heartbeat from the driver for "
                      f"{self.heartbeat_timeout:.0f} s; ending the session", file=sys.stderr, flush=True)
                self.driver = None
                if self.once:
                    os._exit(3)
                self._forward(wire.encode(MsgType.SHUTDOWN, obj={"reason": "heartbeat lost"}))
            if self.parent_pid and os.getppid() != self.parent_pid:
                os._exit(4)  # the driver that spawned us is gone

    def _on_control(self, ident: bytes | None, msg: Message) -> None:
        assert ident is not None
        if msg.type == MsgType.HELLO:
            if self.driver is not None and self.driver != ident and time.monotonic() - self.last_heard < self.heartbeat_timeout:
                wire.send(self.control, MsgType.ERROR, identity=ident,
                          obj={"what": f"worker {self.name} is busy with another driver", "fix": "wait or restart it"})
                return
            self.driver = ident
            self.last_heard = time.monotonic()
            wire.send(self.control, MsgType.HELLO_ACK, identity=ident,
                      obj=wire.hello_payload("worker", name=self.name, pid=os.getpid(), data=self.data_ep,
                                             control=self.control_ep, echo=msg.obj.get("time")))
            return
        if ident != self.driver:
            wire.send(self.control, MsgType.ERROR, identity=ident,
                      obj={"what": "send HELLO first", "fix": "connect through primasim's driver"})
            return
        self.last_heard = time.monotonic()
        if msg.type == MsgType.PING:
            pong: dict[str, Any] = {"time": time.time()}
            session = self.session
            if session is not None:
                with contextlib.suppress(Exception):  # a session being replaced: no state this time
                    pong["ring"] = session.ring_state()
            wire.send(self.control, MsgType.PONG, identity=ident, obj=pong)
            return
        if msg.type == MsgType.SHUTDOWN:
            self.closing = True
        self._forward(wire.encode(msg.type, obj=msg.obj, seq=msg.seq))

    def _forward(self, frames: list[Any]) -> None:
        self.cmd_ctl.send_multipart(frames)

    def emit(self, mtype: MsgType, obj: dict[str, Any]) -> None:
        """Compute thread -> driver (through the control thread)."""
        with self._emit_lock:
            self.cmd.send_multipart(wire.encode(mtype, obj=obj))

    # ---------------------------------------------------------------------------- compute loop
    def serve(self) -> int:
        ctl = threading.Thread(target=self._control_loop, name="primasim-control", daemon=True)
        ctl.start()
        poller = zmq.Poller()
        poller.register(self.cmd, zmq.POLLIN)
        poller.register(self.data, zmq.POLLIN)
        code = 0
        try:
            while True:
                pending = self.session is not None and self.session.sample_at is not None
                events = dict(poller.poll(1 if pending else 200))
                if not events and pending and self.session is not None:
                    self.session.on_idle()
                if self.cmd in events:
                    msg = wire.decode(self.cmd.recv_multipart(), peer="control thread")
                    if not self._on_command(msg):
                        if self.once:
                            break
                if self.data in events:
                    try:
                        got = wire.recv(self.data, 0, peer="ring predecessor")
                    except WireError as exc:
                        # a corrupted activation cannot be used: the run has to stop, saying why
                        self.emit(MsgType.ERROR, {"what": exc.what, "where": f"device {self.name}: {exc.where or ''}",
                                                  "fix": exc.fix or "", "kind": "wire"})
                        continue
                    if got is None:
                        continue
                    _, msg = got
                    if self.session is None or msg.type != MsgType.ACT:
                        self.emit(MsgType.ERROR, {"what": f"unexpected {msg.type.name} on the data socket",
                                                  "where": f"device {self.name}: data socket", "kind": "wire",
                                                  "fix": "check that only ring neighbours connect to it"})
                        continue
                    self._guard(lambda m=msg: self.session.on_act(m))  # type: ignore[union-attr]
        except KeyboardInterrupt:
            code = 130
        finally:
            self.stop_flag.set()
            if self.session is not None:
                self.session.close()
            ctl.join(timeout=1.0)
            if self.auth is not None:
                self.auth.stop()
            self.ctx.destroy(linger=0)
        return code

    def _guard(self, fn: Any) -> bool:
        try:
            fn()
            return True
        except PrimasimError as exc:
            self.emit(MsgType.ERROR, {"what": exc.what, "where": exc.where or f"device {self.name}", "fix": exc.fix or ""})
        except Exception as exc:
            self.emit(MsgType.ERROR, {"what": f"{type(exc).__name__}: {exc}", "where": f"device {self.name}",
                                      "fix": "see the worker's log", "traceback": traceback.format_exc()})
            traceback.print_exc()
        return False

    def _on_command(self, msg: Message) -> bool:
        """Handle a driver command; False ends the session."""
        t = msg.type
        if t == MsgType.SETUP:
            def setup() -> None:
                if self.session is not None:
                    self.session.close()
                self.session = Session(self, msg.obj)
                s = self.session
                self.emit(MsgType.READY, {"load_s": s.load_s, "warmup_s": s.warmup_s, "windows": s.windows,
                                          "weight_resident_bytes": s.setup_resident, **s.footprint})
            self._guard(setup)
        elif t == MsgType.RELEASE and self.session is not None:
            self._guard(lambda: self.emit(MsgType.ACK, {"op": "release", **self.session.release()}))  # type: ignore[union-attr]
        elif t == MsgType.LOAD and self.session is not None:
            self._guard(lambda: self.emit(MsgType.ACK, {"op": "load", **self.session.load()}))  # type: ignore[union-attr]
        elif t == MsgType.GENERATE and self.session is not None:
            self._guard(lambda: self.session.generate(msg.obj))  # type: ignore[union-attr]
        elif t in (MsgType.SUBMIT, MsgType.CANCEL):
            self._guard(lambda: serve_command(self.session, msg))
        elif t == MsgType.STATS_REQ and self.session is not None:
            self._guard(lambda: self.emit(MsgType.STATS, self.session.stats()))  # type: ignore[union-attr]
        elif t == MsgType.RESET and self.session is not None:
            self.session.recycle_kv()
            self.session.reset_measurements()
            self.emit(MsgType.ACK, {"op": "reset"})
        elif t == MsgType.SHUTDOWN:
            if self.session is not None:
                self.session.close()
                self.session = None
            self.emit(MsgType.ACK, {"op": "shutdown"})
            time.sleep(0.05)  # let the control thread pass the ACK on
            return False
        else:
            self.emit(MsgType.ERROR, {"what": f"{t.name} before SETUP", "fix": "send SETUP first"})
        return True


def _bind(sock: zmq.Socket, addr: str) -> str:
    """Bind `addr` (port 0 or * = a free port); return the endpoint actually bound."""
    if not addr.startswith("tcp://"):
        addr = "tcp://" + addr
    host, _, port = addr[len("tcp://"):].rpartition(":")
    if not host or not port:
        raise WorkerError(f"bad listen address {addr!r}", where="--listen", fix="use tcp://HOST:PORT")
    try:
        if port in ("0", "*"):
            p = sock.bind_to_random_port(f"tcp://{host}")
            return f"tcp://{host}:{p}"
        sock.bind(addr)
    except zmq.ZMQError as exc:
        raise WorkerError(f"cannot listen on {addr}: {exc}", where="--listen",
                          fix="pick a free port and an address of this machine") from None
    return addr


def listen_host(addr: str) -> str:
    """The host part of a listen address (tcp://HOST:PORT, [v6]:PORT, HOST:PORT)."""
    if addr.startswith("tcp://"):
        addr = addr[len("tcp://"):]
    host = addr.rpartition(":")[0] if ":" in addr else addr
    return host.strip("[]")


def is_loopback(addr: str) -> bool:
    """Whether a listen address is reachable from this machine only (127.0.0.0/8, ::1, localhost).
    A name is resolved: loopback only if every address it resolves to is. Wildcards (*, 0.0.0.0,
    ::), interface names and names that do not resolve count as reachable from elsewhere."""

    host = listen_host(addr)
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


def serve(listen: str, **kw: Any) -> int:
    """Run a worker until its session ends (--once) or forever."""
    w = Worker(listen, **kw)
    auth = "open to any peer that reaches it"
    if w.keys:
        auth = f"CurveZMQ, cluster key {wire.fingerprint(w.keys['public'])}"
    print(f"primasim worker {w.name}: control {w.control_ep}, data {w.data_ep} ({auth})", file=sys.stderr, flush=True)
    return w.serve()
