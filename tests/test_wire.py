"""The wire format: round trips, and every kind of junk ends in a WireError naming the peer."""

from __future__ import annotations

import socket
import struct
import time
import zlib

import numpy as np
import pytest
import zmq
from hypothesis import given, settings, strategies as st

from primasim.core.errors import WireError
from primasim.runtime import wire
from primasim.runtime.wire import HEADER, HEADER_SIZE, MsgType


def _roundtrip(frames: list) -> wire.Message:
    return wire.decode([bytes(f) for f in frames], peer="test peer")


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
       dtype=st.sampled_from(["<f4", "<f2", "<i4", "<i8", "u1"]),
       seq=st.integers(0, 2**32 - 1), pos=st.integers(0, 2**32 - 1), step=st.integers(0, 2**32 - 1),
       lap=st.integers(0, 2**16 - 1), segment=st.integers(0, 2**16 - 1), crc=st.booleans())
def test_array_roundtrip(shape: list[int], dtype: str, seq: int, pos: int, step: int, lap: int, segment: int,
                         crc: bool) -> None:
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(shape) * 100).astype(dtype)
    m = _roundtrip(wire.encode(MsgType.ACT, array=a, seq=seq, pos=pos, step=step, lap=lap, segment=segment, crc=crc))
    assert (m.type, m.seq, m.pos, m.step, m.lap, m.segment) == (MsgType.ACT, seq, pos, step, lap, segment)
    assert m.array is not None and m.array.dtype == np.dtype(dtype) and m.array.shape == tuple(shape)
    np.testing.assert_array_equal(m.array, a)


@given(obj=st.dictionaries(st.text(max_size=8), st.one_of(st.integers(-10**9, 10**9), st.text(max_size=20),
                                                       st.lists(st.integers(0, 100), max_size=5)), max_size=6))
def test_json_roundtrip(obj: dict) -> None:
    m = _roundtrip(wire.encode(MsgType.SETUP, obj=obj))
    assert m.type == MsgType.SETUP and m.obj == obj and m.array is None


def test_header_layout_is_the_documented_one() -> None:
    frames = wire.encode(MsgType.ACT, array=np.zeros((2, 3), "<f4"), seq=7, pos=9, step=4, lap=1, segment=5)
    h = bytes(frames[0])
    assert len(h) == HEADER_SIZE == 60
    assert h[:4] == b"PSIM"
    assert struct.unpack_from("<H", h, 4)[0] == wire.PROTOCOL_VERSION
    assert h[6] == MsgType.ACT and h[7] == wire.DType.F32
    assert struct.unpack_from("<III", h, 8) == (7, 9, 4)
    assert struct.unpack_from("<HH", h, 20) == (1, 5)
    assert h[24] == 2
    assert struct.unpack_from("<4I", h, 28) == (2, 3, 0, 0)
    assert struct.unpack_from("<Q", h, 44)[0] == 24
    assert struct.unpack_from("<I", h, 52)[0] == zlib.crc32(bytes(frames[1]))
    assert struct.unpack_from("<I", h, 56)[0] == zlib.crc32(h[:56])


def _reheader(frames: list, **changes: int) -> list:
    """Rewrite header fields (and fix the header CRC) to fake a peer's message."""
    vals = list(HEADER.unpack(bytes(frames[0])))
    names = ["magic", "version", "type", "dtype", "seq", "pos", "step", "lap", "segment", "ndim", "flags",
             "d0", "d1", "d2", "d3", "plen", "pcrc", "hcrc"]
    for k, v in changes.items():
        vals[names.index(k)] = v
    h = HEADER.pack(*vals)
    h = h[:56] + struct.pack("<I", zlib.crc32(h[:56]))
    return [h, bytes(frames[1])]


@pytest.mark.parametrize("mutate, needle", [
    (lambda f: [b"junk"], "expected 2 frames"),
    (lambda f: [b"x" * 10, f[1]], "header is 10 bytes"),
    (lambda f: [b"HTTP" + bytes(f[0])[4:], f[1]], "not a primasim message"),
    (lambda f: _reheader(f, version=wire.PROTOCOL_VERSION + 1), "protocol v2"),
    (lambda f: [bytes(f[0])[:30] + b"\xff" + bytes(f[0])[31:], f[1]], "header checksum"),
    (lambda f: _reheader(f, type=250), "unknown message type"),
    (lambda f: [f[0], bytes(f[1])[:-4]], "truncated"),
    (lambda f: [f[0], b"\xff" * 4 + bytes(f[1])[4:]], "payload checksum"),
    (lambda f: _reheader(f, d1=5), "shape"),
])
def test_junk_is_a_wire_error(mutate, needle: str) -> None:
    frames = wire.encode(MsgType.ACT, array=np.arange(8, dtype="<f4").reshape(2, 4))
    with pytest.raises(WireError) as ei:
        wire.decode(mutate([bytes(x) for x in frames]), peer="device D7")
    assert needle in ei.value.message
    assert "device D7" in ei.value.message and "fix:" in ei.value.message


