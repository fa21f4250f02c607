"""`primasim worker`: run one device's worker; the head (`primasim run`) connects to it."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker", help="serve one device of a real cluster (the head connects to it)",
        description="Listen for a `primasim run` head on ADDR (control) and ADDR's port + 1 (ring data). "
                    "Put ADDR in the cluster file as the device's `address`.")
    p.add_argument("--listen", metavar="ADDR", help="tcp://HOST:PORT to listen on (port 0: any free port)")
    p.add_argument("--keys", metavar="DIR", help="CurveZMQ key folder: authenticate and encrypt all traffic "
                   "(create it with --make-keys, copy it to every device)")
    p.add_argument("--make-keys", metavar="DIR", help="create a cluster key pair in DIR and exit")
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
    from ._errors import SpecError

    if args.make_keys:
        from runtime.wire import make_keys

        print(make_keys(args.make_keys))
        return 0
    if not args.listen:
        raise SpecError("--listen ADDR is required", where="primasim worker", fix="e.g. --listen tcp://0.0.0.0:9000")
    from runtime.worker import serve

    return serve(args.listen, name=args.name, keys=args.keys, model_override=args.model, once=args.once,
                 heartbeat_timeout=args.heartbeat_timeout, ready_file=args.ready_file, parent_pid=args.parent_pid)
