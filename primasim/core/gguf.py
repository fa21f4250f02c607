"""THE reader of GGUF headers (metadata and tensor infos): fast and bounds-checked. Used by
`core.model_sources.from_gguf` / `check_gguf_layout`, the runtime's checkpoint and its tokenizer.

`gguf.GGUFReader` builds numpy views per string: ~1 s per 10k strings on this machine, so a
Llama 3 vocabulary (128k tokens + 280k merges) takes minutes, and every process that opens the
model pays it. This reader walks the same format with `struct` (strings) and `numpy.frombuffer`
(numeric arrays): ~1 s for those 400k strings. Every count and length is checked against the
file before it is used, so junk raises ValueError, never loops or allocates without bound.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# GGUF value types (gguf.GGUFValueType) -> numpy dtype of the scalar; 8 = string, 9 = array
_NUMPY = {0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "?", 10: "u8", 11: "i8", 12: "f8"}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4   # GGML_MAX_DIMS
MAX_NEST = 4   # arrays of arrays: llama.cpp writes none; deeper nesting only serves to overflow the stack


@dataclass(frozen=True)
class TensorEntry:
    """One tensor info: `shape` in ggml order (fastest-varying first), `offset` from the file start."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    n_bytes: int


@dataclass
class GGUFHeader:
    metadata: dict[str, Any]                               # the kept entries (see read_header)
    counts: dict[str, int] = field(default_factory=dict)   # element count of every array entry
    tensors: list[TensorEntry] = field(default_factory=list)
    data_offset: int = 0
    alignment: int = 32


def read_metadata(path: str | Path, prefixes: tuple[str, ...] = ("",)) -> dict[str, Any]:
    """The metadata entries whose keys start with one of `prefixes` (all by default)."""
    return read_header(path, keep=lambda k: k.startswith(prefixes), tensors=False).metadata


def read_header(path: str | Path, keep: Callable[[str], bool] = lambda k: True, *,
                tensors: bool = True) -> GGUFHeader:
    """The header of a GGUF file: kept metadata entries as Python values (strings as str), numeric
    arrays as numpy arrays, string arrays as lists of bytes (the caller decodes them and can name a
    bad entry); every array's length; the tensor infos, each checked to lie inside the file.
    Raises ValueError on a malformed header."""
    with open(path, "rb") as fh:
        try:
            data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise ValueError("the file is empty") from None
    # no readahead: a fault near the header's end would read the disk's readahead window of
    # tensor data (8 MiB here) into the page cache, which a worker's set-up must not do
    data.madvise(mmap.MADV_RANDOM)
    try:
        return _Walker(data).header(keep, tensors)
    finally:
        data.close()


