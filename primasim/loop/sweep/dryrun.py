"""`primasim sweep SPEC --dry-run`: count the cells, check every model and cluster, and estimate the
run time from a short timed sample of cells evaluated here (nothing is written)."""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from primasim.core import io as _io

from .evaluate import build_context, run_cell
from .spec import SweepSpec
from .store import todo_ranges


def done_in(out: Path, spec: SweepSpec) -> tuple[np.ndarray, int]:
    """Read-only: cells of this spec already in `out` (by the journal), and rows from other specs."""
    done = np.zeros(len(spec), dtype=bool)
    foreign = 0
    fp = spec.fingerprint()
    for r in _io.read_journal(out / "journal.jsonl"):
        if r.get("fp") == fp:
            for a, b in r["ranges"]:
                done[a:b] = True
        else:
            foreign += int(r.get("n", 0))
    return done, foreign


def dry_run(spec: SweepSpec, out: str | Path | None, *, workers: int, budget_s: float = 10.0, max_cells: int = 50,
            seed: int = 0) -> dict[str, Any]:
    """Cells, cells to do, and a time estimate from up to `max_cells` random cells in `budget_s` seconds."""
    t_ctx = time.perf_counter()
    ctx = build_context(spec)  # checks every model and cluster
    t_ctx = time.perf_counter() - t_ctx
    done, foreign = (done_in(Path(out), spec) if out is not None and Path(out).exists()
                     else (np.zeros(len(spec), dtype=bool), 0))
    todo = todo_ranges(done)
    n_todo = sum(b - a for a, b in todo)
    report: dict[str, Any] = {**spec.summary(), "done": int(done.sum()), "todo": n_todo,
                              "rows_from_other_specs": foreign, "workers": workers, "context_s": t_ctx}
    if not n_todo:
        return report
    starts = np.cumsum([0] + [b - a for a, b in todo])
    rng = np.random.default_rng(seed)
    picks = rng.permutation(n_todo)[: max_cells + 1]
    run_cell(ctx, _index(todo, starts, int(picks[0])))  # warm-up: imports and first-call costs
    rows, t0 = [], time.perf_counter()
    for p in picks[1:]:
        rows.append(run_cell(ctx, _index(todo, starts, int(p))))
        if time.perf_counter() - t0 > budget_s and len(rows) >= 3:
            break
    walls = np.array([r["eval_s"] for r in rows])
    mean = float(walls.mean())
    by_system: dict[str, float] = {}
    for r in rows:
        by_system.setdefault(r.get("system", "?"), []).append(r["eval_s"])  # type: ignore[arg-type]
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in ctx.schema} for r in rows], schema=ctx.schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    per_cell_bytes = buf.tell() / max(1, len(rows))
    # the sample mean is unbiased for the whole to-do list (random cells); its spread gives the error
    sem = float(walls.std(ddof=1) / math.sqrt(len(walls))) if len(walls) > 1 else mean
    report.update(sampled_cells=len(rows), sample_s=float(walls.sum()), cell_s_mean=mean, cell_s_sem=sem,
                  cell_s_by_system={k: float(np.mean(v)) for k, v in sorted(by_system.items())},
                  cpu_s_mean=float(np.mean([r["cpu_s"] for r in rows])),
                  estimate_s=n_todo * mean / workers, estimate_s_low=n_todo * max(mean - 2 * sem, 0) / workers,
                  estimate_s_high=n_todo * (mean + 2 * sem) / workers,
                  bytes_per_cell=per_cell_bytes, estimate_bytes=per_cell_bytes * n_todo,
                  feasible_in_sample=sum(1 for r in rows if r.get("feasible")),
                  errors_in_sample=sum(1 for r in rows if r.get("error")))
    return report


def _index(todo: list[list[int]], starts: np.ndarray, k: int) -> int:
    j = int(np.searchsorted(starts, k, side="right")) - 1
    return todo[j][0] + (k - int(starts[j]))
