"""Bad input, fuzzed: every input parser answers junk with a clear error, never a crash.

Longer than ~600 lines: one property (junk in, one clear error out) over every parser, with the
file writers that make each format's junk; split by format it would repeat the harness.

Each target below takes one hypothesis-drawn input and feeds it to a parser. The only acceptable
outcomes are acceptance or a PrimasimError subclass (SpecError, PlanError, CheckpointError,
WireError) that says where and how to fix it; a KeyError, struct.error, UnicodeDecodeError,
OverflowError, RecursionError, MemoryError, a numpy error, ... from inside a library is a bug, and
so is a hang or an allocation the input's size does not pay for. Parsers:

- cluster files (`load_cluster`: TOML text, structured edits, `base` chains), model catalogue TOML,
  Hugging Face config.json text, GGUF metadata of the wrong types (`from_gguf`);
- plan files (`Plan.from_json` and the validation an accepted plan goes through);
- checkpoints (`open_checkpoint`): safetensors and GGUF files built with the project's writer, then
  truncated, bit-flipped, length fields overwritten (2**63, ...), header entries edited to absurd
  shapes, offsets and dtypes, config.json values made huge;
- the wire decoder (`primasim.runtime.wire.decode`): random frames, wrong frame counts, header fields
  rewritten with a valid CRC (version, type, dtype, ndim, shape, payload length), truncated and
  corrupted payloads, JSON payloads; peak allocation measured with tracemalloc.

tests/test_cluster.py and tests/test_model.py fuzz the parsed dicts; this file fuzzes the bytes.
experiments/fuzz.py runs the same TARGETS for many more examples and tabulates the outcomes.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
import tomllib
import tracemalloc
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings, strategies as st

from primasim import load_model
from primasim.core.cluster import load_cluster
from primasim.core.errors import PrimasimError
from primasim.core.model_sources import _load_catalogue, catalogue, from_gguf, from_hf_config_file
from primasim.core.paths import data_dir
from primasim.core.plan import DevicePlan, Plan, violations
from primasim.runtime import load_tokenizer, open_checkpoint, wire, write_random_checkpoint
from primasim.runtime.wire import HEADER, HEADER_SIZE, MsgType

MAX_MESSAGE = 4000  # characters: an error that echoes megabytes of junk is not a clear one

_WORK = Path(tempfile.mkdtemp(prefix="primasim-fuzz-"))
atexit.register(shutil.rmtree, _WORK, True)


def _scratch(name: str) -> Path:
    d = _WORK / f"{name}-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _write(path: Path, data: bytes) -> Path:
    """Write via rename: a new inode, so no mapping of an earlier version sees the new bytes."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def check_error(exc: BaseException) -> None:
    """A parser's error must be a PrimasimError saying what, where and how to fix it, briefly."""
    assert isinstance(exc, PrimasimError), f"{type(exc).__name__}: {exc}"
    assert exc.what and exc.where and exc.fix, exc.message
    assert len(exc.message) < MAX_MESSAGE, exc.message[:300]


# ---------------------------------------------------------------------------------- shared junk
junk_scalar = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.sampled_from([-1, 0, 2**31, 2**63, 10**30])
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
junk = st.recursive(junk_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=6)
# text a JSON / TOML reader chokes on in ways other than a syntax error
nasty_json = st.sampled_from(["[" * 5000, "{\"a\":" * 3000, "1" * 5000, "-" + "9" * 5000, "1e999999", "NaN",
                              "[1e309]", "\"\\ud800\"", "{\"a\": 1, \"a\": 2}", "\"" + "x" * 10000 + "\""])
nasty_toml_value = st.sampled_from(["[" * 3000, "{a=" * 3000, "1" * 5000, "0x" + "f" * 5000, "1e99999",
                                    "nan", "-inf", "\"\\uD800\"", "1979-05-27T07:32:00Z", "[[1, 2], {}]"])


def _splice(text: bytes, pos: int, insert: bytes, cut: int) -> bytes:
    pos = min(pos, len(text))
    return text[:pos] + insert + text[pos + cut:]


