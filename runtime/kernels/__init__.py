"""Products and embedding rows computed straight from memory-mapped GGUF / safetensors files.

The compiled half (qk_*.cc, built by the package's install into `_qk*.so`) holds AVX-512 VNNI,
AVX2 and scalar kernels for F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K,
chosen at load for this CPU, and two XLA FFI handlers called from jitted JAX code:

- `matmul(files, x, w)`: y_i = x @ W_i.T for the tensors of a `QWeight` (q/k/v or gate/up share
  one call, so the activations are quantised once), x (..., K) f32 -> tuple of (..., rows_i) f32.
- `embed(files, w, ids)`: rows `ids` of an embedding table, dequantised -> (..., K) f32.

`files` are whole checkpoint files as zero-copy uint8 jax.Arrays (`file_array`): weights stay in
the page cache, evictable, never copied; a `QWeight` carries the tensors' offsets and types as a
small runtime array, so one compiled executable serves every layer. Why a hand-written kernel,
and the arithmetic (llama.cpp's): docs/runtime.md "Quantised weights".
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from primasim.core.errors import CheckpointError

from ..quantize import row_bytes as row_bytes
from .reference import TYPE_IDS, TYPE_NAMES

ABI_VERSION = 6
DESC_WORDS = 6  # offset lo, offset hi, ggml type, file index, rows, cols
SUPPORTED = tuple(TYPE_IDS)  # weight types the kernels read
_LOCK = threading.Lock()


class KernelsUnavailable(CheckpointError):
    """The compiled kernels are missing or do not load (the package was not built)."""


def _find_library() -> Path | None:
    env = os.environ.get("PRIMASIM_QK_LIB")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    found = sorted(here.glob("_qk*.so")) + sorted(here.glob("_qk*.pyd"))
    return found[0] if found else None


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernels, loaded and registered with jax once per process."""
    path = _find_library()
    if path is None or not path.exists():
        raise KernelsUnavailable("the compiled kernels (runtime/kernels/_qk*.so) are not built",
                                 where=str(Path(__file__).parent),
                                 fix="install the package from its source tree: pip install -e . (needs g++ >= 9)")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelsUnavailable(f"the compiled kernels do not load ({exc})", where=str(path),
                                 fix="rebuild: pip install -e . --force-reinstall --no-deps") from None
    lib.primasim_qk_abi_version.restype = ctypes.c_int
    if lib.primasim_qk_abi_version() != ABI_VERSION:
        raise KernelsUnavailable(f"kernel library ABI {lib.primasim_qk_abi_version()}, this code needs {ABI_VERSION}",
                                 where=str(path), fix="rebuild: pip install -e . --no-deps")
    for f in ("primasim_qk_available", "primasim_qk_current"):
        getattr(lib, f).restype = ctypes.c_char_p
    lib.primasim_qk_select.argtypes = [ctypes.c_char_p]
    lib.primasim_qk_select.restype = ctypes.c_int
    lib.primasim_qk_use_xla_pool.argtypes = [ctypes.c_int]
    lib.primasim_qk_use_xla_pool.restype = ctypes.c_int
    jax.ffi.register_ffi_target("primasim_matmul", jax.ffi.pycapsule(lib.PrimasimMatmul), platform="cpu")
    jax.ffi.register_ffi_target("primasim_embed", jax.ffi.pycapsule(lib.PrimasimEmbed), platform="cpu")
    jax.ffi.register_ffi_target("primasim_attend", jax.ffi.pycapsule(lib.PrimasimAttend), platform="cpu")
    want = os.environ.get("PRIMASIM_KERNEL_ISA", "")
    if want and not lib.primasim_qk_current().decode().startswith(want):
        raise KernelsUnavailable(f"PRIMASIM_KERNEL_ISA={want} cannot run on this CPU", where="environment",
                                 fix=f"use one of {lib.primasim_qk_available().decode()} or unset it")
    return lib


def available() -> bool:
    try:
        library()
    except KernelsUnavailable:
        return False
    return True


