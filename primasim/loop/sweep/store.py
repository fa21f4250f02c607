"""A sweep's folder: a Parquet dataset written one file per batch, and a journal line per batch.

    <out>/results/part-<run>-<batch>.parquet   one file per finished batch (the dataset)
    <out>/journal.jsonl                        one fsync'd line per batch: its part, its index ranges,
                                               the spec fingerprint, counts and timings
    <out>/runs.jsonl                           one line per run (resumes included): wall time, cells,
                                               the cells' own time, overhead
    <out>/spec.toml, spec.json                 the spec as written, and its summary
    <out>/clusters/*.toml                      every generated cluster, loadable by --cluster
    <out>/results.csv                          all rows as CSV, written at the end (streamed)

A part is written atomically (temp file + rename) before its journal line, so the journal never
names a missing or torn part. A part without a journal line (a kill between the two) is an
orphan: the next run deletes it and evaluates its cells again. Readers open `results/` lazily
with pyarrow.dataset or pandas.read_parquet; files starting with "." (temp files) are ignored.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from primasim.core import io as _io
from primasim.core.errors import SpecError

from .spec import SweepSpec, cell_id

RESULTS = "results"


class Store:
    """The results folder of one sweep, opened for writing (the journal is locked: one writer)."""

    def __init__(self, out: str | Path, spec: SweepSpec) -> None:
        self.out = Path(out)
        self.spec = spec
        self.fp = spec.fingerprint()
        if self.out.exists() and not self.out.is_dir():
            raise SpecError("is a file", where=str(self.out), fix="give --out a folder")
        try:
            (self.out / RESULTS).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpecError(f"cannot create the results folder ({exc.strerror})", where=str(self.out),
                            fix="give --out a folder you can write") from None
        self.journal = _io.Journal(self.out / "journal.jsonl", "batch")
        self.runs = _io.Journal(self.out / "runs.jsonl", "run")
        self.run_no = len(self.runs.records)  # a killed run left its start line: numbers are never reused
        self.runs.add({"run": self.run_no, "started": round(time.time(), 3)})
        self.removed_orphans = self._remove_orphans()

    # -- what is done
    def done_mask(self) -> tuple[np.ndarray, int]:
        """A bool per cell of the spec: already in the dataset. Also how many rows are from other specs."""
        n = len(self.spec)
        done = np.zeros(n, dtype=bool)
        foreign = [r for r in self.journal.records.values() if r.get("fp") != self.fp and r.get("n")]
        for r in self.journal.records.values():
            if r.get("fp") == self.fp:
                for a, b in r["ranges"]:
                    done[a:b] = True
        other = 0
        if foreign:  # the spec changed since those rows: match them by cell id (one pass over the spec)
            ids = self._ids_of([r["part"] for r in foreign if r.get("part")])
            other = len(ids)
            if ids:
                want = np.sort(np.fromiter((int(x, 16) for x in ids), dtype=np.uint64, count=len(ids)))
                for i in range(n):
                    if not done[i]:
                        h = np.uint64(int(cell_id(self.spec.cell(i)), 16))
                        j = np.searchsorted(want, h)
                        if j < len(want) and want[j] == h:
                            done[i] = True
                            other -= 1
            # record what matched in the current spec's terms: the next resume takes the fast path
            ranges = _ranges(np.flatnonzero(done))
            self.journal.add({"batch": f"carry-{self.fp}", "fp": self.fp, "part": None, "n": 0, "ranges": ranges})
        return done, other

    def _ids_of(self, parts: list[str]) -> set[str]:
        ids: set[str] = set()
        for p in parts:
            path = self.out / RESULTS / p
            if path.exists():
                ids.update(pq.read_table(path, columns=["cell_id"]).column("cell_id").to_pylist())
        return ids

    def _remove_orphans(self) -> int:
        named = {r.get("part") for r in self.journal.records.values()}
        n = 0
        for f in (self.out / RESULTS).iterdir():
            if f.name.startswith(".") and f.name.endswith(".tmp") or f.suffix == ".parquet" and f.name not in named:
                with contextlib.suppress(OSError):
                    f.unlink()
                    n += 1
        return n

    # -- writing
    def part_name(self, batch: int) -> str:
        return f"part-{self.run_no:03d}-{batch:06d}.parquet"

    def add_batch(self, batch: int, ranges: list[tuple[int, int]], table: pa.Table, stats: dict[str, Any]) -> None:
        """Write the batch's part (atomically), then its journal line (fsync'd)."""
        name = self.part_name(batch)
        _io.atomic_write_with(self.out / RESULTS / name, lambda p: pq.write_table(table, p, compression="zstd"))
        self.journal.add({"batch": f"{self.run_no}-{batch}", "fp": self.fp, "part": name, "n": table.num_rows,
                          "ranges": [list(r) for r in ranges], "t": round(time.time(), 3), **stats})

    def add_run(self, record: dict[str, Any]) -> None:
        self.runs.add({"run": self.run_no, **record})

    def close(self) -> None:
        self.journal.close()
        self.runs.close()


def _ranges(idx: np.ndarray) -> list[list[int]]:
    """Sorted indices -> [[start, stop), ...] runs."""
    if len(idx) == 0:
        return []
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate([[idx[0]], idx[cuts]])
    stops = np.concatenate([idx[cuts - 1] + 1, [idx[-1] + 1]])
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


def todo_ranges(done: np.ndarray) -> list[list[int]]:
    return _ranges(np.flatnonzero(~done))


# ------------------------------------------------------------------------------ reading
def _parts(out: Path) -> list[tuple[Path, str]]:
    """The parts the journal names, with their spec fingerprint (a part being written or orphaned is
    not a result)."""
    recs = [r for r in _io.read_journal(out / "journal.jsonl") if r.get("part")]
    return [(out / RESULTS / r["part"], r.get("fp", "")) for r in recs if (out / RESULTS / r["part"]).exists()]


def open_results(out: str | Path) -> pds.Dataset:
    """The sweep's results as a lazy pyarrow dataset (filter and project before reading)."""
    out = Path(out)
    if not (out / "journal.jsonl").exists():
        raise SpecError("no sweep results here", where=str(out), fix="give the --out folder of a sweep")
    parts = _parts(out)
    if not parts:
        return pds.dataset(pa.table({"index": pa.array([], pa.int64())}))
    first: dict[str, Path] = {}
    for p, fp in parts:  # one schema per spec version (a grown spec may add knob columns)
        first.setdefault(fp, p)
    schemas = [pq.read_schema(p).remove_metadata() for p in first.values()]
    schema = pa.unify_schemas(schemas, promote_options="permissive") if len(schemas) > 1 else schemas[0]
    return pds.dataset([str(p) for p, _ in parts], schema=schema, format="parquet")


