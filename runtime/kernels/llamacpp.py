"""llama.cpp's own quantisers and dot products, called through ctypes: an independent oracle.

Optional: needs llama-cpp-python (`pip install -e '.[bench]'`), whose ggml libraries export
`ggml_quantize_chunk` (the weight quantisers `llama_model_quantize` runs), `quantize_row_q8_K` /
`quantize_row_q8_0` / `quantize_row_q8_1` (the activation quantisers of the CPU backend) and the
`ggml_vec_dot_*` kernels. Tests compare runtime/quantize.py and the compiled kernels with them.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from .reference import TYPE_IDS

# the activation format ggml's CPU backend converts to, per weight type (type_traits_cpu vec_dot_type)
VEC_DOT_TYPE = {"Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1",
                "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K"}
ACT_BYTES = {"Q8_0": (32, 34), "Q8_1": (32, 36), "Q8_K": (256, 292)}


@functools.cache
def libs() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    """(libggml-base, libggml-cpu) of the installed llama-cpp-python, or None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    d = Path(llama_cpp.__file__).parent / "lib"
    try:
        base = ctypes.CDLL(str(d / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        cpu = ctypes.CDLL(str(d / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    base.ggml_quantize_chunk.restype = ctypes.c_size_t
    base.ggml_quantize_init.argtypes = [ctypes.c_int]
    cpu.ggml_cpu_init()
    for f in ("quantize_row_q8_0", "quantize_row_q8_1", "quantize_row_q8_K"):
        getattr(cpu, f).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return base, cpu


def available() -> bool:
    return libs() is not None


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """llama.cpp's quantiser (no importance matrix): f32 (rows, cols) -> stored bytes (rows, row_bytes)."""
    from ..quantize import row_bytes

    base, _ = libs()  # type: ignore[misc]
    x = np.ascontiguousarray(x, np.float32)
    rows, cols = x.shape
    out = np.zeros((rows, row_bytes(qtype, cols)), np.uint8)
    t = TYPE_IDS[qtype]
    base.ggml_quantize_init(t)
    base.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, rows, cols, None)
    return out


def quantize_activations(x: np.ndarray, act: str) -> np.ndarray:
    """The CPU backend's activation quantiser (x86 build): f32 (cols,) -> block bytes of `act`."""
    _, cpu = libs()  # type: ignore[misc]
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    n, b = ACT_BYTES[act]
    out = np.zeros(x.size // n * b, np.uint8)
    getattr(cpu, {"Q8_0": "quantize_row_q8_0", "Q8_1": "quantize_row_q8_1", "Q8_K": "quantize_row_q8_K"}[act])(
        x.ctypes.data, out.ctypes.data, x.size)
    return out


def vec_dot(qtype: str, row: np.ndarray, x: np.ndarray) -> float:
    """One weight row (stored bytes) . x as llama.cpp computes it: x quantised to the type's
    vec_dot_type (F16/BF16: rounded), then ggml_vec_dot_<type>_<act>."""
    _, cpu = libs()  # type: ignore[misc]
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    n = x.size
    if qtype in ("F16", "BF16"):
        act = np.zeros(n, np.uint16)
        conv = cpu.ggml_cpu_fp32_to_fp16 if qtype == "F16" else cpu.ggml_cpu_fp32_to_bf16
        conv.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        conv(x.ctypes.data, act.ctypes.data, n)
        fn = getattr(cpu, f"ggml_vec_dot_{qtype.lower()}")
    elif qtype == "F32":
        act, fn = x, cpu.ggml_vec_dot_f32
    else:
        a = VEC_DOT_TYPE[qtype]
        act = quantize_activations(x, a)
        fn = getattr(cpu, f"ggml_vec_dot_{qtype.lower().replace('_k', '_K')}_{a.lower().replace('_k', '_K')}")
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                   ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    row = np.ascontiguousarray(row, np.uint8)
    s = np.zeros(1, np.float32)
    fn(n, s.ctypes.data, 0, row.ctypes.data, 0, act.ctypes.data, 0, 1)
    return float(s[0])
