"""Planned streaming reads and evicts page-exactly (runtime/worker/residency.py).

Linux's page cache holds ext4 files in large folios (up to 2 MiB, built by readahead), and
POSIX_FADV_DONTNEED drops only the folios wholly inside a range: with faults that read around,
a folio straddling a layer's kept/streamed cut or its end stayed resident after the eviction and
filled the device's memory. The worker's split (MADV_RANDOM mappings, MADV_WILLNEED reads) leaves
nothing of an evicted layer's streamed part in memory and all of its kept part."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from primasim.core.runtime_facts import ResidencyPlan
from primasim.runtime.pages import resident_bytes, touch_pages
from primasim.runtime.worker.residency import Residency, split_streams

MiB = 1 << 20


def _file(tmp_path: Path, size: int) -> Path:
    f = tmp_path / "weights.bin"
    f.write_bytes(np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8).tobytes())
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)  # written pages are clean now: DONTNEED can drop them
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return f


def test_an_evicted_layer_leaves_no_page_and_the_kept_part_stays(tmp_path: Path) -> None:
    size = 40 * MiB
    f = _file(tmp_path, size)
    fd = os.open(f, os.O_RDONLY)
    m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)  # the worker's mapping of its weights
    os.close(fd)
    try:
        # four layers at unaligned offsets (a GGUF's tensors are 32-byte aligned), ~9 MB each,
        # keeping 11 % of each: cuts and layer ends fall inside any large folio readahead builds
        start, lens = 123 * 4096 + 96, [9_135_104, 9_600_000, 8_700_032, 9_135_104]
        lay: dict[int, list[tuple[str, int, int]]] = {}
        for i, n in enumerate(lens):
            lay[i] = [(str(f), start, n)]
            start += n
        res = Residency(ResidencyPlan("planned", "streams", 0.0))
        split_streams(res, lay, {i: 0.11 * n for i, n in enumerate(lens)}, [])
        kept = sum(r[2] for r in res.kept)
        for _ in range(2):  # two passes: the second one starts from what the first left behind
            for i in lay:
                res.read_layer(i)
                assert touch_pages(res.layer_stream[i]) > 0  # the compute reads the layer
                res.evict_layer(i)
                # at most the two pages a range shares with its neighbours (the layer's kept head,
                # the next layer's): the old fault-driven reads left whole folios (measured 4 MiB)
                left = [resident_bytes(res.layer_stream[j]) for j in lay]
                assert max(left) <= 2 * 4096, left
                # the kept parts are all resident (to the page: the first and last may be partial)
                assert resident_bytes(res.kept) >= kept - 2 * len(lay) * 4096
    finally:
        m.close()


def test_an_emulated_device_in_lru_mode_maps_a_copy_of_its_own(tmp_path: Path) -> None:
    """Emulated devices share the host's page cache: one file would let one device's readahead
    serve (and be charged for) its neighbours' layers. `device_copy` gives each its own inode, same
    names and bytes (the head's fingerprint check passes), made once and reused."""
    from primasim.runtime.head import device_copy

    src = _file(tmp_path, 3 * MiB)
    a, b = device_copy(src, "laptop"), device_copy(src, "phone")
    assert a.name == b.name == src.name
    assert a.read_bytes() == b.read_bytes() == src.read_bytes()
    assert len({os.stat(p).st_ino for p in (src, a, b)}) == 3
    mtime = a.stat().st_mtime_ns
    assert device_copy(src, "laptop") == a and a.stat().st_mtime_ns == mtime  # reused
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x" * 4096)
    c = device_copy(d, "tablet")
    assert c.name == "ckpt" and sorted(p.name for p in c.iterdir()) == ["config.json", "model.safetensors"]


def test_the_output_row_blocks_cover_exactly_its_streamed_part() -> None:
    """A head computing its output in row blocks (plan.output_blocks > 1) reads before each block's
    call exactly the streamed bytes of its rows: together the blocks' ranges are the streamed part
    and never a kept byte; the rows are split in equal blocks covering the vocabulary."""
    from types import SimpleNamespace

    from primasim.runtime.worker.residency import output_blocks

    rows, row_bytes, off = 1000, 210 * 4, 8192
    stage = SimpleNamespace(output_matrix=lambda: (("w", off, rows * row_bytes), rows, row_bytes))
    keep = 300 * row_bytes + 100  # the kept/streamed cut falls inside a row
    streamed = [("w", off + keep, rows * row_bytes - keep)]
    blocks = output_blocks(stage, streamed, 3)  # type: ignore[arg-type]
    assert [(a, b) for a, b, _ in blocks] == [(0, 334), (334, 668), (668, 1000)]
    got = [r for _, _, rs in blocks for r in rs]
    assert sum(n for _, _, n in got) == rows * row_bytes - keep
    assert min(o for _, o, _ in got) == off + keep and max(o + n for _, o, n in got) == off + rows * row_bytes


def test_the_page_trace_counts_a_mapped_files_resident_pages_per_mib_and_is_off_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PRIMASIM_PAGE_TRACE: one JSON line per sample with the file's pages in memory per MiB of it
    (mincore over every mapping); unset, sampling writes nothing."""
    import json

    from primasim.runtime.worker.pagetrace import ENV, PageTrace

    path = _file(tmp_path, 3 << 20)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        m[(1 << 20) + 5]  # one page of the second MiB
        monkeypatch.delenv(ENV, raising=False)
        PageTrace.from_env(str(path), "d").sample("before", (0, 1))
        assert not list(tmp_path.glob("*.jsonl"))
        monkeypatch.setenv(ENV, str(tmp_path / "trace"))
        PageTrace.from_env(str(path), "d").sample("before", (0, 1), pos=3)
    (line,) = (tmp_path / "trace" / "d.jsonl").read_text().splitlines()
    rec = json.loads(line)
    assert rec["tag"] == "before" and rec["window"] == [0, 1] and rec["pos"] == 3
    bins = rec["resident_pages_per_mib"]
    assert len(bins) == 3 and bins[1] >= 1 and bins[1] <= 256