def test_version_mismatch_says_how_to_fix() -> None:
    frames = wire.encode(MsgType.HELLO, obj={}, version=wire.PROTOCOL_VERSION + 1)
    with pytest.raises(WireError, match="same primasim version"):
        wire.decode(frames, peer="laptop")


def test_bad_json_payload() -> None:
    frames = wire.encode(MsgType.SETUP, obj={"a": 1})
    bad = b"{not json"
    frames = _reheader(frames, plen=len(bad), pcrc=zlib.crc32(bad), d0=len(bad))
    frames[1] = bad
    with pytest.raises(WireError, match="JSON"):
        wire.decode(frames, peer="p")


def test_unsupported_array_dtype_is_refused_at_the_sender() -> None:
    with pytest.raises(ValueError, match="cannot go on the wire"):
        wire.encode(MsgType.ACT, array=np.zeros(3, np.complex64))


# ------------------------------------------------------------------------------- real sockets
class _Ctx:
    """A zmq context whose sockets are all closed explicitly at teardown: a socket left to the
    garbage collector warns (an error here) in its __del__ without closing, and term() then hangs."""

    def __init__(self) -> None:
        self.c = zmq.Context()
        self.socks: list[zmq.Socket] = []

    def socket(self, kind: int) -> zmq.Socket:
        s = self.c.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        self.socks.append(s)
        return s


@pytest.fixture
def ctx():
    c = _Ctx()
    yield c
    for s in c.socks:
        s.close(linger=0)
    c.c.term()


def test_real_socket_roundtrip_and_timeout(ctx: _Ctx) -> None:
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    wire.send(push, MsgType.ACT, array=x, seq=2, segment=3)
    got = wire.recv(pull, 5.0, peer="pusher")
    assert got is not None
    np.testing.assert_array_equal(got[1].array, x)
    t0 = time.monotonic()
    assert wire.recv(pull, 0.2, peer="pusher") is None  # nothing more: a timeout, not a hang
    assert time.monotonic() - t0 < 30  # not a hang


def test_junk_from_a_zmq_peer_is_a_wire_error(ctx: _Ctx) -> None:
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    push.send_multipart([b"GET / HTTP/1.1\r\n", b"junk"])
    with pytest.raises(WireError, match="ring predecessor"):
        wire.recv(pull, 5.0, peer="ring predecessor")


def test_raw_tcp_garbage_is_refused_or_dropped(ctx: _Ctx) -> None:
    """A non-zmq client (port scanner, HTTP): libzmq either drops the connection in its handshake
    or (ZMTP 1.0 compatibility) frames the bytes as a message, which decode refuses. Never a hang."""
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 4)
        t0 = time.monotonic()
        try:
            got = wire.recv(pull, 0.5, peer="scanner")
        except WireError as exc:
            assert "scanner" in exc.message
        else:
            assert got is None
        assert time.monotonic() - t0 < 30  # not a hang


def test_curve_keys_authenticate_and_reject_strangers(ctx: _Ctx, tmp_path) -> None:
    keys = wire.load_keys(str(tmp_path / "k") if wire.make_keys(str(tmp_path / "k")) else "")
    auth = wire.start_authenticator(ctx.c, keys)
    try:
        server = ctx.socket(zmq.PULL)
        wire.curve_server(server, keys)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        good = ctx.socket(zmq.PUSH)
        wire.curve_client(good, keys)
        good.connect(f"tcp://127.0.0.1:{port}")
        wire.send(good, MsgType.PING)
        got = wire.recv(server, 5.0, peer="good")
        assert got is not None and got[1].type == MsgType.PING
        # a client with another key pair is refused by the authenticator: nothing arrives
        wire.make_keys(str(tmp_path / "other"))
        other = wire.load_keys(str(tmp_path / "other"))
        bad = ctx.socket(zmq.PUSH)
        bad.curve_secretkey, bad.curve_publickey, bad.curve_serverkey = other["secret"], other["public"], keys["public"]
        bad.connect(f"tcp://127.0.0.1:{port}")
        wire.send(bad, MsgType.PING)
        assert wire.recv(server, 0.5, peer="stranger") is None
    finally:
        auth.stop()


def test_missing_keys_folder_is_explained(tmp_path) -> None:
    with pytest.raises(WireError, match="keys make"):
        wire.load_keys(str(tmp_path))