def text_mutations(valid: bytes, nasty: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """Byte-level junk around a valid text file: truncations, flips, splices of nasty values, noise."""
    n = len(valid)
    return st.one_of(
        st.integers(0, n).map(lambda k: valid[:k]),
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=6).map(
            lambda flips: _flip(valid, flips)),
        st.tuples(st.integers(0, n), nasty, st.integers(0, 20)).map(lambda t: _splice(valid, t[0], t[1].encode(), t[2])),
        st.binary(max_size=400),
        nasty.map(str.encode),
    )


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in flips:
        b[pos % len(b)] = val
    return bytes(b)


# ---------------------------------------------------------------------------------- 1. clusters
@cache
def _cluster_text() -> bytes:
    return (data_dir() / "clusters" / "prima-d1-d4.toml").read_bytes()


def _cluster_edits() -> st.SearchStrategy[dict[str, Any]]:
    """The built-in cluster with junk values put anywhere in it, re-serialised as TOML."""
    def edit(raw: dict[str, Any], path: list[int], value: Any) -> dict[str, Any]:
        out = copy.deepcopy(raw)
        node: Any = out
        for step in path:  # walk down by index into dict keys / list items while possible
            kids = list(node.items()) if isinstance(node, dict) else list(enumerate(node)) if isinstance(node, list) else []
            if not kids:
                break
            key, child = kids[step % len(kids)]
            if not isinstance(child, dict | list):
                node[key] = value
                return out
            node = child
        if isinstance(node, dict):
            node[f"k{len(path)}"] = value
        return out
    raw = tomllib.loads(_cluster_text().decode())
    return st.lists(st.tuples(st.lists(st.integers(0, 50), max_size=4), junk), min_size=1, max_size=3).map(
        lambda edits: _apply_all(raw, edits, edit))


