"""Checkpoints: open Hugging Face safetensors and GGUF files file-backed, write random ones.

Weights stay in the page cache: the model computes straight from each file's read-only memory map
(runtime/kernels: the whole file is one zero-copy uint8 jax.Array, tensors are byte offsets and
types into it), whatever the tensor type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K,
Q6_K) or alignment, as llama.cpp does. Only 1-D tensors (norms, biases) that are not f32 at a
64-byte-aligned offset are copied, a few KB per layer, and `Checkpoint.notes` says so.
`Checkpoint.tensor` reads any tensor as f32 (a view or a dequantised copy) for tests and tools.

Names are GGUF's (`blk.{i}.attn_q.weight`, ...) whatever the format; shapes are PyTorch's (out, in).
One difference is kept, not hidden: llama.cpp's converter permutes the rows of `attn_q`/`attn_k` of
Llama models for its interleaved RoPE; `Checkpoint.qk_interleaved` says so and the model undoes the
permutation on the activations (cheap) instead of copying the weights.

Longer than ~600 lines: safetensors and GGUF readers and writers behind one Checkpoint; issue 14
(quantised kernels, tokenizer) is reworking it, and splits it by format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import mmap
import os
import weakref
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from primasim.core.errors import CheckpointError, SpecError
from primasim.core.model import ModelSpec, Tensor
from primasim.core.model_sources import from_gguf, from_hf_config, read_gguf_header

from .rope import rope_inv_freq

if TYPE_CHECKING:
    from tokenizers import Tokenizer

Format = Literal["safetensors", "gguf"]
ALIGN = 64  # bytes: what jax.device_put needs to alias a host buffer (measured: 32 copies, 64 aliases)
# GGUF tensor alignment: llama.cpp's default, which our files use too (no general.alignment key:
# llama-cpp-python 0.3.36's quantiser writes a corrupt file from a source that sets it to 64)
GGUF_ALIGN = 32
_SAMPLE = 4096  # bytes per sampled block in fingerprint()
# GGUF tensor types the kernels compute (runtime/kernels: TYPE_IDS); anything else fails at open
_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}  # BF16 has no numpy dtype


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, stored bytes, shape (out, in), type."""

    name: str
    file: Path
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str  # F32, F16, BF16, Q8_0, Q4_K, ... (ggml / safetensors spelling)