class _Walker:
    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.size, self.off = data, len(data), 8
        if self.size < 24 or data[:4] != b"GGUF":
            raise ValueError(f"no GGUF header (starts with {bytes(data[:4])!r})")
        self.bo = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"  # as gguf's reader decides
        self.u32, self.u64 = struct.Struct(self.bo + "I"), struct.Struct(self.bo + "Q")

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.off:
            raise ValueError(f"{what} needs {n} bytes at offset {self.off}, the file has {self.size - self.off} left")

    def read(self, st: struct.Struct, what: str) -> int:
        self.need(st.size, what)
        v = st.unpack_from(self.data, self.off)[0]
        self.off += st.size
        return int(v)

    def string(self, what: str) -> bytes:
        n = self.read(self.u64, what)
        self.need(n, what)
        self.off += n
        return self.data[self.off - n:self.off]

    def strings(self, n: int, what: str, keep: bool) -> list[bytes] | None:
        self.need(n * 8, f"{what} ({n} elements)")  # each string takes at least its 8-byte length
        out: list[bytes] = []
        data, size, unpack, pos = self.data, self.size, self.u64.unpack_from, self.off  # a vocabulary's hot loop
        for _ in range(n):
            if pos + 8 > size:
                self.off = pos
                self.need(8, what)
            ln = unpack(data, pos)[0]
            pos += 8
            if ln > size - pos:
                self.off = pos
                self.need(ln, what)
            if keep:
                out.append(data[pos:pos + ln])
            pos += ln
        self.off = pos
        return out if keep else None

    def value(self, vtype: int, what: str, keep: bool, depth: int = 0) -> tuple[Any, int | None]:
        """(value or None, element count for arrays)."""
        if vtype in _NUMPY:
            dt = np.dtype(_NUMPY[vtype]).newbyteorder(self.bo)
            self.need(dt.itemsize, what)
            self.off += dt.itemsize
            return (np.frombuffer(self.data, dt, 1, self.off - dt.itemsize)[0].item() if keep else None), None
        if vtype == _STRING:
            s = self.string(what)
            return (s.decode("utf-8", "replace") if keep else None), None
        if vtype != _ARRAY:
            raise ValueError(f"{what}: unknown value type {vtype}")
        if depth >= MAX_NEST:
            raise ValueError(f"{what}: arrays nested deeper than {MAX_NEST}")
        itype, n = self.read(self.u32, what), self.read(self.u64, what)
        if itype in _NUMPY:
            dt = np.dtype(_NUMPY[itype]).newbyteorder(self.bo)
            self.need(n * dt.itemsize, f"{what} ({n} elements)")
            self.off += n * dt.itemsize
            return (np.frombuffer(self.data, dt, n, self.off - n * dt.itemsize).copy() if keep else None), n
        if itype == _STRING:
            return self.strings(n, what, keep), n
        if itype == _ARRAY:
            self.need(n * 12, f"{what} ({n} elements)")
            items = [self.value(_ARRAY, what, keep, depth + 1)[0] for _ in range(n)]
            return (items if keep else None), n
        raise ValueError(f"{what}: unknown array element type {itype}")

    def header(self, keep: Callable[[str], bool], tensors: bool) -> GGUFHeader:
        n_tensors = self.read(self.u64, "tensor count")
        n_kv = self.read(self.u64, "metadata count")
        self.need(n_kv * 13, f"{n_kv} metadata entries")  # key length, value type, >= 1 byte of value
        h = GGUFHeader(metadata={})
        for i in range(n_kv):
            key = self.string(f"metadata key {i}").decode("utf-8", "replace")
            name = repr(key if len(key) <= 60 else key[:60] + "...")  # a corrupted length makes a long key
            kept = keep(key) or key == "general.alignment"
            v, count = self.value(self.read(self.u32, f"metadata {name} type"), f"metadata {name}", kept)
            if kept:
                h.metadata[key] = v
            if count is not None:
                h.counts[key] = count
        align = h.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment = {align!r} is not a power of two")
        h.alignment = align
        if not keep("general.alignment"):
            h.metadata.pop("general.alignment", None)
        if not tensors:
            return h
        self._tensors(h, n_tensors)
        return h

    def _tensors(self, h: GGUFHeader, n_tensors: int) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.need(n_tensors * 24, f"{n_tensors} tensor infos")  # name length, n_dims, type, offset
        raw = []
        for i in range(n_tensors):
            name = self.string(f"tensor {i} name").decode("utf-8", "replace")
            n_dims = self.read(self.u32, f"tensor {i} dimension count")
            if n_dims > MAX_DIMS:
                raise ValueError(f"tensor {i} has {n_dims} dimensions (at most {MAX_DIMS})")
            dims = tuple(self.read(self.u64, f"tensor {i} shape") for _ in range(n_dims))
            qtype = self.read(self.u32, f"tensor {i} type")
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            except (ValueError, KeyError):
                raise ValueError(f"tensor {i} has unknown ggml type {qtype}") from None
            if dims and dims[0] % block:
                raise ValueError(f"tensor {i} rows of {dims[0]} are not whole blocks of {block}")
            raw.append((name, dims, qtype, self.read(self.u64, f"tensor {i} offset"),
                        math.prod(dims) * block_bytes // block))
        h.data_offset = -(-self.off // h.alignment) * h.alignment
        for name, dims, qtype, t_off, nbytes in raw:  # offsets count from the data section, after the header
            if h.data_offset + t_off + nbytes > self.size:
                raise ValueError(f"tensor {name[:60]!r} ({nbytes} bytes at data offset {t_off}) ends past the end "
                                 "of the file")
            h.tensors.append(TensorEntry(name, dims, qtype, h.data_offset + t_off, nbytes))