def _apply_all(raw: dict[str, Any], edits: list[Any], edit: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    for path, value in edits:
        raw = edit(raw, path, value)
    return raw


def _tomlable(x: Any) -> Any:
    """x with what TOML cannot hold (None, integers beyond 64 bits) written as strings."""
    if isinstance(x, dict):
        return {str(k): _tomlable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_tomlable(v) for v in x]
    if x is None or (isinstance(x, int) and not -2**63 <= x < 2**63):
        return str(x)
    return x


def _toml_dump(raw: dict[str, Any]) -> bytes:
    return tomli_w.dumps(_tomlable(raw)).encode()


cluster_inputs = st.one_of(
    text_mutations(_cluster_text(), nasty_toml_value.map(lambda v: f"\nbandwidth_mbps = {v}\n")),
    _cluster_edits().map(lambda raw: ("dict", raw)),
    st.tuples(st.just("base"), st.sampled_from(["self", "cycle", "missing", "builtin", "junk"]), st.lists(junk, max_size=3)),
)


def run_cluster(inp: Any) -> None:
    d = _scratch("cluster")
    if isinstance(inp, bytes):
        load_cluster(_write(d / "c.toml", inp))
    elif inp[0] == "dict":
        load_cluster(_write(d / "c.toml", _toml_dump(inp[1])))
    else:  # derived clusters: `base` chains that loop, or point nowhere
        _, kind, use = inp
        a, b = d / "a.toml", d / "b.toml"
        base = {"self": "a.toml", "cycle": "b.toml", "missing": "nope.toml", "builtin": "prima-d1-d6",
                "junk": "../" * 40}[kind]
        _write(b, b'base = "a.toml"\n')
        raw: dict[str, Any] = {"base": base}
        if use:
            raw["use"] = use
        load_cluster(_write(a, _toml_dump(raw)))


# ---------------------------------------------------------------------------------- 1b. model files
@cache
def _catalogue_text() -> bytes:
    return (data_dir() / "models" / "catalogue.toml").read_bytes()


CATALOGUE_KEYS = ["family", "n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab", "rope_theta",
                  "rope_scaling", "norm_eps", "max_context", "tie_embeddings", "qkv_bias", "quant", "kv_dtype",
                  "buffer_bytes", "aliases", "hf_id"]
catalogue_inputs = st.one_of(
    text_mutations(_catalogue_text()[:3000], nasty_toml_value.map(lambda v: f"\nhidden = {v}\n")),
    st.dictionaries(st.sampled_from(CATALOGUE_KEYS), junk, max_size=6).map(lambda e: ("entry", e)),
)


def run_catalogue(inp: Any) -> None:
    p = _scratch("catalogue") / "catalogue.toml"
    if isinstance(inp, bytes):
        _write(p, inp)
    else:  # one entry of the tiny model with junk fields, next to a junk top-level value
        entry = {**_load_catalogue()["llama-tiny"], **inp[1]}
        _write(p, _toml_dump({"fuzz-model": entry}))
    catalogue(p)


@cache
def _hf_config_text() -> bytes:
    return json.dumps(load_model("llama-tiny").to_hf_config(), indent=1).encode()


hf_config_inputs = text_mutations(_hf_config_text(), nasty_json.map(lambda v: f"\"hidden_size\": {v},"))


def run_hf_config(inp: bytes) -> None:
    from_hf_config_file(_write(_scratch("hf") / "config.json", inp))


GGUF_KEYS = ["general.architecture", "llama.block_count", "llama.embedding_length", "llama.attention.head_count",
             "llama.attention.head_count_kv", "llama.feed_forward_length", "llama.vocab_size", "llama.context_length",
             "llama.rope.freq_base", "llama.attention.key_length", "llama.attention.layer_norm_rms_epsilon",
             "general.file_type", "tokenizer.ggml.tokens"]
gguf_value = st.one_of(st.integers(0, 2**32 - 1), st.integers(-2**31, -1), st.integers(2**32, 2**64 - 1),
                       st.floats(allow_nan=True, allow_infinity=True, width=32), st.text(max_size=8),
                       st.booleans(), st.lists(st.integers(0, 255), min_size=1, max_size=4),
                       st.lists(st.text(max_size=4), min_size=1, max_size=4))
gguf_meta_inputs = st.dictionaries(st.sampled_from(GGUF_KEYS), gguf_value, min_size=1, max_size=6)


def run_gguf_meta(meta: dict[str, Any]) -> None:
    """A GGUF file whose metadata values have the wrong type or an absurd value (written with gguf's
    own writer, so the file is well-formed); from_gguf must say which field is wrong."""
    p = _scratch("ggufmeta") / "m.gguf"
    spec = load_model("llama-tiny")
    base = {"general.architecture": "llama", "llama.block_count": spec.n_layers, "llama.embedding_length": spec.hidden,
            "llama.attention.head_count": spec.n_heads, "llama.feed_forward_length": spec.ffn,
            "llama.vocab_size": spec.vocab, "general.file_type": 0}
    w = gguf.GGUFWriter(str(p) + ".tmp", "llama")
    w.kv_data[0].clear()  # general.architecture comes from `base` or the fuzzed metadata
    for k, v in {**base, **meta}.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            (w.add_uint32 if 0 <= v < 2**32 else w.add_uint64 if v >= 0 else w.add_int32)(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_array(k, v)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(p) + ".tmp", p)
    from_gguf(p)


# ---------------------------------------------------------------------------------- 2. plans
@cache
def _plan_and_world() -> tuple[dict[str, Any], Any, Any]:
    model = load_model("llama-tiny")
    cluster = load_cluster("prima-d1-d4")
    devices = tuple(DevicePlan(n, w, 0) for n, w in (("D1", 2), ("D2", 1), ("D3", 0), ("D4", 0)))
    plan = Plan(system="prima", model=model.name, n_layers=model.n_layers, k=2, devices=devices,
                quant=model.quant, options={"S": 2})
    return plan.to_json(), model, cluster


PLAN_KEYS = ["system", "model", "quant", "n_layers", "k", "devices", "schedule", "weights", "prefetch", "n_ctx",
             "options", "predicted_tpot_ms", "notes", "plan"]
DEVICE_KEYS = ["name", "layers", "gpu_layers"]
plan_inputs = st.one_of(
    st.tuples(st.sampled_from(PLAN_KEYS), junk).map(lambda kv: ("top", kv)),
    st.tuples(st.integers(0, 3), st.sampled_from(DEVICE_KEYS), junk).map(lambda e: ("device", e)),
    st.tuples(st.sampled_from(["n_layers", "k", "n_ctx"]), st.sampled_from([10**6, 10**12, 2**63, -5, 0])).map(
        lambda kv: ("top", kv)),
    st.tuples(st.sampled_from(["schedule", "weights"]), st.sampled_from(["ring", "tp", "rpp", "offload", "batch",
                                                                         "mmap", "pinned", "x"])).map(lambda kv: ("top", kv)),
    st.tuples(st.just("options"), st.fixed_dictionaries({"S": junk})).map(lambda kv: ("rpp", kv)),
    junk.map(lambda j: ("whole", j)),
    st.binary(max_size=300),
    nasty_json.map(str.encode),
)


def run_plan(inp: Any) -> None:
    base, model, cluster = _plan_and_world()
    if isinstance(inp, bytes):
        plan = Plan.from_json(_write(_scratch("plan") / "plan.json", inp))
    else:
        kind, edit = inp
        obj: Any = copy.deepcopy(base)
        if kind == "top":
            obj[edit[0]] = edit[1]
        elif kind == "rpp":
            obj["schedule"], obj["options"] = "rpp", edit[1]
        elif kind == "device":
            obj["devices"][edit[0]][edit[1]] = edit[2]
        else:
            obj = edit
        plan = Plan.from_json(obj)
    # an accepted plan must survive what the CLI does next with it
    plan.to_json()
    plan.describe()
    violations(plan, model, cluster)


# ---------------------------------------------------------------------------------- 3. checkpoints
@cache
def _tiny_spec() -> Any:
    """A 2-block Llama (hidden 32) with a 260-token vocabulary: small files, and still a GGUF
    tokenizer (string and int arrays in the metadata) whose lengths can be fuzzed."""
    return dataclasses.replace(load_model("llama-tiny"), name="fuzz", n_layers=2, hidden=32, n_heads=4,
                               n_kv_heads=2, head_dim=8, ffn=64, vocab=260)


@cache
def _valid_safetensors() -> tuple[bytes, bytes]:
    d = write_random_checkpoint(_tiny_spec(), _WORK / "valid-st", seed=1)
    return (d / "config.json").read_bytes(), (d / "model.safetensors").read_bytes()


@cache
def _valid_gguf() -> bytes:
    return write_random_checkpoint(_tiny_spec().with_quant("q8_0"), _WORK / "valid.gguf", fmt="gguf", seed=1).read_bytes()


def _st_header(data: bytes) -> dict[str, Any]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n])