def isas() -> list[str]:
    """Kernel sets this CPU can run, widest ISA first (e.g. avx512-vnni-bf16, avx512q-avx2f, avx2,
    scalar; `isa()` is the default)."""
    return library().primasim_qk_available().decode().split(",")


def isa() -> str:
    """The kernel set in use."""
    return library().primasim_qk_current().decode()


@contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run with another kernel set (tests compare them); computations must not be in flight."""
    lib = library()
    before = isa()
    with _LOCK:
        if lib.primasim_qk_select(name.encode()) != 0:
            raise ValueError(f"kernel set {name!r} cannot run here; available: {isas()}")
        try:
            yield
        finally:
            lib.primasim_qk_select(before.encode())


@contextmanager
def use_pool(name: str) -> Iterator[None]:
    """Hand a call's rows to the library's own workers ("own", the default) or to XLA's intra-op
    pool ("xla", also PRIMASIM_KERNEL_POOL=xla); for tests and A/B benchmarks, computations must
    not be in flight."""
    if name not in ("own", "xla"):
        raise ValueError(f"thread pool {name!r}: use 'own' or 'xla'")
    lib = library()
    with _LOCK:
        before = lib.primasim_qk_use_xla_pool(int(name == "xla"))
        try:
            yield
        finally:
            lib.primasim_qk_use_xla_pool(before)


# ---------------------------------------------------------------------------- weights
@partial(jax.tree_util.register_dataclass, data_fields=["desc"], meta_fields=["rows", "cols", "first"])
@dataclass(frozen=True)
class QWeight:
    """One or more weight matrices (out_i, cols) in mapped files, computed together.

    `desc` (n, 6) uint32 per tensor: byte offset (low, high word), ggml type id, index into the
    `files` operand list, rows, cols; the tensors are rows first..first+len(rows)-1 of it (a decode
    step passes one table for all its matrices). Only the shapes are static, so the jit cache is
    shared by every layer of the same architecture whatever the tensor types and offsets."""

    desc: jax.Array
    rows: tuple[int, ...]
    cols: int
    first: int = 0


def describe(tensors: Sequence[tuple[int, int, str, int, int]]) -> np.ndarray:
    """(offset, file index, ggml type name, rows, cols) per tensor -> a descriptor table."""
    out = np.zeros((len(tensors), DESC_WORDS), np.uint32)
    for i, (off, fi, qtype, rows, cols) in enumerate(tensors):
        if qtype not in TYPE_IDS:
            raise CheckpointError(f"tensor type {qtype} has no kernel", where="runtime.kernels",
                                  fix=f"re-quantise to one of {', '.join(SUPPORTED)}")
        out[i] = (off & 0xFFFFFFFF, off >> 32, TYPE_IDS[qtype], fi, rows, cols)
    return out


def qweight(tensors: Sequence[tuple[int, int, str, int, int]]) -> QWeight:
    """A QWeight for tensors given as (offset, file index, type, rows, cols); equal cols required."""
    cols = {t[4] for t in tensors}
    if len(cols) != 1:
        raise CheckpointError(f"tensors computed together need equal widths, got {sorted(cols)}",
                              where="runtime.kernels", fix="compute them in separate calls")
    return QWeight(jnp.asarray(describe(tensors)), tuple(t[3] for t in tensors), cols.pop())


def types_of(w: QWeight) -> list[str]:
    return [TYPE_NAMES.get(int(t), f"#{int(t)}") for t in np.asarray(w.desc)[:, 2]]


def file_array(mapped: np.ndarray) -> jax.Array:
    """A whole mapped file (read-only uint8 numpy view of an mmap) as a jax.Array without a copy.

    jax aliases host buffers that start on a 64-byte boundary (a mapping starts on a page);
    anything else would be copied, so that is refused rather than silently inflating memory."""
    if mapped.dtype != np.uint8 or mapped.ndim != 1 or mapped.ctypes.data % 64:
        raise ValueError("file_array needs the whole mapping as a 1-D uint8 array")
    arr = jax.device_put(mapped)
    if arr.unsafe_buffer_pointer() != mapped.ctypes.data:
        raise RuntimeError("jax copied a mapped file instead of aliasing it")
    return arr


# ---------------------------------------------------------------------------- the calls
_NONE = np.zeros((0,), np.float32)
M_NORM, M_SWIGLU, M_RESIDUAL = 1, 2, 4  # qk_ffi.cc Mode


def matmul(files: Sequence[jax.Array], x: jax.Array, w: QWeight, *, norm: jax.Array | None = None,
           eps: float = 0.0, up: jax.Array | None = None, residual: jax.Array | None = None,
           norm_row: int = 0) -> tuple[jax.Array, ...]:
    """x (..., cols) f32 times each tensor of `w` transposed: a tuple of (..., rows_i) f32.

    The block's element-wise steps can ride along (computed in the call, no XLA op of their own):
    `norm` (cols,): x -> rms_norm(x, eps) * norm first; `up` (shaped like x): x -> silu(x) * up
    first; `residual` (shaped like result 0): result 0 -> residual + result 0.
    Packed operands (a decode step passes one table of each instead of one array per call): the
    tensors are rows `w.first`.. of `w.desc`, and `norm` may be a table (n, cols) whose row
    `norm_row` is this call's weight."""
    if norm is not None and up is not None:
        raise ValueError("matmul: norm and up exclude each other")
    lead = x.shape[:-1]
    out = tuple(jax.ShapeDtypeStruct((*lead, r), jnp.float32) for r in w.rows)
    mode = (M_NORM if norm is not None else 0) | (M_SWIGLU if up is not None else 0) | (
        M_RESIDUAL if residual is not None else 0)
    aux = norm if norm is not None else up if up is not None else _NONE
    res = residual if residual is not None else _NONE
    library()
    return tuple(jax.ffi.ffi_call("primasim_matmul", out)(
        x.astype(jnp.float32), jnp.asarray(aux, jnp.float32), jnp.asarray(res, jnp.float32), w.desc, *files,
        eps=np.float32(eps), mode=np.int32(mode), first=np.int32(w.first), aux_off=np.int64(norm_row * x.shape[-1])))


