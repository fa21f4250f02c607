"""Parameter sweeps: a grid (or list) of cells over models x clusters x systems x knobs, evaluated on a
local process pool or a Dask cluster, journaled so an interrupted sweep resumes where it stopped.

Spec file (TOML):

    name = "bandwidth-vs-k"
    evaluate = "simulate"            # simulate | plan
    [grid]                           # lists are axes (cartesian product), scalars are fixed
    model = ["llama3-70b"]
    cluster = ["prima-d1-d4"]
    system = ["prima", "prima-no-halda"]
    quant = "q4k"
    k = [1, 2, 4, 5]                 # knobs: k, prefetch, planner, bandwidth_mbps, latency_ms, ram_scale,
    bandwidth_mbps = [100, 450]      #        disk_scale, S, batch, tokens, prompt_tokens, seed, n_ctx
    [[cells]]                        # optional extra cells, each a full table
    model = "llama3-8b"
    cluster = "prima-d1-d4"
    system = "llama.cpp"

Each cell has a stable id (hash of its parameters). Results go to `<out>/journal.jsonl`, one
fsync'd line per finished cell; a truncated last line (a kill mid-write) is dropped on resume.
`<out>/results.csv` and `results.parquet` are rewritten atomically (temp file + rename) from the
journal, so no file is ever left half-written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from primasim.core import io as _io
from primasim.core.errors import SpecError

KNOBS = {
    "model": "model name or path", "cluster": "cluster name or path", "system": "system to evaluate",
    "quant": "weight quantisation", "k": "laps per token (ring systems)", "prefetch": "prefetch on/off",
    "bandwidth_mbps": "override the network bandwidth", "latency_ms": "override the per-hop latency",
    "ram_scale": "multiply every device's available RAM", "disk_scale": "multiply every disk's throughput",
    "S": "sequences in flight (mdi-llm)", "batch": "requests (bud)", "tokens": "tokens to generate",
    "prompt_tokens": "prompt length", "seed": "random seed", "n_ctx": "context length for KV sizing",
    "planner": "Halda's planner for the prima systems (global|loop|sim)",
    "solver": "Halda subproblem solver (relax|exact)", "general": "Halda general form",
    "comm": "Halda communication term", "variant": "cost model variant (code|paper)",
}
REQUIRED = ("model", "cluster", "system")


@dataclass(frozen=True)
class SweepSpec:
    name: str
    evaluate: str
    cells: tuple[dict[str, Any], ...]
    path: str = ""
    options: dict[str, Any] = field(default_factory=dict)


def cell_id(cell: dict[str, Any]) -> str:
    blob = json.dumps(cell, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def expand(grid: dict[str, Any]) -> list[dict[str, Any]]:
    axes = {k: v for k, v in grid.items() if isinstance(v, list)}
    fixed = {k: v for k, v in grid.items() if not isinstance(v, list)}
    if not axes:
        return [dict(fixed)]
    keys = list(axes)
    return [dict(fixed, **dict(zip(keys, combo))) for combo in itertools.product(*(axes[k] for k in keys))]


def load_spec(path: str | Path) -> SweepSpec:
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise SpecError("file not found", where=str(p), fix="give the path of a sweep TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"not valid TOML ({exc})", where=str(p), fix="fix the TOML syntax") from None
    return spec_from_dict(raw, where=str(p))


def spec_from_dict(raw: dict[str, Any], where: str = "sweep") -> SweepSpec:
    known = {"name", "evaluate", "grid", "cells", "options"}
    extra = set(raw) - known
    if extra:
        raise SpecError(f"unknown field(s) {sorted(extra)}", where=where, fix=f"use {sorted(known)}")
    evaluate = raw.get("evaluate", "simulate")
    if evaluate not in EVALUATORS:
        raise SpecError(f"unknown evaluate = {evaluate!r}", where=where, fix=f"use one of {sorted(EVALUATORS)}")
    cells: list[dict[str, Any]] = []
    if "grid" in raw:
        if not isinstance(raw["grid"], dict):
            raise SpecError("[grid] must be a table", where=where, fix="write [grid] with one key per axis")
        cells += expand(raw["grid"])
    for i, c in enumerate(raw.get("cells", [])):
        if not isinstance(c, dict):
            raise SpecError(f"cells[{i}] must be a table", where=where, fix="use [[cells]] tables")
        cells.append(dict(c))
    if not cells:
        raise SpecError("the sweep has no cells", where=where, fix="add a [grid] table or [[cells]]")
    for i, c in enumerate(cells):
        unknown = set(c) - set(KNOBS)
        if unknown:
            raise SpecError(f"cell {i}: unknown knob(s) {sorted(unknown)}", where=where,
                            fix=f"knobs are {sorted(KNOBS)}")
        missing = [r for r in REQUIRED if r not in c]
        if missing:
            raise SpecError(f"cell {i}: missing {missing}", where=where, fix="set model, cluster and system")
    seen, unique = set(), []
    for c in cells:  # a grid and explicit cells may overlap
        cid = cell_id(c)
        if cid not in seen:
            seen.add(cid)
            unique.append(c)
    return SweepSpec(name=str(raw.get("name", Path(where).stem)), evaluate=evaluate, cells=tuple(unique),
                     path=where, options=dict(raw.get("options", {})))


# ------------------------------------------------------------------------- evaluating one cell
def apply_knobs(cluster: Any, cell: dict[str, Any]) -> Any:
    """The cluster with the cell's network/memory/disk knobs applied."""
    from dataclasses import replace

    from primasim.core.units import MBPS, MS

    net = cluster.network
    if "bandwidth_mbps" in cell:
        net = replace(net, bandwidth=float(cell["bandwidth_mbps"]) * MBPS, links=())
    if "latency_ms" in cell:
        net = replace(net, latency=float(cell["latency_ms"]) * MS, links=())
    devs = []
    for d in cluster.devices:
        if "ram_scale" in cell:
            d = replace(d, ram_avail=min(d.ram_total, d.ram_avail * float(cell["ram_scale"])))
        if "disk_scale" in cell:
            s = float(cell["disk_scale"])
            d = replace(d, disk_seq=d.disk_seq * s, disk_rnd=d.disk_rnd * s)
        devs.append(d)
    return replace(cluster, devices=tuple(devs), network=net)