def _st_rebuild(data: bytes, header: dict[str, Any]) -> bytes:
    """The file with a new header (length field fixed, data unchanged after it)."""
    n = int.from_bytes(data[:8], "little")
    blob = json.dumps(header, separators=(",", ":"), allow_nan=True).encode()
    return len(blob).to_bytes(8, "little") + blob + data[8 + n:]


def _st_edit(data: bytes, which: int, key: str, value: Any) -> bytes:
    h = _st_header(data)
    names = [k for k in h if k != "__metadata__"]
    name = names[which % len(names)]
    if key == "rename":
        h[str(value)] = h.pop(name)
    else:
        h[name][key] = value
    return _st_rebuild(data, h)


absurd_int = st.sampled_from([-1, 0, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**18, 10**40])
st_header_value = st.one_of(
    st.lists(st.one_of(st.integers(0, 64), absurd_int), max_size=5),  # shape / data_offsets
    st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F64", "Q8_0", ""]),  # dtype
    junk,
)
safetensors_inputs = st.one_of(
    st.integers(0, 2**20).map(lambda k: ("truncate", k)),
    st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255)), min_size=1, max_size=8).map(lambda f: ("flip", f)),
    st.one_of(st.integers(0, 2**64 - 1), absurd_int.filter(lambda v: 0 <= v < 2**64)).map(lambda n: ("length", n)),
    st.tuples(st.integers(0, 100), st.sampled_from(["dtype", "shape", "data_offsets", "rename"]), st_header_value).map(
        lambda e: ("entry", e)),
    st.tuples(st.sampled_from(["num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads",
                               "intermediate_size", "head_dim", "torch_dtype"]),
              st.one_of(absurd_int, junk)).map(lambda e: ("config", e)),
    st.binary(max_size=300).map(lambda b: ("bytes", b)),
)