@dataclass
class Checkpoint:
    """Opened weights, file-backed. Get one from `open_checkpoint`; everything is validated there."""

    spec: ModelSpec
    path: Path
    format: Format
    files: list[Path]
    infos: dict[str, TensorInfo]
    qk_interleaved: bool = False  # GGUF Llama: attn_q/attn_k rows in llama.cpp's RoPE order
    notes: list[str] = field(default_factory=list)
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, repr=False)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self) -> list[str]:
        return list(self.infos)

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors as stored."""
        return sum(t.nbytes for t in self.infos.values())

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor as a read-only uint8 view of the mapping (never a copy)."""
        t = self._info(name)
        return np.frombuffer(self._map(t.file), dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def aliases(self, name: str) -> bool:
        """True when `tensor(name)` is a view of the mapped file (f32 and 64-byte aligned)."""
        t = self._info(name)
        return t.dtype == "F32" and t.offset % ALIGN == 0

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as f32 (out, in): a view of the mapped file when `aliases(name)`, else a copy.

        Copies (unaligned F32, F16/BF16, quantised GGUF types) are fresh, 64-byte-aligned arrays in
        anonymous memory, made on every call. The model reads weight matrices through the kernels
        instead (no copy); it calls this for 1-D tensors only (norms, biases, rope_freqs).
        """
        t = self._info(name)
        if self.aliases(name):
            return self.raw(name).view(np.float32).reshape(t.shape)
        # copied: read with pread (no readahead) rather than through the mapping, whose fault
        # readahead would bring up to 128 KiB of neighbouring weights into the page cache per tensor
        raw = np.frombuffer(_pread_exact(t.file, [(t.offset, t.nbytes)])[0], np.uint8)
        out = _aligned_empty(t.shape)
        if t.dtype == "F32":
            out[...] = raw.view(np.float32).reshape(t.shape)
        elif t.dtype == "F16":
            out[...] = raw.view(np.float16).reshape(t.shape)
        elif t.dtype == "BF16":  # the top half of an f32
            out.reshape(-1).view(np.uint32)[:] = raw.view(np.uint16).astype(np.uint32) << 16
        else:
            import gguf

            qtype = gguf.GGMLQuantizationType[t.dtype]
            with np.errstate(invalid="ignore", over="ignore"):  # junk scales give NaN, not a warning per tensor
                out[...] = gguf.quants.dequantize(raw.reshape(*t.shape[:-1], -1), qtype).reshape(t.shape)
        return out

    def mapped(self, f: Path) -> np.ndarray:
        """The whole file `f` as a read-only uint8 view of its (shared, page-aligned) mapping."""
        return np.frombuffer(self._map(f), dtype=np.uint8)

    def tensor_ranges(self, names: Iterable[str]) -> list[tuple[str, int, int]]:
        """(file, offset, length) covering the given tensors, adjacent ones merged, in file order."""
        spans = sorted((str(self.infos[n].file), self.infos[n].offset, self.infos[n].nbytes)
                       for n in names if n in self.infos)
        out: list[tuple[str, int, int]] = []
        for f, off, n in spans:
            if out and out[-1][0] == f and off - (out[-1][1] + out[-1][2]) <= GGUF_ALIGN:
                out[-1] = (f, out[-1][1], off + n - out[-1][1])
            else:
                out.append((f, off, n))
        return out

    def layer_names(self, layer: int) -> list[str]:
        prefix = f"blk.{layer}."
        return [n for n in self.infos if n.startswith(prefix)]

    def layer_ranges(self, layers: Iterable[int]) -> list[tuple[str, int, int]]:
        """File byte ranges of the blocks' weights: what `prefetch` reads and disk reads attribute to."""
        return self.tensor_ranges(n for i in layers for n in self.layer_names(i))

    def input_ranges(self) -> list[tuple[str, int, int]]:
        return self.tensor_ranges(["token_embd.weight"])

    def output_ranges(self) -> list[tuple[str, int, int]]:
        names = ["output_norm.weight", "output.weight"]
        return self.tensor_ranges(names + (["token_embd.weight"] if self.spec.tie_embeddings else []))

    def io_ranges(self) -> list[tuple[str, int, int]]:
        """Embedding and output tensors together (the head device's extra weights)."""
        return self.tensor_ranges(["token_embd.weight", "output_norm.weight", "output.weight"])

    def fingerprint(self) -> str:
        """A stable hash of the model files for the head's version check, cheap to compute.

        sha256 over the format and, per file (in order): its name, size, its header (safetensors:
        the 8-byte length and JSON; GGUF: everything before the first tensor) and 16 blocks of 4 KiB
        spread evenly over the file, the last one ending at the end. It reads ~64 KiB plus headers
        per file, so equal fingerprints mean same layout, metadata and (almost surely) same weights;
        it misses edits confined to unsampled bytes.
        """
        h = hashlib.sha256(self.format.encode())
        for f in self.files:
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            first = min((t.offset for t in self.infos.values() if t.file == f), default=size)
            spans = [(0, first)] + [(max(0, (size - _SAMPLE) * i // 15), _SAMPLE) for i in range(16)]
            for b in _pread_exact(f, spans):
                h.update(b)
        return h.hexdigest()

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise CheckpointError(f"no tensor {name!r}", where=str(self.path),
                                  fix="use GGUF tensor names (blk.{i}.attn_q.weight, token_embd.weight, ...)") from None

    def _map(self, f: Path) -> mmap.mmap:
        if f not in self._maps:
            self._maps[f] = _open_map(f)
        return self._maps[f]


def _aligned_empty(shape: Sequence[int]) -> np.ndarray:
    """An uninitialised f32 array whose data starts on a 64-byte boundary (so jax can alias it)."""
    n = math.prod(shape)
    buf = np.empty(n * 4 + ALIGN, dtype=np.uint8)
    start = -buf.ctypes.data % ALIGN
    return buf[start:start + n * 4].view(np.float32).reshape(shape)


# ---------------------------------------------------------------------------- prefetch
# One read-only mapping per file version, alive while a Checkpoint or an array uses it.
_MAPS: weakref.WeakValueDictionary[tuple[str, int, int, int], mmap.mmap] = weakref.WeakValueDictionary()


def _open_map(f: Path | str) -> mmap.mmap:
    """The shared read-only mapping of f (Checkpoint, prefetch and residency use the same one).
    Keyed by inode, size and mtime: a file replaced on disk gets a new mapping, while arrays made
    from the old one keep the old file alive."""
    path = str(Path(f).resolve())
    st = os.stat(path)
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    m = _MAPS.get(key)
    if m is None or m.closed:
        with open(path, "rb") as fh:
            m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        _MAPS[key] = m
    return m


def _readahead_bytes(f: str) -> int:
    """The most one madvise(WILLNEED) reads on f's disk: the kernel caps each call at
    max(read_ahead_kb, max_sectors_kb) of the device (force_page_cache_ra), so longer ranges are
    cut into pieces of this size (measured: one 30 MB call read 8 MB here)."""
    st = os.stat(f)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    best = 0
    for q in (dev / "queue", dev / ".." / "queue", dev / "bdi"):
        for key in ("read_ahead_kb", "max_sectors_kb"):
            try:
                best = max(best, int((q / key).read_text()) * 1024)
            except (OSError, ValueError):
                pass
    return max(best, 128 * 1024)


_RA: dict[str, int] = {}


def _libc() -> Any:
    import ctypes

    lib = ctypes.CDLL(None, use_errno=True)
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return lib


_LIBC: Any = None


def prefetch(ranges: Iterable[tuple[str, int, int]]) -> None:
    """madvise(MADV_WILLNEED) over file byte ranges: the kernel starts reading them into the page cache.

    Returns once the reads are queued (readahead), not when they finish, and releases the GIL
    while in the kernel (ctypes; Python's mmap.madvise holds it), so a background thread overlaps
    it with compute. Ranges come from `Checkpoint.layer_ranges`.
    """
    import ctypes

    global _LIBC
    _LIBC = _LIBC or _libc()
    for f, off, n in ranges:
        m = _open_map(f)
        base = np.frombuffer(m, dtype=np.uint8).ctypes.data
        chunk = _RA.setdefault(f, _readahead_bytes(f))
        start = off - off % mmap.PAGESIZE  # madvise wants a page-aligned start
        end = min(off + n, len(m))
        for s in range(start, end, chunk):
            if _LIBC.madvise(base + s, min(chunk, end - s), mmap.MADV_WILLNEED):
                raise OSError(ctypes.get_errno(), f"madvise(WILLNEED) failed on {f}")


def evict(ranges: Iterable[tuple[str, int, int]]) -> None:
    """posix_fadvise(DONTNEED): drop the ranges' clean pages from the page cache where no process
    has them mapped in (tests and benchmarks use it to start cold without root's drop_caches)."""
    for f, off, n in ranges:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(ranges: Iterable[tuple[str, int, int]]) -> float:
    """Fraction of the ranges' pages that are in the page cache now (mincore(2) over our mapping)."""
    global _LIBC
    _LIBC = _LIBC or _libc()
    total = resident = 0
    for f, off, n in ranges:
        m = _open_map(f)
        start = off - off % mmap.PAGESIZE
        length = min(n + off - start, len(m) - start)
        if length <= 0:
            continue
        vec = np.zeros((length + mmap.PAGESIZE - 1) // mmap.PAGESIZE, dtype=np.uint8)
        if _LIBC.mincore(np.frombuffer(m, dtype=np.uint8).ctypes.data + start, length, vec.ctypes.data):
            raise OSError("mincore failed")
        total += vec.size
        resident += int(np.count_nonzero(vec & 1))
    return resident / total if total else 1.0


# ---------------------------------------------------------------------------- opening
def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint: a directory with config.json + safetensors (single or sharded with
    model.safetensors.index.json), or a .gguf file (a directory holding exactly one also works).

    Everything is checked here, before any work: files present and complete, headers parse,
    offsets inside the files, every tensor the config implies present with the right shape and no
    unexpected ones, sampled values finite. Any failure is a CheckpointError naming the file.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError("not found", where=str(p),
                              fix="give a directory with config.json + *.safetensors, or a .gguf file")
    if p.is_file() and p.name == "config.json" or p.suffix == ".safetensors":
        p = p.parent
    if p.is_dir():
        if (p / "config.json").exists():
            ckpt = _open_safetensors(p)
        else:
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) != 1:
                raise CheckpointError("no config.json and not exactly one .gguf file in the directory",
                                      where=str(p), fix="point at the .gguf file or add config.json")
            ckpt = _open_gguf(ggufs[0])
    elif p.suffix == ".gguf" or _is_gguf(p):
        ckpt = _open_gguf(p)
    else:
        raise CheckpointError("not a checkpoint (expected a directory with config.json, or a .gguf file)",
                              where=str(p), fix="give the model directory or the .gguf file")
    _check_tensors(ckpt)
    return ckpt


def _is_gguf(p: Path) -> bool:
    with open(p, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _hf_to_gguf_names(family: str, n_layers: int) -> Any:
    import gguf

    arch = gguf.MODEL_ARCH.LLAMA if family == "llama" else gguf.MODEL_ARCH.QWEN2
    return gguf.TensorNameMap(arch, n_layers)


def _open_safetensors(d: Path) -> Checkpoint:
    cfg_path = d / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("expected a JSON object")
        spec = from_hf_config(cfg, name=d.name, where=str(cfg_path))
    except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError, > 4300-digit numbers, deep nesting
        raise CheckpointError(f"config.json is not valid JSON ({exc})", where=str(cfg_path),
                              fix="repair or re-create config.json") from None
    except SpecError as exc:
        raise CheckpointError(exc.what, where=exc.where, fix=exc.fix) from None
    spec = _with_file_dtype(spec, cfg)
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
            files = [d / f for f in dict.fromkeys(wmap.values())]
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise CheckpointError(f"unreadable shard index ({type(exc).__name__}: {exc})", where=str(index),
                                  fix="re-create model.safetensors.index.json") from None
    elif (d / "model.safetensors").exists():
        wmap, files = None, [d / "model.safetensors"]
    else:
        raise CheckpointError("no model.safetensors or model.safetensors.index.json", where=str(d),
                              fix="put the weights next to config.json")
    headers = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError("shard listed in the index is missing", where=str(f), fix="copy all shards")
        headers[f] = _read_safetensors_header(f)
    blocks = {int(n.split(".")[2]) for h in headers.values() for n in h if n.startswith("model.layers.")
              and n.split(".")[2].isascii() and n.split(".")[2].isdigit()}
    _check_block_count(spec, blocks, [n for h in headers.values() for n in h], str(d))
    # Name map over every block present (extra blocks are then reported as a layer-count mismatch)
    names = _hf_to_gguf_names(spec.family, max([spec.n_layers - 1, *blocks]) + 1)
    infos: dict[str, TensorInfo] = {}
    for f, header in headers.items():
        for hf_name, (dtype, shape, begin, end) in header.items():
            if wmap is not None and wmap.get(hf_name) != f.name:
                raise CheckpointError(f"tensor {hf_name} is in {f.name} but the index says {wmap.get(hf_name)}",
                                      where=str(index), fix="re-create the index")
            if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
                raise CheckpointError(f"tensor {hf_name} has unsupported dtype {dtype}", where=str(f),
                                      fix="store weights as F32, F16 or BF16")
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue  # old checkpoints store RoPE's buffer; it is recomputed from the config
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise CheckpointError(f"unexpected tensor {hf_name} for a {spec.family} model", where=str(f),
                                      fix="the checkpoint's architecture does not match config.json")
            infos[name] = TensorInfo(name, f, begin, end - begin, shape, dtype)
    if spec.tie_embeddings:
        infos.pop("output.weight", None)  # some tied checkpoints store lm_head anyway; it is the embedding
    return Checkpoint(spec=spec, path=d, format="safetensors", files=files, infos=infos)


def _with_file_dtype(spec: ModelSpec, cfg: dict[str, Any]) -> ModelSpec:
    dt = str(cfg.get("torch_dtype") or cfg.get("dtype") or "")
    return dataclasses.replace(spec, quant={"float32": "f32", "float16": "f16", "bfloat16": "f16"}.get(dt, spec.quant))


def _read_safetensors_header(f: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Parse and check a safetensors header: {name: (dtype, shape, abs begin, abs end)}."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size or n > 100_000_000:  # checked before reading: the field may say 2**63
            raise CheckpointError(f"not a safetensors file or truncated header ({size} bytes)", where=str(f),
                                  fix="the file is incomplete or corrupted: re-copy or re-create it")
        try:
            header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
        except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError, > 4300-digit numbers
            raise CheckpointError(f"corrupted safetensors header ({exc})", where=str(f),
                                  fix="the file is corrupted: re-copy or re-create it") from None
    header.pop("__metadata__", None)
    base = 8 + n
    out: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    try:
        for name, e in header.items():
            dtype, shape, (b, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            if len(shape) > 4:  # (and math.prod over a million huge dims would take minutes)
                raise ValueError(f"tensor {name}: {len(shape)} dimensions, at most 4")
            if not all(_is_count(x) for x in (*shape, b, end)):  # not floats, strings, bools or negatives
                raise ValueError(f"tensor {name}: shape {list(shape)} and data_offsets {[b, end]} must be "
                                 "non-negative integers")
            item = 2 if dtype in ("F16", "BF16") else 4
            if not (b <= end) or end - b != math.prod(shape) * item:
                raise ValueError(f"tensor {name}: offsets {b}..{end} do not fit shape {shape} of {dtype}")
            out[name] = (dtype, shape, base + b, base + end)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"corrupted safetensors header ({exc})", where=str(f),
                              fix="the file is corrupted: re-copy or re-create it") from None
    data_end = max((e[3] for e in out.values()), default=base)
    if data_end > size:
        raise CheckpointError(f"truncated: tensors need {data_end} bytes, the file has {size}", where=str(f),
                              fix="the copy is incomplete: re-copy or re-create it")
    return out


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_block_count(spec: ModelSpec, blocks: set[int], names: list[str], where: str) -> None:
    """Blocks present in the files vs the config's layer count, before anything iterates over the
    config's blocks: a block_count of 10**9 would otherwise build a name map of 10**9 entries."""
    extra = sorted(b for b in blocks if b >= spec.n_layers)
    if extra:
        tagged = [n for n in names if any(f".{b}." in n for b in extra[:1])]
        raise CheckpointError(f"unexpected tensors {tagged[:4]} of block {extra[0]} (the config implies "
                              f"{spec.n_layers} blocks)", where=where,
                              fix="the checkpoint does not match its config: use the model's own config.json")
    first_missing = next(i for i in range(len(blocks) + 1) if i not in blocks)
    if first_missing < spec.n_layers:
        raise CheckpointError(f"missing tensor blk.{first_missing}.* (the config implies {spec.n_layers} blocks, "
                              f"the files hold {len(blocks)})", where=where,
                              fix="the checkpoint does not match its config: use the model's own config.json")


def _open_gguf(p: Path) -> Checkpoint:
    import gguf

    try:
        header = read_gguf_header(p)  # bounds-checked; ~1 s for a Llama 3 vocabulary (GGUFReader: minutes)
    except Exception as exc:  # junk raises ValueError & co.
        raise CheckpointError(f"truncated or corrupted GGUF file ({type(exc).__name__}: {exc})", where=str(p),
                              fix="the file is incomplete or corrupted: re-copy or re-convert it") from None
    try:
        spec = from_gguf(p, header=header)
    except SpecError as exc:
        raise CheckpointError(exc.what, where=exc.where, fix=exc.fix) from None
    blocks = {int(t.name.split(".")[1]) for t in header.tensors if t.name.startswith("blk.")
              and t.name.split(".")[1].isascii() and t.name.split(".")[1].isdigit()}
    _check_block_count(spec, blocks, [t.name for t in header.tensors], str(p))
    infos: dict[str, TensorInfo] = {}
    for t in header.tensors:  # read_header checked that each lies inside the file
        kind = gguf.GGMLQuantizationType(t.ggml_type).name
        if kind not in _GGUF_TYPES:
            raise CheckpointError(f"tensor {t.name[:60]} has type {kind}, which primasim's kernels cannot compute",
                                  where=str(p),
                                  fix=f"re-quantise to one of {', '.join(_GGUF_TYPES)} (llama-quantize ... Q4_K_M)")
        infos[t.name] = TensorInfo(t.name, p, t.offset, t.n_bytes, tuple(reversed(t.shape)), kind)
    ckpt = Checkpoint(spec=spec, path=p, format="gguf", files=[p], infos=infos,
                      qk_interleaved=spec.family == "llama")
    return ckpt


def _pread_exact(f: Path, spans: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes of each (offset, length) span of file f, read with readahead off: a worker's
    set-up reads only the pages it asks for (its memory limit comes after; the weights must
    still be on disk when it starts, not in a page cache it was charged for)."""
    fd = os.open(f, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        out = []
        for off, n in spans:
            b = os.pread(fd, n, off)
            if len(b) != n:
                raise CheckpointError(f"short read: {len(b)} of {n} bytes at offset {off}", where=str(f),
                                      fix="the file is truncated: re-copy it")
            out.append(b)
        return out
    finally:
        os.close(fd)


def _check_tensors(ckpt: Checkpoint) -> None:
    """Every tensor the spec implies is present with its shape; nothing unexpected; samples finite."""
    spec, where = ckpt.spec, str(ckpt.path)
    expected = {t.name: t for t in spec.tensors()}
    if spec.family == "llama" and not spec.qkv_bias:
        for role in ("attn_q", "attn_k", "attn_v"):
            if f"blk.0.{role}.bias" in ckpt.infos:
                raise CheckpointError(f"the checkpoint has QKV biases ({role}.bias) but the config says none",
                                      where=where, fix="architecture mismatch: use the model's own config")
    for name, t in expected.items():
        info = ckpt.infos.get(name)
        if info is None:
            raise CheckpointError(f"missing tensor {name} (the config implies {spec.n_layers} blocks, "
                                  f"{'tied' if spec.tie_embeddings else 'untied'} embeddings)", where=where,
                                  fix="the checkpoint does not match its config: use the model's own config.json")
        if info.shape != t.shape:
            raise CheckpointError(f"tensor {name} has shape {info.shape}, the config implies {t.shape}",
                                  where=where, fix=_shape_hint(name))
    extra = set(ckpt.infos) - set(expected) - {"rope_freqs.weight"}
    if extra:
        raise CheckpointError(f"unexpected tensors {sorted(extra)[:4]} (the config implies {spec.n_layers} blocks)",
                              where=where, fix="the checkpoint does not match its config: use the model's own config.json")
    if "rope_freqs.weight" in ckpt.infos and ckpt.infos["rope_freqs.weight"].shape != (spec.head_dim // 2,):
        raise CheckpointError("rope_freqs.weight has the wrong length", where=where, fix="re-convert the model")
    floats = [(n, i) for n, i in ckpt.infos.items() if i.dtype in ("F32", "F16", "BF16")]
    for name, info in floats:  # the first and last 256 bytes, read without readahead (a page each)
        head, tail = _pread_exact(info.file, [(info.offset, min(256, info.nbytes)),
                                              (info.offset + max(0, info.nbytes - 256), min(256, info.nbytes))])
        item = 4 if info.dtype == "F32" else 2
        for chunk in (np.frombuffer(head, np.uint8), np.frombuffer(tail, np.uint8)):
            vals = chunk[:len(chunk) - len(chunk) % item]
            v = vals.view(np.float32 if item == 4 else np.float16) if info.dtype != "BF16" else \
                (vals.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            if not np.all(np.isfinite(v)):
                raise CheckpointError(f"tensor {name} holds non-finite values (corrupted data)", where=str(info.file),
                                      fix="the file is corrupted: re-copy or re-create it")
    copied = [(n, i) for n, i in ckpt.infos.items() if len(i.shape) == 1 and not ckpt.aliases(n)]
    if copied:  # the model copies these (norms, biases) as f32; matrices are computed in place
        kinds = sorted({i.dtype if i.dtype != "F32" else "misaligned F32" for _, i in copied})
        ckpt.notes.append(f"{len(copied)} small 1-D tensors ({', '.join(kinds)}; "
                          f"{sum(math.prod(i.shape) * 4 for _, i in copied) / 1024:.0f} KB as f32) copied to "
                          "anonymous memory; every weight matrix stays file-backed")


def _shape_hint(name: str) -> str:
    field_of = {"token_embd": "vocab_size/hidden_size", "output": "vocab_size/hidden_size",
                "attn_q": "num_attention_heads/head_dim", "attn_k": "num_key_value_heads/head_dim",
                "attn_v": "num_key_value_heads/head_dim", "attn_output": "hidden_size/head_dim",
                "ffn": "intermediate_size", "norm": "hidden_size"}
    for key, fld in field_of.items():
        if key in name:
            return f"architecture mismatch: check {fld} in the config"
    return "architecture mismatch: use the model's own config"


# ---------------------------------------------------------------------------- random checkpoints
def _init_std(spec: ModelSpec, name: str) -> float | None:
    """Init scale per tensor so activations stay O(1): N(0, 1/fan_in) for matrices (the embedding
    and output too, so tied or untied logits have std ~1); None marks norms (1 + small noise)."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(".bias"):
        return 0.2
    if "attn_output" in name:
        return spec.q_dim ** -0.5
    if "ffn_down" in name:
        return spec.ffn ** -0.5
    return spec.hidden ** -0.5


def random_tensor(spec: ModelSpec, name: str, shape: Sequence[int], seed: int) -> np.ndarray:
    """The f32 values of tensor `name` (HF layout (out, in)), from its own seeded stream, so they do
    not depend on the file format, the shard count or the order of writing."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    x = rng.standard_normal(tuple(shape), dtype=np.float32)
    std = _init_std(spec, name)
    if std is None:
        return (1.0 + 0.1 * x).astype(np.float32)
    x *= np.float32(std)
    return x


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row permutation of Llama attn_q/attn_k (HF rotate-half -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_freq_factors(spec: ModelSpec) -> np.ndarray | None:
    """llama.cpp's rope_freqs.weight for Llama 3 rope scaling: base / scaled inverse frequencies."""
    if spec.rope_scaling is None:
        return None
    base = 1.0 / spec.rope_theta ** (np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim)
    return (base / rope_inv_freq(spec)).astype(np.float32)


def write_random_checkpoint(spec: ModelSpec, out: str | Path, *, fmt: Format = "safetensors", seed: int = 0,
                            shards: int = 1, dtype: str | None = None, vocab: Any = None) -> Path:
    """Write a random-weight checkpoint of `spec`, seeded and deterministic (same seed, same bytes).

    safetensors: `out` is a directory; writes config.json, tokenizer.json and model.safetensors (or
    `shards` files + model.safetensors.index.json). F32 when spec.quant is f32, else F16 (`dtype`
    "BF16" for bfloat16). Tensor data is page-aligned (header padded) and every tensor 64-byte
    aligned. gguf: `out` is the .gguf file (or a directory, which gets model.gguf); matrix types
    follow spec.quant as llama.cpp's quantiser chooses them (f32, f16, q8_0, q4_0, q4k = Q4_K_M:
    Q4_K with Q6_K for the output and, by llama.cpp's use_more_bits rule, some attn_v / ffn_down;
    q5k, q6k), or `dtype` for every matrix (e.g. "BF16"); rows a block does not divide fall back
    as llama.cpp does. K-quants are written by runtime/quantize.py. llama.cpp's names, metadata,
    tokenizer and Q/K permutation, so llama.cpp loads it and computes the same model. The same
    seed gives the same model in every format. `vocab`: a `primasim.runtime.vocabularies.Vocabulary`
    (GGUF only) instead of the generated byte-level BPE; spec.vocab must be its size. Returns the
    path to open with `open_checkpoint`.
    """
    out = Path(out)
    if fmt not in ("safetensors", "gguf"):
        raise CheckpointError(f"unknown format {fmt!r}", where="write_random_checkpoint", fix="use safetensors or gguf")
    if shards < 1 or (fmt == "gguf" and shards != 1):
        raise CheckpointError(f"shards={shards} is not possible for {fmt}", where="write_random_checkpoint",
                              fix="use shards >= 1, and 1 for gguf")
    allowed = ("F32", "F16", "BF16") if fmt == "safetensors" else _GGUF_TYPES
    if dtype is not None and dtype not in allowed:
        raise CheckpointError(f"cannot write {dtype} to {fmt}", where="write_random_checkpoint",
                              fix=f"use one of {', '.join(allowed)}")
    if vocab is not None and (fmt != "gguf" or vocab.size != spec.vocab):
        raise CheckpointError(f"a {vocab.size}-token vocabulary for a {spec.vocab}-token {fmt} model",
                              where="write_random_checkpoint", fix="pass fmt='gguf' and spec.vocab == vocab.size")
    tok = build_tokenizer(spec.vocab, seed) if vocab is None else None
    if fmt == "gguf":
        path = out / "model.gguf" if out.suffix != ".gguf" else out
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_gguf(spec, path, seed, tok if vocab is None else vocab, dtype)
        return path
    out.mkdir(parents=True, exist_ok=True)
    cfg = spec.to_hf_config()
    st_dtype = dtype or ("F32" if spec.quant == "f32" else "F16")
    cfg["torch_dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[st_dtype]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tok is not None:
        tok.save(str(out / "tokenizer.json"))
    _write_safetensors(spec, out, seed, shards, st_dtype)
    return out


def _hf_names(spec: ModelSpec) -> Iterator[tuple[str, Tensor]]:
    """(HF name, GGUF tensor) in model order, for the writer."""
    hf = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
    for t in spec.tensors():
        if t.name == "token_embd.weight":
            yield "model.embed_tokens.weight", t
        elif t.name == "output_norm.weight":
            yield "model.norm.weight", t
        elif t.name == "output.weight":
            yield "lm_head.weight", t
        else:
            _, i, role, kind = t.name.split(".")
            yield f"model.layers.{i}.{hf[role]}.{kind}", t


def _st_bytes(x: np.ndarray, st_dtype: str) -> bytes:
    if st_dtype == "BF16":
        from .quantize import quantize

        return quantize(x, "BF16").tobytes()
    return x.astype(np.float32 if st_dtype == "F32" else np.float16, copy=False).tobytes()


def _write_safetensors(spec: ModelSpec, out: Path, seed: int, shards: int, st_dtype: str) -> None:
    # The safetensors package writes from in-memory dicts with 8-byte alignment only; we stream
    # tensor by tensor and page-align the data (the format allows a space-padded header), so the
    # writer is ours. tests/test_checkpoint.py reads the result back with safetensors' own reader.
    item = 4 if st_dtype == "F32" else 2
    entries = list(_hf_names(spec))
    # Tensors whose size is not a multiple of 64 bytes go last, so all the others stay aligned.
    entries.sort(key=lambda e: (e[1].n_elements * item) % ALIGN != 0)
    total = sum(t.n_elements * item for _, t in entries)
    groups: list[list[tuple[str, Tensor]]] = [[] for _ in range(shards)]
    acc = 0
    for e in entries:
        groups[min(shards - 1, acc * shards // max(total, 1))].append(e)
        acc += e[1].n_elements * item
    files = ["model.safetensors"] if shards == 1 else \
        [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    for fname, group in zip(files, groups):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for hf_name, t in group:
            n = t.n_elements * item
            header[hf_name] = {"dtype": st_dtype, "shape": list(t.shape), "data_offsets": [off, off + n]}
            off += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % mmap.PAGESIZE)
        tmp = out / (fname + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(len(blob).to_bytes(8, "little"))
            fh.write(blob)
            for _, t in group:
                fh.write(_st_bytes(random_tensor(spec, t.name, t.shape, seed), st_dtype))
        os.replace(tmp, out / fname)  # a new inode: mappings of an older file stay valid
    if shards > 1:
        wmap = {hf_name: fname for fname, g in zip(files, groups) for hf_name, _ in g}
        index = {"metadata": {"total_size": total}, "weight_map": wmap}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# general.file_type per spec.quant or per `dtype` given to the writer (gguf.LlamaFileType names)
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4k": "MOSTLY_Q4_K_M",
               "q4_0": "MOSTLY_Q4_0", "q5k": "MOSTLY_Q5_K_M", "q6k": "MOSTLY_Q6_K", "F32": "ALL_F32",
               "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0",
               "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q4_K": "MOSTLY_Q4_K_S",
               "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K"}


def _gguf_type(t: Tensor, dtype: str | None) -> str:
    """The ggml type a tensor is stored as: 1-D F32; matrices per the spec's mix (Tensor.storage_type)
    or `dtype`, falling back as llama.cpp does when the block does not divide a row."""
    if len(t.shape) == 1:
        return "F32"
    if dtype is None:
        return t.storage_type
    return dataclasses.replace(t, ggml_type=dtype).storage_type


def _write_gguf(spec: ModelSpec, path: Path, seed: int, tok: Any, dtype: str | None = None) -> None:
    import gguf

    from .quantize import quantize

    key = dtype or spec.quant
    if key not in _FILE_TYPES:
        raise CheckpointError(f"cannot write quantisation {spec.quant!r} to GGUF", where=str(path),
                              fix="use --quant f32, f16, q8_0 or q4k for random checkpoints")
    ftype = gguf.LlamaFileType[_FILE_TYPES[key]]
    arch = spec.family
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(spec.name)
    w.add_file_type(int(ftype))
    w.add_context_length(spec.max_context)
    w.add_embedding_length(spec.hidden)
    w.add_block_count(spec.n_layers)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    w.add_vocab_size(spec.vocab)
    if hasattr(tok, "add_to_gguf"):
        tok.add_to_gguf(w)
    elif tok is not None:
        _add_gguf_tokenizer(w, tok)

    def stored(t: Tensor) -> np.ndarray:
        x = random_tensor(spec, t.name, t.shape, seed)
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            x = _permute_qk(x, spec.n_heads if ".attn_q." in t.name else spec.n_kv_heads)
        tt = _gguf_type(t, dtype)
        return x if tt == "F32" else x.astype(np.float16) if tt == "F16" else quantize(x, tt)

    tensors = list(spec.tensors())
    factors = _rope_freq_factors(spec)
    if factors is not None:  # Llama 3 rope scaling travels as a tensor, as llama.cpp's converter writes it
        w.add_tensor_info("rope_freqs.weight", factors.shape, factors.dtype, factors.nbytes,
                          raw_dtype=gguf.GGMLQuantizationType.F32)
    for t in tensors:  # all tensor infos first (the header), then the data, one tensor at a time
        tt = gguf.GGMLQuantizationType[_gguf_type(t, dtype)]
        block, nbytes = gguf.GGML_QUANT_SIZES[tt]
        row = t.shape[-1] // block * nbytes
        if tt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dt = np.dtype(np.float32 if tt == gguf.GGMLQuantizationType.F32 else np.float16)
            w.add_tensor_info(t.name, t.shape, dt, t.n_elements * dt.itemsize, raw_dtype=tt)
        else:
            w.add_tensor_info(t.name, (*t.shape[:-1], row), np.dtype(np.uint8), math.prod(t.shape[:-1]) * row,
                              raw_dtype=tt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    if factors is not None:
        w.write_tensor_data(factors)
    for t in tensors:
        w.write_tensor_data(stored(t))
    w.close()
    os.replace(tmp, path)  # a new inode: mappings of an older file stay valid


def _add_gguf_tokenizer(w: Any, tok: Tokenizer) -> None:
    """Our byte-level BPE as llama.cpp's "gpt2" tokenizer (tokens, types, merges, special ids)."""
    import gguf

    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    specials = {a["content"]: a["id"] for a in data["added_tokens"]}
    tokens = [""] * len(vocab)
    for s, i in vocab.items():
        tokens[i] = s
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(specials["<s>"])
    w.add_eos_token_id(specials["</s>"])
    w.add_pad_token_id(specials["<pad>"])
    w.add_add_bos_token(True)


# ---------------------------------------------------------------------------- tokenizer
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: config.json's bos_token_id=1, eos_token_id=2


def _corpus(seed: int, vocab: int) -> Iterator[str]:
    """Seeded pseudo-text: Zipf-distributed words of English-like syllables, enough of them that
    BPE training reaches `vocab` tokens (measured: 10 words per vocabulary entry suffice)."""
    rng = np.random.default_rng([seed, 0x70C])
    cons = list("bcdfghjklmnprstvwz") + ["th", "st", "ch", "sh", "tr", "pl"]
    vows = list("aeiou") + ["ea", "ou", "ai"]
    sylls = [c + v for c in cons for v in vows] + [v + c for c in cons for v in vows]
    lex = ["".join(rng.choice(sylls, rng.integers(1, 4))) for _ in range(2 * vocab)]
    zipf = 1.0 / np.arange(1, len(lex) + 1)
    words = rng.choice(len(lex), size=max(4000, 10 * vocab), p=zipf / zipf.sum())
    for i in range(0, len(words), 1000):
        yield " ".join(lex[j] for j in words[i:i + 1000]) + ".\n"


def build_tokenizer(vocab: int, seed: int = 0) -> Tokenizer | None:
    """A byte-level BPE tokenizer of exactly `vocab` tokens (any text round-trips), trained with
    `tokenizers` on seeded pseudo-text; it prepends <s> like Llama's. None if vocab < 259."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    if vocab < 256 + len(SPECIAL_TOKENS):
        return None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed, vocab), trainer)
    short = vocab - tok.get_vocab_size()
    if short > 0:  # too little text for the last merges: unused special tokens fill the table
        tok.add_special_tokens([AddedToken(f"<unused{i}>", special=True) for i in range(short)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok
