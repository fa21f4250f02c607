"""The runtime's wire format: one fixed binary header plus raw tensor bytes, over zmq. No pickle.

Every message is a zmq multipart message of exactly two frames, ``[header, payload]`` (a ROUTER
socket adds the peer identity in front). The header is 60 bytes, little-endian:

======  ====  =============  ==========================================================
offset  size  field          meaning
======  ====  =============  ==========================================================
0       4     magic          ``b"PSIM"``: anything else is not a primasim message
4       2     version        protocol version (``PROTOCOL_VERSION``); must match exactly
6       1     type           message type (``MsgType``: HELLO, SETUP, ACT, TOKEN, ...)
7       1     dtype          payload encoding (``DType``: none, json, f32, f16, i32, i64, u8)
8       4     seq            sequence / request id (RPP and batched decode keep many in flight)
12      4     pos            position of the first token of the payload in its sequence
16      4     step           generated-token index of the sequence (0 = prefill)
20      2     lap            lap of the ring this activation is in (0 .. k-1)
22      2     segment        index into ``Plan.segments()`` of the window to run next
24      1     ndim           number of used entries in ``shape`` (0 .. 4)
25      1     flags          bit 0: payload checksum present (``FLAG_CRC``)
26      2     (padding)      zero
28      16    shape          4 x u32 tensor shape (unused entries zero)
44      8     payload_len    length of frame 2 in bytes; must equal prod(shape) * itemsize
52      4     payload_crc    CRC-32 of the payload (0 unless ``FLAG_CRC``)
56      4     header_crc     CRC-32 of header bytes 0..55
======  ====  =============  ==========================================================

Control messages (HELLO, SETUP, STATS, ERROR, ...) carry a UTF-8 JSON object (``DType.JSON``);
activations carry a raw C-ordered array. Decoding checks, in order: frame count, header size,
magic, version, header CRC, type, dtype, shape vs. length, payload CRC. Any failure raises
``WireError`` naming the peer and what to do about it; a receive never blocks without a timeout.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import math
import os
import platform
import stat
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from primasim import __version__
from primasim.core.errors import SpecError, WireError

PROTOCOL_VERSION = 1
MAGIC = b"PSIM"
FLAG_CRC = 0x01
HEADER = struct.Struct("<4sHBBIIIHHBB2x4IQII")
HEADER_SIZE = HEADER.size  # 60
MAX_NDIM = 4
assert HEADER_SIZE == 60


class MsgType(enum.IntEnum):
    HELLO = 1  # driver -> worker: who are you? (JSON: driver version, time)
    HELLO_ACK = 2  # worker -> driver: version, host, pid, data endpoint, clock
    SETUP = 3  # driver -> worker: plan, role, model path, fingerprint, neighbours
    READY = 4  # worker -> driver: loaded (JSON: timings, memory)
    ACT = 5  # worker -> worker: hidden-state activation (raw f32)
    TOKEN = 6  # head worker -> driver: one generated token (JSON)
    GENERATE = 7  # driver -> head worker: prompts and sampling options
    STATS_REQ = 8  # driver -> worker: send your measurements
    STATS = 9  # worker -> driver: spans, samples, totals (JSON)
    PING = 10  # driver -> worker: heartbeat
    PONG = 11  # worker -> driver: heartbeat reply
    ERROR = 12  # worker -> driver: a failure, as a message (JSON)
    SHUTDOWN = 13  # driver -> worker: end the session
    RELEASE = 14  # driver -> worker: drop this worker's weight pages from the page cache
    LOAD = 15  # driver -> worker: read the window's weights into memory (model load)
    DONE = 16  # head worker -> driver: generation finished (JSON summary)
    ACK = 17  # generic reply to RELEASE / LOAD / SHUTDOWN (JSON)
    RESET = 18  # driver -> worker: forget KV caches and measurements (next run)
    SUBMIT = 19  # driver -> head worker: one request of a serving stream (JSON: id, prompt ids, sampler)
    CANCEL = 20  # driver -> head worker: drop a request (waiting, or at its next ring turn)
    FINISHED = 21  # head worker -> driver: a request ended (JSON: id, reason length|stop|cancelled|error)


class DType(enum.IntEnum):
    NONE = 0
    JSON = 1
    F32 = 2
    F16 = 3
    I32 = 4
    I64 = 5
    U8 = 6


_NP_OF = {DType.F32: np.dtype("<f4"), DType.F16: np.dtype("<f2"), DType.I32: np.dtype("<i4"),
          DType.I64: np.dtype("<i8"), DType.U8: np.dtype("u1")}
_DT_OF = {v: k for k, v in _NP_OF.items()}


@dataclass
class Message:
    """A decoded message: header fields plus either an array or a JSON object."""

    type: MsgType
    seq: int = 0
    pos: int = 0
    step: int = 0
    lap: int = 0
    segment: int = 0
    array: np.ndarray | None = None
    obj: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0  # payload size on the wire


# ------------------------------------------------------------------------------------ encoding
def encode(msg_type: MsgType, *, array: np.ndarray | None = None, obj: dict[str, Any] | None = None,
           seq: int = 0, pos: int = 0, step: int = 0, lap: int = 0, segment: int = 0,
           crc: bool = True, version: int = PROTOCOL_VERSION) -> list[bytes | memoryview]:
    """Frames ``[header, payload]`` of one message (array: raw bytes, zero-copy when contiguous)."""
    if array is not None and obj is not None:
        raise ValueError("a message carries an array or a JSON object, not both")
    shape: tuple[int, ...] = ()
    if array is not None:
        arr = np.asarray(array)
        dt = _DT_OF.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
        if dt is None:
            raise ValueError(f"dtype {arr.dtype} cannot go on the wire (use {sorted(str(d) for d in _DT_OF)})")
        if arr.ndim > MAX_NDIM:
            raise ValueError(f"at most {MAX_NDIM} dimensions, got shape {arr.shape}")
        arr = np.asarray(arr, dtype=_NP_OF[dt], order="C")  # keeps 0-d arrays 0-d
        payload: bytes | memoryview = memoryview(arr.reshape(-1)).cast("B") if arr.size else b""
        shape = arr.shape
        dtype = dt
    elif obj is not None:
        payload = json.dumps(obj, separators=(",", ":")).encode()
        dtype = DType.JSON
        shape = (len(payload),)
    else:
        payload, dtype = b"", DType.NONE
    dims = list(shape) + [0] * (MAX_NDIM - len(shape))
    pcrc = zlib.crc32(payload) if crc else 0
    head = HEADER.pack(MAGIC, version, int(msg_type), int(dtype), seq, pos, step, lap, segment,
                       len(shape), FLAG_CRC if crc else 0, *dims, len(payload), pcrc, 0)
    hcrc = zlib.crc32(head[:HEADER_SIZE - 4])
    return [head[:HEADER_SIZE - 4] + struct.pack("<I", hcrc), payload]


# ------------------------------------------------------------------------------------ decoding
def decode(frames: list[Any], *, peer: str = "peer") -> Message:
    """Check and decode ``[header, payload]`` frames; raise WireError naming `peer` on junk."""
    fix_junk = (f"make sure only primasim processes of the same version talk to this port; "
                f"check the address of {peer}")
    if len(frames) != 2:
        raise WireError(f"expected 2 frames [header, payload], got {len(frames)}", where=f"message from {peer}",
                        fix=fix_junk)
    n_head = len(frames[0]) if isinstance(frames[0], zmq.Frame) else memoryview(frames[0]).nbytes
    if n_head != HEADER_SIZE:  # checked before copying: a junk frame may be large
        raise WireError(f"header is {n_head} bytes, expected {HEADER_SIZE}", where=f"message from {peer}",
                        fix=fix_junk)
    head = _bytes(frames[0])
    (magic, version, mtype, dtype, seq, pos, step, lap, segment, ndim, flags,
     d0, d1, d2, d3, plen, pcrc, hcrc) = HEADER.unpack(head)
    if magic != MAGIC:
        raise WireError(f"not a primasim message (magic {magic!r}, expected {MAGIC!r})",
                        where=f"message from {peer}", fix=fix_junk)
    if version != PROTOCOL_VERSION:
        raise WireError(f"peer speaks wire protocol v{version}, this process speaks v{PROTOCOL_VERSION}",
                        where=f"message from {peer}",
                        fix="install the same primasim version on every device and restart its worker")
    if zlib.crc32(head[:HEADER_SIZE - 4]) != hcrc:
        raise WireError("header checksum mismatch (corrupted header)", where=f"message from {peer}", fix=fix_junk)
    try:
        mt = MsgType(mtype)
        dt = DType(dtype)
    except ValueError:
        raise WireError(f"unknown message type {mtype} or dtype {dtype}", where=f"message from {peer}",
                        fix="install the same primasim version on every device") from None
    if ndim > MAX_NDIM:
        raise WireError(f"ndim {ndim} > {MAX_NDIM}", where=f"message from {peer}", fix=fix_junk)
    shape = (d0, d1, d2, d3)[:ndim]
    buf = memoryview(frames[1].bytes if isinstance(frames[1], zmq.Frame) else frames[1])
    if buf.nbytes != plen:
        raise WireError(f"payload is {buf.nbytes} bytes but the header says {plen} (truncated message?)",
                        where=f"message from {peer}", fix=fix_junk)
    if flags & FLAG_CRC and zlib.crc32(buf) != pcrc:
        raise WireError("payload checksum mismatch (corrupted payload)", where=f"message from {peer}",
                        fix="check the network path; a corrupted activation cannot be used")
    msg = Message(mt, seq, pos, step, lap, segment, nbytes=plen)
    if dt == DType.JSON:
        try:
            obj = json.loads(bytes(buf))
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, > 4300-digit numbers, deep nesting
            raise WireError(f"JSON payload does not parse ({exc})", where=f"message from {peer}", fix=fix_junk) from None
        if not isinstance(obj, dict):
            raise WireError("JSON payload is not an object", where=f"message from {peer}", fix=fix_junk)
        msg.obj = obj
    elif dt != DType.NONE:
        npdt = _NP_OF[dt]
        if math.prod(shape) * npdt.itemsize != plen:
            raise WireError(f"shape {shape} x {npdt} = {math.prod(shape) * npdt.itemsize} bytes, payload {plen}",
                            where=f"message from {peer}", fix=fix_junk)
        msg.array = np.frombuffer(buf, dtype=npdt).reshape(shape)
    elif plen:
        raise WireError("payload without a dtype", where=f"message from {peer}", fix=fix_junk)
    return msg


def _bytes(frame: Any) -> bytes:
    if isinstance(frame, zmq.Frame):
        return frame.bytes
    return bytes(frame)


# ------------------------------------------------------------------------------------ sockets
def send(sock: zmq.Socket, msg_type: MsgType, *, identity: bytes | None = None, **kw: Any) -> int:
    """Send one message (ROUTER sockets: to `identity`). Returns the payload size."""
    frames = encode(msg_type, **kw)
    if identity is not None:
        frames = [identity, *frames]
    sock.send_multipart(frames)
    return len(frames[-1])


def recv(sock: zmq.Socket, timeout: float | None, *, peer: str = "peer",
         router: bool = False) -> tuple[bytes | None, Message] | None:
    """Receive one message within `timeout` seconds (None: wait forever; use only with a
    separate watchdog). Returns (identity or None, message), or None on timeout."""
    if timeout is not None and not sock.poll(max(0, int(timeout * 1000))):
        return None
    frames = sock.recv_multipart()
    ident = None
    if router:
        if not frames:
            raise WireError("empty message", where=f"message from {peer}", fix="check the peer")
        ident = frames[0]
        frames = frames[1:]
    return ident, decode(frames, peer=peer)


def hello_payload(role: str, **extra: Any) -> dict[str, Any]:
    """What both sides say about themselves in HELLO / HELLO_ACK."""

    return {"role": role, "protocol": PROTOCOL_VERSION, "primasim": __version__, "host": platform.node(),
            "time": time.time(), **extra}


# ------------------------------------------------------------------------------------ CurveZMQ
# `--keys DIR`: DIR holds one cluster key pair written by `primasim keys make DIR`
# (zmq.auth.create_certificates: cluster.key + cluster.key_secret). Every device and the driver use
# that pair: workers are CURVE servers with it and accept only clients presenting its public key
# (a ZAP authenticator), clients expect it as the server key. Holders of DIR can join the cluster;
# everything on the wire is encrypted. Copy DIR to every machine over a trusted channel.
KEY_NAME = "cluster"


def fingerprint(public: bytes | str) -> str:
    """``SHA256:<base64>`` of the 32-byte public key (given in Z85, as zmq writes it)."""
    raw = z85.decode(public.encode() if isinstance(public, str) else public)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def make_keys(directory: str, *, force: bool = False) -> str:
    """Create the cluster key pair in `directory` (`primasim keys make`); refuse to overwrite one
    unless `force`. Returns the secret-key file."""
    secret = os.path.join(directory, f"{KEY_NAME}.key_secret")
    if os.path.exists(secret) and not force:
        raise SpecError(f"{secret} already exists: a new pair would lock out every device that has the old one",
                        where="primasim keys make", fix=f"use another folder, or add --force to replace it "
                        f"(then copy {directory} to every device again)")
    if not zmq.has("curve"):
        raise SpecError("this libzmq has no CURVE support", where="primasim keys",
                        fix="install pyzmq wheels (their bundled libzmq has CURVE)")
    if not os.path.isdir(directory):
        os.makedirs(directory)
        os.chmod(directory, 0o700)
    _, sec = zmq.auth.create_certificates(directory, KEY_NAME)
    os.chmod(sec, 0o600)
    return sec


def show_keys(directory: str) -> dict[str, str]:
    """Public key, fingerprint and files of the key pair in `directory` (`primasim keys show`)."""
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


def load_keys(directory: str) -> dict[str, bytes]:
    if not zmq.has("curve"):
        raise WireError("this libzmq has no CURVE support", where="--keys",
                        fix="install pyzmq wheels (bundled libzmq has CURVE) or drop --keys")
    secret = os.path.join(directory, f"{KEY_NAME}.key_secret")
    if not os.path.exists(secret):
        raise WireError(f"no {KEY_NAME}.key_secret in {directory}", where="--keys",
                        fix=f"create keys with `primasim keys make {directory}` and copy the folder "
                            "to every device")
    try:
        public, private = zmq.auth.load_certificate(secret)
    except (OSError, ValueError) as exc:
        raise WireError(f"cannot read the key pair ({exc})", where=secret, fix="re-create it with `primasim keys make --force DIR`") from None
    if private is None:
        raise WireError("the key file has no secret key", where=secret, fix="re-create it with `primasim keys make --force DIR`")
    return {"public": public, "secret": private, "dir": directory.encode()}


def start_authenticator(ctx: zmq.Context, keys: dict[str, bytes],
                        on_refused: Callable[[], None] | None = None) -> Any:
    """ZAP handler that admits only clients presenting the cluster public key.

    A callback rather than `configure_curve(location=...)`: that one reads keys from a folder,
    which would have to be written to disk and removed again."""
    cluster_key = keys["public"]

    class ClusterKeyOnly:
        def callback(self, domain: str, key: bytes) -> bool:
            if key == cluster_key:
                return True
            if on_refused is not None:
                on_refused()
            return False

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=ClusterKeyOnly())
    return auth


def curve_server(sock: zmq.Socket, keys: dict[str, bytes]) -> None:
    sock.curve_secretkey = keys["secret"]
    sock.curve_publickey = keys["public"]
    sock.curve_server = True


def curve_client(sock: zmq.Socket, keys: dict[str, bytes]) -> None:
    sock.curve_secretkey = keys["secret"]
    sock.curve_publickey = keys["public"]
    sock.curve_serverkey = keys["public"]