def run_safetensors(inp: tuple[str, Any]) -> None:
    cfg, data = _valid_safetensors()
    kind, arg = inp
    if kind == "truncate":
        data = data[:arg % (len(data) + 1)]
    elif kind == "flip":  # positions mostly in the header (the first page), some in the data
        data = _flip(data, [(p if p < 4096 else 4096 + p * 29, v) for p, v in arg])
    elif kind == "length":
        data = arg.to_bytes(8, "little") + data[8:]
    elif kind == "entry":
        data = _st_edit(data, *arg)
    elif kind == "config":
        cfg = json.dumps({**json.loads(cfg), arg[0]: arg[1]}, allow_nan=True).encode()
    else:
        data = arg
    d = _scratch("st")
    _write(d / "config.json", cfg)
    _write(d / "model.safetensors", data)
    _use(open_checkpoint(d))


def _use(ckpt: Any) -> None:
    """What an accepted checkpoint goes on to do: every tensor as f32 (bounded by the file size)."""
    size = sum(f.stat().st_size for f in ckpt.files)
    for name in ckpt.names():
        x = ckpt.tensor(name)
        assert x.nbytes <= 8 * size + 4096  # dequantised Q8_0 is ~4x its bytes
    ckpt.fingerprint()


def _gguf_fields(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, size, what) of every count, length, type and offset field of a valid GGUF header."""
    out: list[tuple[int, int, str]] = [(8, 8, "tensor_count"), (16, 8, "kv_count")]
    u32 = lambda o: struct.unpack_from("<I", data, o)[0]  # noqa: E731
    u64 = lambda o: struct.unpack_from("<Q", data, o)[0]  # noqa: E731
    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    off = 24

    def string(o: int, what: str) -> int:
        out.append((o, 8, what + " length"))
        return o + 8 + u64(o)

    def value(o: int, t: int, what: str) -> int:
        if t in scalar:
            return o + scalar[t]
        if t == 8:
            return string(o, what)
        it, n = u32(o), u64(o + 4)
        out.extend([(o, 4, what + " element type"), (o + 4, 8, what + " array length")])
        o += 12
        for i in range(n):
            o = value(o, it, what) if i < 3 else value(o, it, "-")  # record the first few elements only
        return o

    for i in range(u64(16)):
        off = string(off, f"key {i}")
        out.append((off, 4, f"kv {i} type"))
        off = value(off + 4, u32(off), f"kv {i}")
    for i in range(u64(8)):
        off = string(off, f"tensor {i} name")
        nd = u32(off)
        out.append((off, 4, f"tensor {i} n_dims"))
        out.extend((off + 4 + 8 * j, 8, f"tensor {i} dim") for j in range(nd))
        off += 4 + 8 * nd
        out.extend([(off, 4, f"tensor {i} type"), (off + 4, 8, f"tensor {i} offset")])
        off += 12
    return [f for f in out if not f[2].startswith("-")]


@cache
def _gguf_field_list() -> list[tuple[int, int, str]]:
    return _gguf_fields(_valid_gguf())


field_value = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 8, 9, 13, 255, 2**16, 2**31, 2**32 - 1, 2**32, 2**62,
                                         2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
gguf_inputs = st.one_of(
    st.integers(0, 2**20).map(lambda k: ("truncate", k)),
    st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=8).map(lambda f: ("flip", f)),
    st.tuples(st.integers(0, 10**6), field_value).map(lambda e: ("field", e)),
    st.lists(st.tuples(st.integers(0, 10**6), field_value), min_size=2, max_size=4).map(lambda e: ("fields", e)),
    st.binary(max_size=300).map(lambda b: ("bytes", b)),
    st.binary(max_size=300).map(lambda b: ("bytes", b"GGUF\x03\x00\x00\x00" + b)),
)


def _set_field(data: bytes, which: int, value: int) -> bytes:
    off, size, _ = _gguf_field_list()[which % len(_gguf_field_list())]
    return data[:off] + (value % 2 ** (8 * size)).to_bytes(size, "little") + data[off + size:]


def _mutated_gguf(inp: tuple[str, Any]) -> bytes:
    data = _valid_gguf()
    kind, arg = inp
    if kind == "truncate":
        data = data[:arg % (len(data) + 1)]
    elif kind == "flip":  # the header is ~7 KB of the 44: flips land mostly there
        data = _flip(data, arg)
    elif kind == "field":
        data = _set_field(data, *arg)
    elif kind == "fields":
        for e in arg:
            data = _set_field(data, *e)
    else:
        data = arg
    return data


def run_gguf(inp: tuple[str, Any]) -> None:
    _use(open_checkpoint(_write(_scratch("gguf") / "m.gguf", _mutated_gguf(inp))))


def run_tokenizer(inp: tuple[str, Any]) -> None:
    """The GGUF's vocabulary (token, type and merge arrays, special ids) with the same mutations."""
    tok = load_tokenizer(_write(_scratch("tok") / "m.gguf", _mutated_gguf(inp)))
    if tok is not None:  # an accepted vocabulary must encode, decode and stream
        ids = tok.encode("Hello wörld 日本 <s> 12345\n")
        s = tok.stream()
        assert "".join(s.push(i) for i in ids) + s.flush() == tok.decode(ids, at_start=False)