def _plan_options(cell: dict[str, Any]) -> dict[str, Any]:
    return {k: cell[k] for k in ("k", "prefetch", "S", "batch", "planner", "solver", "general", "comm", "variant")
            if k in cell}


def evaluate_plan(cell: dict[str, Any]) -> dict[str, Any]:
    from primasim.core.cluster import load_cluster
    from primasim.core.model import load_model
    from primasim.plan.planners import make_plan

    model = load_model(cell["model"], cell.get("quant"))
    cluster = apply_knobs(load_cluster(cell["cluster"]), cell)
    out = make_plan(cell["system"], model, cluster, n_ctx=int(cell.get("n_ctx", 1024)),
                    prompt_tokens=int(cell.get("prompt_tokens", 16)), **_plan_options(cell))
    row: dict[str, Any] = {"feasible": out.feasible, "reason": out.reason,
                           "tpot_ms": None if out.predicted_tpot is None else out.predicted_tpot * 1e3,
                           "ttft_ms": None if out.predicted_ttft is None else out.predicted_ttft * 1e3}
    if out.plan is not None:
        row["plan_k"] = out.plan.k
        row["plan"] = out.plan.describe()
    row["max_memory_pressure"] = max(out.memory_pressure.values(), default=None)
    return row


def evaluate_simulate(cell: dict[str, Any]) -> dict[str, Any]:
    from primasim.core.cluster import load_cluster
    from primasim.core.model import load_model
    from primasim.sim import SimConfig, simulate

    model = load_model(cell["model"], cell.get("quant"))
    cluster = apply_knobs(load_cluster(cell["cluster"]), cell)
    opts = _plan_options(cell)
    cfg = SimConfig(tokens=int(cell.get("tokens", 16)), prompt_tokens=int(cell.get("prompt_tokens", 16)),
                    seed=int(cell.get("seed", 0)), prefetch=opts.pop("prefetch", None),
                    S=opts.pop("S", None), batch=opts.pop("batch", None))
    res = simulate(cell["system"], model, cluster, config=cfg, n_ctx=int(cell.get("n_ctx", 1024)), **opts)
    j = res.to_json()
    row = {k: j.get(k) for k in ("feasible", "reason", "tpot_ms", "tpot_p50_ms", "tpot_p90_ms", "ttft_ms",
                                 "throughput_tok_s")}
    mp = j.get("memory_pressure") or {}
    row["max_memory_pressure"] = max(mp.values(), default=None)
    plan = j.get("plan") or {}
    row["plan_k"] = plan.get("k")
    return row


EVALUATORS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "plan": evaluate_plan,
    "simulate": evaluate_simulate,
}


def run_cell(evaluate: str, cell: dict[str, Any]) -> dict[str, Any]:
    """Evaluate one cell; errors are recorded in the row, never raised (a sweep must not die)."""
    from primasim.core.errors import PrimasimError

    t0 = time.perf_counter()
    try:
        row = EVALUATORS[evaluate](cell)
        row["error"] = ""
    except PrimasimError as exc:
        row = {"feasible": False, "error": exc.message}
    except Exception as exc:  # a bug in one cell must not lose the others' results
        row = {"feasible": False, "error": f"{type(exc).__name__}: {exc}"}
    row["eval_s"] = time.perf_counter() - t0
    return {"cell_id": cell_id(cell), **cell, **row}


