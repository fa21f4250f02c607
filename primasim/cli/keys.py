"""`primasim keys`: make and show the cluster's CurveZMQ key pair (who may join a cluster).

One key pair per cluster: `primasim keys make DIR` writes ``DIR/cluster.key`` (public) and
``DIR/cluster.key_secret`` (public + secret, mode 0600). Every worker (`primasim worker --keys DIR`)
and the head (`primasim run --keys DIR`) use it; a peer without the secret cannot complete the
handshake. `primasim keys show DIR` prints the public key and its fingerprint, to compare across
machines after copying DIR (the worker prints the same fingerprint when it starts).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import stat

KEY_NAME = "cluster"  # primasim.runtime.wire.KEY_NAME (not imported: `runtime` imports JAX)


def fingerprint(public: bytes | str) -> str:
    """``SHA256:<base64>`` of the 32-byte public key (given in Z85, as zmq writes it)."""
    from zmq.utils import z85

    raw = z85.decode(public.encode() if isinstance(public, str) else public)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def make(directory: str, *, force: bool = False) -> str:
    """Create the cluster key pair in `directory`; refuse to overwrite one unless `force`."""
    from primasim.core.errors import SpecError

    secret = os.path.join(directory, f"{KEY_NAME}.key_secret")
    if os.path.exists(secret) and not force:
        raise SpecError(f"{secret} already exists: a new pair would lock out every device that has the old one",
                        where="primasim keys make", fix=f"use another folder, or add --force to replace it "
                        f"(then copy {directory} to every device again)")
    import zmq
    import zmq.auth

    if not zmq.has("curve"):
        raise SpecError("this libzmq has no CURVE support", where="primasim keys",
                        fix="install pyzmq wheels (their bundled libzmq has CURVE)")
    if not os.path.isdir(directory):
        os.makedirs(directory)
        os.chmod(directory, 0o700)
    _, sec = zmq.auth.create_certificates(directory, KEY_NAME)
    os.chmod(sec, 0o600)
    return sec


def show(directory: str) -> dict[str, str]:
    """Public key, fingerprint and files of the key pair in `directory`."""
    import zmq.auth

    from primasim.core.errors import SpecError

    pub = os.path.join(directory, f"{KEY_NAME}.key")
    sec = os.path.join(directory, f"{KEY_NAME}.key_secret")
    src = sec if os.path.exists(sec) else pub
    if not os.path.exists(src):
        raise SpecError(f"no {KEY_NAME}.key or {KEY_NAME}.key_secret in {directory}", where="primasim keys show",
                        fix=f"create a pair with `primasim keys make {directory}`")
    try:
        public, secret = zmq.auth.load_certificate(src)
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot read {src} ({exc})", where="primasim keys show",
                        fix=f"re-create the pair with `primasim keys make --force {directory}`") from None
    out = {"public_key": public.decode(), "fingerprint": fingerprint(public), "public_file": pub,
           "secret_file": sec if secret is not None else "(none: this folder cannot join a cluster)"}
    if secret is not None:
        mode = stat.S_IMODE(os.stat(sec).st_mode)
        if mode & 0o077:
            out["warning"] = f"{sec} is readable by others (mode {mode:o}): chmod 600 it"
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keys", help="make or show the cluster's CurveZMQ key pair (who may join a cluster)",
        description="One key pair per cluster. `make DIR` writes DIR/cluster.key and DIR/cluster.key_secret; copy "
                    "DIR to every device over a trusted channel (scp, USB stick) and pass --keys DIR to every "
                    "`primasim worker` and to `primasim run`. Anyone holding DIR can join. `show DIR` prints the "
                    "public key and its fingerprint, to check that every device has the same pair.")
    ks = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    m = ks.add_parser("make", help="create a key pair in DIR")
    m.add_argument("dir", metavar="DIR")
    m.add_argument("--force", action="store_true", help="replace an existing pair")
    s = ks.add_parser("show", help="print the public key and fingerprint of the pair in DIR")
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    if args.action == "make":
        sec = make(args.dir, force=args.force)
        info = show(args.dir)
        print(f"secret key: {sec} (keep it secret; copy {args.dir} to every device)")
        print(f"public key: {info['public_key']}")
        print(f"fingerprint: {info['fingerprint']}")
        return 0
    info = show(args.dir)
    if getattr(args, "json", False):
        print(json.dumps(info))
        return 0
    for k in ("fingerprint", "public_key", "public_file", "secret_file", "warning"):
        if k in info:
            print(f"{k.replace('_', ' ')}: {info[k]}")
    return 0