# ---------------------------------------------------------------------------------- 4. wire
HEADER_FIELDS = ["magic", "version", "type", "dtype", "seq", "pos", "step", "lap", "segment", "ndim", "flags",
                 "d0", "d1", "d2", "d3", "plen", "pcrc", "hcrc"]
FIELD_BITS = dict(zip(HEADER_FIELDS, [0, 16, 8, 8, 32, 32, 32, 16, 16, 8, 8, 32, 32, 32, 32, 64, 32, 32]))


def _reheader(frames: list[bytes], changes: dict[str, int]) -> list[bytes]:
    vals = list(HEADER.unpack(frames[0]))
    for k, v in changes.items():
        vals[HEADER_FIELDS.index(k)] = v % 2 ** FIELD_BITS[k]
    h = HEADER.pack(*vals)
    return [h[:56] + struct.pack("<I", zlib.crc32(h[:56])), *frames[1:]]


def _valid_frames(kind: str) -> list[bytes]:
    if kind == "json":
        f = wire.encode(MsgType.SETUP, obj={"plan": {"k": 1}, "role": "head"})
    elif kind == "none":
        f = wire.encode(MsgType.PING)
    else:
        f = wire.encode(MsgType.ACT, array=np.arange(24, dtype="<f4").reshape(2, 3, 4), seq=3, lap=1)
    return [bytes(x) for x in f]


wire_field = st.sampled_from(HEADER_FIELDS[1:-1])
wire_inputs = st.one_of(
    st.lists(st.binary(max_size=80), max_size=4).map(lambda fr: ("raw", fr)),
    st.tuples(st.sampled_from(["act", "json", "none"]),
              st.dictionaries(wire_field, st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 5, 255, 2**63])),
                              min_size=1, max_size=4)).map(lambda e: ("fields", e)),
    st.tuples(st.sampled_from(["act", "json", "none"]), st.integers(-1000, 1000)).map(lambda e: ("cut", e)),
    st.tuples(st.sampled_from(["act", "json"]), st.integers(0, 3), st.binary(max_size=8)).map(lambda e: ("frames", e)),
    st.tuples(st.sampled_from(["act", "json", "none"]), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                                                 min_size=1, max_size=4)).map(lambda e: ("flip", e)),
    st.one_of(st.binary(max_size=200), nasty_json.map(str.encode), junk.map(lambda j: json.dumps(j).encode())).map(
        lambda p: ("json", p)),
)

WIRE_SLACK = 64 * 1024  # bytes of bookkeeping decode may allocate whatever it is given
JSON_FACTOR = 100  # Python objects of a parsed JSON payload per payload byte, at most (dicts are ~64 B per "{}")


