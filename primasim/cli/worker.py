"""`primasim worker`: run one device's worker; the head (`primasim run`) connects to it."""

from __future__ import annotations

import argparse

from primasim.core.errors import SpecError
from primasim.runtime.wire import make_keys, show_keys
from primasim.runtime.worker import is_loopback, serve

from . import HELP

DEFAULT_LISTEN = "tcp://127.0.0.1:9000"


DESCRIPTION = """Listen for a `primasim run` head on ADDR (control) and ADDR's port + 1 (ring data). Put ADDR in the
cluster file as the device's `address`. By default the worker listens on loopback only; an address
other machines can reach needs --keys (or an explicit --insecure)."""  # argparse re-wraps it


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker", help=HELP["worker"],
        description=DESCRIPTION)
    p.add_argument("--listen", metavar="ADDR", default=DEFAULT_LISTEN,
                   help=f"tcp://HOST:PORT to listen on (default {DEFAULT_LISTEN}; port 0: any free port). A "
                        "non-loopback HOST needs --keys or --insecure")
    p.add_argument("--keys", metavar="DIR", help="CurveZMQ key folder: authenticate and encrypt all traffic "
                   "(create it with `primasim keys make DIR`, copy it to every device)")
    p.add_argument("--insecure", action="store_true",
                   help="listen on a non-loopback address without --keys: any machine that reaches the port can "
                        "join the cluster, send this worker commands and read the activations")
    p.add_argument("--make-keys", metavar="DIR", help="create a cluster key pair in DIR and exit "
                   "(same as `primasim keys make DIR`)")
    p.add_argument("--model", metavar="PATH", help="this device's path of the checkpoint, if it differs from "
                   "the head's (the file's fingerprint must still match)")
    p.add_argument("--name", default="", help="name shown in logs (default: host name)")
    p.add_argument("--once", action="store_true", help="exit after one session")
    p.add_argument("--heartbeat-timeout", type=float, default=10.0, metavar="S",
                   help="end the session when the head is silent this long (default 10 s)")
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.make_keys:
        print(make_keys(args.make_keys))
        print(f"fingerprint: {show_keys(args.make_keys)['fingerprint']}")
        return 0
    if not args.keys and not args.insecure and not is_loopback(args.listen):
        raise SpecError(f"refusing to listen on {args.listen} without --keys: any machine that can reach it could "
                        "join the cluster, send this worker commands and read its activations",
                        where="primasim worker --listen",
                        fix="create a key pair with `primasim keys make DIR`, copy DIR to every device and pass "
                            "--keys DIR here and to `primasim run`; or listen on loopback (tcp://127.0.0.1:PORT); "
                            "or add --insecure on a network you trust")
    return serve(args.listen, name=args.name, keys=args.keys, model_override=args.model, once=args.once,
                 heartbeat_timeout=args.heartbeat_timeout, ready_file=args.ready_file, parent_pid=args.parent_pid)
