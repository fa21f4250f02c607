"""`primasim keys`: make and show the cluster's CurveZMQ key pair (who may join a cluster).

One key pair per cluster: `primasim keys make DIR` writes ``DIR/cluster.key`` (public) and
``DIR/cluster.key_secret`` (public + secret, mode 0600). Every worker (`primasim worker --keys DIR`)
and the head (`primasim run --keys DIR`) use it; a peer without the secret cannot complete the
handshake. `primasim keys show DIR` prints the public key and its fingerprint, to compare across
machines after copying DIR (the worker prints the same fingerprint when it starts).
"""

from __future__ import annotations

import argparse
import json

from primasim.runtime.wire import make_keys, show_keys

from . import HELP

DESCRIPTION = """One key pair per cluster. `make DIR` writes DIR/cluster.key and DIR/cluster.key_secret; copy DIR to
every device over a trusted channel (scp, USB stick) and pass --keys DIR to every `primasim worker`
and to `primasim run`. Anyone holding DIR can join. `show DIR` prints the public key and its
fingerprint, to check that every device has the same pair."""  # argparse re-wraps it


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keys", help=HELP["keys"],
        description=DESCRIPTION)
    ks = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    m = ks.add_parser("make", help="create a key pair in DIR")
    m.add_argument("dir", metavar="DIR")
    m.add_argument("--force", action="store_true", help="replace an existing pair")
    s = ks.add_parser("show", help="print the public key and fingerprint of the pair in DIR")
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "make":
        sec = make_keys(args.dir, force=args.force)
        info = show_keys(args.dir)
        print(f"secret key: {sec} (keep it secret; copy {args.dir} to every device)")
        print(f"public key: {info['public_key']}")
        print(f"fingerprint: {info['fingerprint']}")
        return 0
    info = show_keys(args.dir)
    if getattr(args, "json", False):
        print(json.dumps(info))
        return 0
    for k in ("fingerprint", "public_key", "public_file", "secret_file", "warning"):
        if k in info:
            print(f"{k.replace('_', ' ')}: {info[k]}")
    return 0