def run_wire(inp: tuple[str, Any]) -> None:
    kind, arg = inp
    if kind == "raw":
        frames = arg
    elif kind == "fields":
        frames = _reheader(_valid_frames(arg[0]), arg[1])
    elif kind == "cut":  # truncate or extend the payload without telling the header
        f = _valid_frames(arg[0])
        frames = [f[0], f[1][:arg[1]] if arg[1] < 0 else f[1] + b"\0" * arg[1]]
    elif kind == "frames":  # wrong frame counts: drop frames or add extra ones
        f = _valid_frames(arg[0])
        frames = (f + [arg[2]] * arg[1])[:max(arg[1], 1) if arg[1] < 2 else None]
    elif kind == "flip":
        f = _valid_frames(arg[0])
        both = _flip(f[0] + f[1], arg[1])
        frames = [both[:HEADER_SIZE], both[HEADER_SIZE:]]
    else:  # a JSON payload with a valid header: length, CRC and shape fixed
        f = _valid_frames("json")
        frames = _reheader([f[0], arg], {"plen": len(arg), "pcrc": zlib.crc32(arg), "d0": len(arg)})
    received = sum(len(x) for x in frames)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        msg = wire.decode(frames, peer="fuzz peer")
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()
    payload = len(frames[1]) if len(frames) == 2 else 0
    bound = WIRE_SLACK + HEADER_SIZE + (JSON_FACTOR * payload if msg.obj else payload)
    assert peak <= bound, f"decode allocated {peak} bytes for {received} received"
    if msg.array is not None:
        assert msg.array.nbytes == msg.nbytes <= received  # a view of the payload, never larger


# ---------------------------------------------------------------------------------- the targets
TARGETS: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], None]]] = {
    "cluster_toml": (cluster_inputs, run_cluster),
    "model_catalogue_toml": (catalogue_inputs, run_catalogue),
    "hf_config_json": (hf_config_inputs, run_hf_config),
    "gguf_metadata": (gguf_meta_inputs, run_gguf_meta),
    "plan_json": (plan_inputs, run_plan),
    "safetensors": (safetensors_inputs, run_safetensors),
    "gguf": (gguf_inputs, run_gguf),
    "gguf_tokenizer": (gguf_inputs, run_tokenizer),
    "wire": (wire_inputs, run_wire),
}


def outcome(target: str, inp: Any) -> str:
    """'accepted', the error class name, or 'crash: <class>' (anything but a clear PrimasimError)."""
    try:
        TARGETS[target][1](inp)
    except PrimasimError as exc:
        try:
            check_error(exc)
        except AssertionError:
            return f"crash: unclear {type(exc).__name__}"
        return type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - classifying is the point
        return f"crash: {type(exc).__name__}"
    return "accepted"


# ---------------------------------------------------------------------------------- tests
EXAMPLES = {"cluster_toml": 250, "model_catalogue_toml": 200, "hf_config_json": 200, "gguf_metadata": 150,
            "plan_json": 300, "safetensors": 250, "gguf": 250, "gguf_tokenizer": 200, "wire": 300}


@pytest.mark.parametrize("target", list(TARGETS))
def test_parser_gives_a_clear_error_or_accepts(target: str) -> None:
    strategy, run = TARGETS[target]

    @settings(max_examples=EXAMPLES[target], deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(strategy)
    def fuzz(inp: Any) -> None:
        try:
            run(inp)
        except PrimasimError as exc:
            check_error(exc)

    fuzz()


# Inputs fuzzing found (each crashed or hung before the fix), kept as plain regressions.
def _key_field(name: str) -> tuple[int, int]:
    """(index in `_gguf_field_list` of the metadata entry `name`'s type field, offset of its key's length)."""
    data, fields = _valid_gguf(), _gguf_field_list()
    for off, _, what in fields:
        n = struct.unpack_from("<Q", data, off)[0] if what.startswith("key ") and what.endswith(" length") else -1
        if data[off + 8:off + 8 + n] == name.encode():
            i = what.split()[1]
            return next(j for j, f in enumerate(fields) if f[2] == f"kv {i} type"), off
    raise AssertionError(f"{name} is not in the test file")


def test_tokenizer_error_shows_a_corrupted_value_briefly() -> None:
    """tokenizer.ggml.add_bos_token's type corrupted to string made its value 9 KB of the header; the
    message quoted all of it (and an over-long metadata key likewise). Located by name, not offset:
    the writer's layout changes."""
    t, _ = _key_field("tokenizer.ggml.add_bos_token")
    assert outcome("gguf_tokenizer", ("field", (t, 8))) == "CheckpointError"
    _, key = _key_field("tokenizer.ggml.model")
    assert outcome("gguf_tokenizer", ("flip", [(key + 1, 6)])) == "CheckpointError"  # length + 1536


def test_tokenizer_string_array_cut_inside_a_length_is_refused() -> None:
    """The file ends inside a string's 8-byte length, in the middle of the token list."""
    t, _ = _key_field("tokenizer.ggml.tokens")
    i = _gguf_field_list()[t][2].split()[1]
    third = [off for off, _, what in _gguf_field_list() if what == f"kv {i} length"][2]
    assert outcome("gguf_tokenizer", ("truncate", third + 3)) == "CheckpointError"


def test_gguf_array_length_past_the_end_is_refused_not_looped() -> None:
    """A metadata array of 2**63 u8s: gguf.GGUFReader read empty views past the end for ever."""
    f = next(f for f in _gguf_field_list() if f[2].endswith("array length"))
    data = _set_field(_valid_gguf(), _gguf_field_list().index(f), 2**63)
    with pytest.raises(PrimasimError, match="elements"):
        open_checkpoint(_write(_scratch("gguf") / "m.gguf", data))


@pytest.mark.parametrize("key, value", [("num_hidden_layers", 10**9), ("hidden_size", "1" * 5000)])
def test_huge_or_overlong_config_values(key: str, value: Any) -> None:
    """10**9 blocks built a name map of 10**9 entries (a hang); a 5000-digit number was a ValueError."""
    cfg, data = _valid_safetensors()
    d = _scratch("st")
    text = json.dumps({**json.loads(cfg), key: 0}).replace(f'"{key}": 0', f'"{key}": {value}')
    _write(d / "config.json", text.encode())
    _write(d / "model.safetensors", data)
    with pytest.raises(PrimasimError) as ei:
        open_checkpoint(d)
    check_error(ei.value)


def test_safetensors_float_offsets_and_block_index_beyond_the_config() -> None:
    cfg, data = _valid_safetensors()
    d = _scratch("st")
    _write(d / "config.json", cfg)
    for bad in (_st_edit(data, 0, "data_offsets", [0.5, 4.5]), _st_edit(data, 0, "rename", "model.layers.99999999999.mlp.up_proj.weight"),
                _st_edit(data, 0, "dtype", ["F32"]), _st_edit(data, 0, "shape", [float("inf")])):
        _write(d / "model.safetensors", bad)
        with pytest.raises(PrimasimError) as ei:
            open_checkpoint(d)
        check_error(ei.value)


@pytest.mark.parametrize("text", ["[" * 5000, "1" * 5000])
def test_json_nesting_and_long_numbers(text: str) -> None:
    for run in (run_plan, run_hf_config):
        with pytest.raises(PrimasimError):
            run(text.encode())
    with pytest.raises(PrimasimError, match="JSON"):
        run_wire(("json", text.encode()))


def test_cluster_base_cycle_and_deep_toml() -> None:
    for inp in (("base", "self", []), ("base", "cycle", [])):
        with pytest.raises(PrimasimError, match="loop"):
            run_cluster(inp)
    with pytest.raises(PrimasimError):
        run_cluster(b"name = " + b"[" * 3000)


def test_targets_accept_their_valid_inputs() -> None:
    """The seeds the mutations start from parse: the fuzzing reaches past the first check."""
    cfg, data = _valid_safetensors()
    assert math.prod(_st_header(data)["model.embed_tokens.weight"]["shape"]) == 260 * 32
    assert outcome("safetensors", ("bytes", data)) == "accepted"
    assert outcome("safetensors", ("truncate", len(data))) == "accepted"
    assert outcome("gguf", ("truncate", len(_valid_gguf()))) == "accepted"
    assert outcome("wire", ("fields", ("act", {"seq": 9}))) == "accepted"
    assert outcome("plan_json", ("top", ("notes", ["ok"]))) == "accepted"
    assert outcome("cluster_toml", _cluster_text()) == "accepted"
    assert outcome("hf_config_json", _hf_config_text()) == "accepted"
    assert outcome("model_catalogue_toml", ("entry", {})) == "accepted"
    assert len(_gguf_field_list()) > 40 and any("array length" in f[2] for f in _gguf_field_list())