# ------------------------------------------------------------------------- journal
class Journal(_io.Journal):
    """Append-only JSON-lines record of finished cells (`<out>/journal.jsonl`, keyed by cell id);
    the source of truth for resuming. A thin layer over primasim.core.io.Journal."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        super().__init__(self.out / "journal.jsonl", "cell_id", default=str)

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        return self.records

    def frame(self, order: Iterable[str] | None = None) -> Any:
        import pandas as pd

        rows = list(self.rows.values())
        if order is not None:
            pos = {c: i for i, c in enumerate(order)}
            rows.sort(key=lambda r: pos.get(r["cell_id"], len(pos)))
        return pd.DataFrame(rows)

    def write_tables(self, order: Iterable[str] | None = None) -> Any:
        df = self.frame(order)
        _io.atomic_csv(self.out / "results.csv", df)
        _io.atomic_write_with(self.out / "results.parquet", lambda p: _to_parquet(df, p))
        return df


def _to_parquet(df: Any, path: Path) -> None:
    clean = df.copy()
    for col in clean.columns:  # mixed-type object columns (e.g. k as int or absent) -> strings
        if clean[col].dtype == object:
            clean[col] = clean[col].map(lambda v: None if v is None else str(v))
    clean.to_parquet(path, index=False)


# ------------------------------------------------------------------------- executors
def _local_map(evaluate: str, cells: list[dict[str, Any]], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        for c in cells:
            yield run_cell(evaluate, c)
        return
    import multiprocessing as mp

    # spawn: the parent may hold JAX/zmq state that must not be forked
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        pending: set[Future[dict[str, Any]]] = set()
        it = iter(cells)
        for c in itertools.islice(it, workers * 2):
            pending.add(pool.submit(run_cell, evaluate, c))
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                yield f.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.add(pool.submit(run_cell, evaluate, nxt))


def _dask_map(evaluate: str, cells: list[dict[str, Any]], address: str) -> Iterator[dict[str, Any]]:
    from distributed import Client, as_completed

    try:
        client = Client(address, timeout="10s")
    except OSError as exc:
        raise SpecError(f"cannot reach the Dask scheduler at {address} ({exc})", where="--executor",
                        fix="start one with `dask scheduler` + `dask worker`, or use --executor local") from None
    try:
        futures = client.map(run_cell, [evaluate] * len(cells), cells, pure=False)
        for fut in as_completed(futures):
            yield fut.result()
    finally:
        client.close()


def run_sweep(spec: SweepSpec, out: str | Path, *, executor: str = "local", workers: int | None = None,
              progress: bool = True, limit: int | None = None) -> Any:
    """Run the cells not yet in `out`'s journal; return the full results DataFrame."""
    journal = Journal(Path(out))
    order = [cell_id(c) for c in spec.cells]
    todo = [c for c in spec.cells if cell_id(c) not in journal.rows]
    if limit is not None:
        todo = todo[:limit]
    _io.atomic_write_json(Path(out) / "spec.json", {"name": spec.name, "evaluate": spec.evaluate,
                                                    "source": spec.path, "n_cells": len(spec.cells)}, newline=False)
    if executor == "local":
        stream = _local_map(spec.evaluate, todo, workers or os.cpu_count() or 1)
    elif executor.startswith("dask://") or executor.startswith("tcp://"):
        stream = _dask_map(spec.evaluate, todo, "tcp://" + executor.split("://", 1)[1])
    else:
        raise SpecError(f"unknown executor {executor!r}", where="--executor", fix="use local or dask://HOST:PORT")
    try:
        if progress and todo:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn()) as bar:
                task = bar.add_task(f"{spec.name} ({len(journal.rows)} done before)", total=len(todo))
                for i, row in enumerate(stream):
                    journal.add(row)
                    bar.advance(task)
                    if i % 50 == 49:
                        journal.write_tables(order)
        else:
            for i, row in enumerate(stream):
                journal.add(row)
                if i % 50 == 49:
                    journal.write_tables(order)
    finally:
        df = journal.write_tables(order)
        journal.close()
    return df


# ------------------------------------------------------------------------- plotting
def plot_sweep(df: Any, x: str, y: str = "tpot_ms", hue: str = "system", out: str | Path | None = None,
               *, facet: str | None = None, logy: bool = False) -> Any:
    """Common view: `y` against knob `x`, one line per `hue`, optionally one panel per `facet`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = df[df["feasible"] == True] if "feasible" in df else df  # noqa: E712
    panels = sorted(data[facet].dropna().unique()) if facet else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        sub = data if panel is None else data[data[facet] == panel]
        for key, g in sub.groupby(hue):
            g = g.groupby(x, as_index=False)[y].mean().sort_values(x)
            ax.plot(g[x], g[y], marker="o", label=str(key))
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if logy:
            ax.set_yscale("log")
        if panel is not None:
            ax.set_title(f"{facet} = {panel}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    if out is not None:
        _io.atomic_savefig(fig, out, dpi=120)
    return fig