def load_results(out: str | Path, columns: list[str] | None = None, filter: Any = None) -> Any:
    """The results as a pandas DataFrame in cell order (optionally only some columns / rows)."""
    ds = open_results(out)
    df = ds.to_table(columns=columns, filter=filter).to_pandas()
    if "index" in df and (columns is None or "index" in columns):
        df = df.sort_values("index", kind="stable").reset_index(drop=True)
    return df


def iter_batches(out: str | Path, columns: list[str] | None = None) -> Iterator[Any]:
    """The results as pandas DataFrames, one per part (bounded memory for any sweep size)."""
    ds = open_results(out)
    for b in ds.to_batches(columns=columns):
        yield b.to_pandas()


def write_csv(out: str | Path, path: str | Path | None = None) -> Path:
    """All results as one CSV, streamed part by part, written atomically."""
    out = Path(out)
    target = Path(path) if path is not None else out / "results.csv"
    with _io.atomic_open(target, "w", newline="") as fh:
        first = True
        for df in iter_batches(out):
            df.to_csv(fh, index=False, header=first)
            first = False
    return target


def runs(out: str | Path) -> list[dict[str, Any]]:
    return _io.read_journal(Path(out) / "runs.jsonl")


def journal_totals(out: str | Path) -> dict[str, float]:
    """Sums over the journal's batches (cells, the cells' own time) without reading the data."""
    recs = [r for r in _io.read_journal(Path(out) / "journal.jsonl") if r.get("part")]
    return {"cells": sum(r["n"] for r in recs), "batches": len(recs),
            "eval_s": sum(r.get("eval_s", 0.0) for r in recs), "cpu_s": sum(r.get("cpu_s", 0.0) for r in recs)}