_ROW0 = np.zeros((1,), np.int32)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array, inv_freq: jax.Array, kc: jax.Array,
           vc: jax.Array, *, span: int, interleaved: bool, layer: int = 0,
           kv_rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One block's attention on a contiguous KV cache in one call (qk_attn.cc): RoPE of q (B, T, H*D)
    and k (B, T, H_kv*D) at positions pos..pos+T-1 (`interleaved`: llama.cpp's Q/K row order), k
    and v written into the caches (B, H_kv, S, D) in place, causal GQA over the first `span`
    positions. Returns (output (B, T, H*D), K cache, V cache). The caches may be a stack of layers
    (n, B, H_kv, S, D): the call uses row kv_rows[`layer`] (kv_rows int32, a runtime value, so
    windows at different rows of one stack share a compiled function)."""
    library()
    f32 = jnp.float32
    shapes = (jax.ShapeDtypeStruct(q.shape, f32), jax.ShapeDtypeStruct(kc.shape, f32),
              jax.ShapeDtypeStruct(vc.shape, f32))
    r0 = jnp.asarray(_ROW0 if kv_rows is None else kv_rows, jnp.int32)
    out, kc, vc = jax.ffi.ffi_call("primasim_attend", shapes, input_output_aliases={6: 1, 7: 2})(
        q.astype(f32), k.astype(f32), v.astype(f32), pos.astype(jnp.int32), inv_freq.astype(f32), r0, kc, vc,
        span=np.int64(span), interleaved=np.int32(interleaved), layer=np.int64(layer))
    return out, kc, vc


def embed(files: Sequence[jax.Array], w: QWeight, ids: jax.Array) -> jax.Array:
    """Rows `ids` (any shape, int32) of a one-tensor QWeight, dequantised: ids.shape + (cols,)."""
    library()
    flat = ids.reshape(-1).astype(jnp.int32)
    out = jax.ffi.ffi_call("primasim_embed", jax.ShapeDtypeStruct((flat.shape[0], w.cols), jnp.float32))(
        flat, w.desc, *files)
    return out.reshape(*ids.shape, w.cols)
