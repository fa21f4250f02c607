"""Running a sweep: batches in flight with backpressure, one Parquet part and one journal line per
batch, progress with cells/s and ETA, a clean stop on Ctrl-C, and resume.

The client holds at most `in_flight` batches (default twice the workers' slots): a new batch is
submitted only when one finishes, so memory does not grow with the number of cells. Cells of a
batch are built on the worker from index ranges. Batch size adapts to the measured cell time
(about `target_batch_s` of work per task, so the per-task costs are amortised).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import tomli_w

from primasim.core import io as _io
from primasim.core.errors import SpecError

from .evaluate import BatchResult, Context, build_context
from .executors import WorkerLost, make_executor
from .spec import SweepSpec, cell_id, load_spec
from .store import Store, load_results, todo_ranges, write_csv

MAX_ATTEMPTS = 3  # a batch whose worker died this often is split into single cells


@dataclass
class SweepRun:
    """What one `run_sweep` call did (a resumed sweep has one per run in `<out>/runs.jsonl`)."""

    out: Path
    cells: int  # cells in the spec
    done_before: int  # already in the folder when this run started
    evaluated: int = 0  # cells this run evaluated
    batches: int = 0
    wall_s: float = 0.0  # this run, start to end (set-up, cells, CSV)
    dispatch_s: float = 0.0  # first submit to last batch stored
    eval_s: float = 0.0  # the cells' own wall time on the workers
    cpu_s: float = 0.0  # the cells' own CPU time
    task_s: float = 0.0  # whole tasks on the workers (cells + building tables)
    task_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    workers: int = 1
    executor: str = "local"
    interrupted: bool = False
    worker_deaths: int = 0  # batches lost with a dead worker (and run again)
    executor_restarts: int = 0  # local pools replaced after a worker died
    feasible: int = 0
    errors: int = 0
    removed_orphans: int = 0
    foreign_rows: int = 0  # rows of cells no longer in the spec (it changed since they ran)
    batch_size: list[int] = field(default_factory=list)

    @property
    def overhead(self) -> float:
        """wall x workers over the cells' own time, minus 1 (0.05 = 5 % spent outside the cells)."""
        return self.wall_s * self.workers / self.eval_s - 1 if self.eval_s > 0 else math.nan

    def results(self, columns: list[str] | None = None) -> Any:
        return load_results(self.out, columns=columns)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d["overhead"] = None if math.isnan(self.overhead) else self.overhead
        return d


def _batches(ranges: list[list[int]], size: Callable[[], int]) -> Iterator[list[tuple[int, int]]]:
    """Cut the to-do index ranges into batches; `size()` is asked before each batch (it adapts)."""
    cur: list[tuple[int, int]] = []
    need = size()
    for a, b in ranges:
        while a < b:
            take = min(b - a, need)
            cur.append((a, a + take))
            a += take
            need -= take
            if need == 0:
                yield cur
                cur = []
                need = size()
    if cur:
        yield cur


class _SizePolicy:
    """Cells per batch: small at first (quick feedback), then about target_s of work per task, but
    never so many that the last batches leave workers idle."""

    def __init__(self, n_todo: int, workers: int, fixed: int | None, target_s: float) -> None:
        self.left = n_todo
        self.workers = workers
        self.fixed = fixed
        self.target_s = target_s
        self.cell_s: float | None = None

    def observe(self, n: int, eval_s: float) -> None:
        if n:
            s = eval_s / n
            self.cell_s = s if self.cell_s is None else 0.8 * self.cell_s + 0.2 * s

    def __call__(self) -> int:
        if self.fixed:
            size = self.fixed
        else:
            want = 4 if self.cell_s is None else max(1, round(self.target_s / max(self.cell_s, 1e-6)))
            size = max(1, min(want, 2000, math.ceil(self.left / (4 * self.workers))))
        size = min(size, max(self.left, 1))
        self.left -= size
        return size


class _Progress:
    """rich progress bar (cells, cells/s, ETA) on a terminal; a plain line every `every` s otherwise."""

    def __init__(self, name: str, total: int, before: int, enabled: bool, every: float) -> None:
        self.total, self.done, self.enabled, self.every = total, 0, enabled, every
        self.t0 = self.last = time.monotonic()
        self.name = name
        self.bar: Any = None
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                ProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class Rate(ProgressColumn):
                def render(self, task: Any) -> Text:
                    return Text(f"{task.speed or 0:,.1f} cells/s", style="progress.data.speed")

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                                speed_estimate_period=60)
            self.bar.start()
            self.task = self.bar.add_task(f"{name}" + (f" ({before:,} done before)" if before else ""), total=total)
        else:
            self.console = console

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.advance(self.task, n)
        elif self.enabled and time.monotonic() - self.last >= self.every:
            self.line()

    def line(self, note: str = "") -> None:
        self.last = time.monotonic()
        el = self.last - self.t0
        rate = self.done / el if el > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        print(f"{self.name}: {self.done:,}/{self.total:,} cells, {rate:,.1f} cells/s, elapsed {_hms(el)}, "
              f"ETA {_hms(eta)}{note}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        elif self.enabled:
            print(text, file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.enabled and self.done:
            self.line()


def _hms(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _save_spec(store: Store, spec: SweepSpec, ctx: Context) -> None:
    out = store.out
    if spec.source:
        _io.atomic_write_text(out / "spec.toml", spec.source)
    old = _previous_digests(out)
    _io.atomic_write_json(out / "spec.json", {**spec.summary(), "fingerprint": store.fp, "source": spec.path,
                                              "inputs": {**old, **ctx.digests()}})


def _previous_digests(out: Path) -> dict[str, str]:
    try:
        return dict(json.loads((out / "spec.json").read_text()).get("inputs", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def _check_context(store: Store, ctx: Context, done_before: int) -> None:
    """Results already in the folder were computed with these models and clusters: refuse to mix
    them with cells of a model or cluster that has changed since (an edited file, a new family rule)."""
    if not done_before:
        return
    old = _previous_digests(store.out)
    changed = [k for k, v in ctx.digests().items() if k in old and old[k] != v]
    if changed:
        raise SpecError(f"{changed[0]} changed since the results in this folder were computed"
                        + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""), where=str(store.out),
                        fix="use a new --out (or delete this folder) to evaluate every cell again")


def _save_clusters(out: Path, ctx: Any) -> None:
    for name, cl in ctx.clusters.items():
        fam = name.partition("/")[0]
        if fam in ctx.spec.families:
            path = out / "clusters" / f"{name.replace('/', '-')}.toml"
            if not path.exists():
                _io.atomic_write_text(path, tomli_w.dumps(cl.to_toml()))


class _Interrupt:
    """Ctrl-C (SIGINT) or SIGTERM while the sweep runs: the first sets `requested`, which the driver
    reads between batches (so nothing is cut mid-write, and in-process evaluation is not torn
    apart mid-cell); the second raises KeyboardInterrupt, which abandons the batches in flight.
    Handlers can be installed only in the main thread; elsewhere KeyboardInterrupt works as before."""

    def __init__(self) -> None:
        self.requested = False
        self.old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _Interrupt:
        if _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self.old.items():
            signal.signal(sig, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_sweep(spec: SweepSpec | str | Path, out: str | Path | None = None, *, executor: str = "local", workers: int | None = None,
              batch_size: int | None = None, in_flight: int | None = None, progress: bool = True,
              limit: int | None = None, csv: bool = True, log_every: float = 30.0,
              target_batch_s: float = 5.0, on_batch: Any = None) -> SweepRun:
    """Evaluate the cells of `spec` not yet in `out`; return what this run did.

    `spec` is a SweepSpec or the path of a spec file; `out` defaults to runs/sweep-<name>.
    Resumable: re-running with the same spec and folder evaluates only the missing cells. Ctrl-C
    (or SIGTERM) stops submitting, lets the batches in flight finish and records them; a second
    Ctrl-C abandons them. `on_batch(run, result)` is called after each stored batch (benchmarks).
    """
    t_start, c_start = time.perf_counter(), time.process_time()
    if not isinstance(spec, SweepSpec):
        spec = load_spec(spec)
    out = default_out(spec) if out is None else Path(out)
    store = Store(out, spec)
    run = SweepRun(out=Path(out), cells=len(spec), done_before=0, executor=executor)
    ex = None
    prog: _Progress | None = None
    finished = False
    try:
        with _Interrupt() as intr:  # from here: a Ctrl-C during set-up (parsing, the pool's start) stops too
            done, run.foreign_rows = store.done_mask()
            run.removed_orphans = store.removed_orphans
            run.done_before = int(done.sum())
            todo = todo_ranges(done)
            if limit is not None:
                todo = _cut(todo, limit)
            n_todo = sum(b - a for a, b in todo)
            ctx = build_context(spec)
            _check_context(store, ctx, run.done_before)
            _save_spec(store, spec, ctx)
            if n_todo and not intr.requested:
                _save_clusters(store.out, ctx)
                ex = make_executor(executor, workers)
                ex.start(ctx)
                run.workers = ex.workers
                run.executor = f"{executor} ({ex.name}, {ex.workers} worker{'s' * (ex.workers > 1)})"
            if n_todo and not intr.requested:
                prog = _Progress(spec.name, n_todo, run.done_before, progress, log_every)
                _drive(run, store, ctx, ex, todo, n_todo, prog, batch_size, in_flight, target_batch_s, on_batch, intr)
            run.interrupted = run.interrupted or intr.requested
        finished = not run.interrupted
    except KeyboardInterrupt:  # before or after the batches (set-up, CSV): nothing half-written either
        run.interrupted = True
        raise
    finally:
        if prog is not None:
            prog.stop()
        if ex is not None:
            run.executor_restarts = getattr(ex, "restarts", 0)
            ex.close(abandon=run.interrupted)
        try:
            if csv and finished and (run.evaluated or not (store.out / "results.csv").exists()):
                write_csv(store.out)
        finally:
            run.wall_s = time.perf_counter() - t_start
            run.client_cpu_s = time.process_time() - c_start
            rec = run.to_json()
            rec.pop("out")
            store.add_run({**rec, "t": round(time.time(), 3)})
            store.close()
    return run


def _cut(ranges: list[list[int]], limit: int) -> list[list[int]]:
    out, left = [], limit
    for a, b in ranges:
        if left <= 0:
            break
        out.append([a, min(b, a + left)])
        left -= out[-1][1] - a
    return out


def _drive(run: SweepRun, store: Store, ctx: Context, ex: Any, todo: list[list[int]], n_todo: int, prog: _Progress,
           batch_size: int | None, in_flight: int | None, target_s: float, on_batch: Any,
           intr: _Interrupt | None = None) -> None:
    policy = _SizePolicy(n_todo, ex.workers, batch_size, target_s)
    source = _batches(todo, policy)
    retry: deque[tuple[list[tuple[int, int]], int]] = deque()
    pending: dict[Any, tuple[int, list[tuple[int, int]], int]] = {}
    next_no = 0
    stopping = False
    t0 = time.perf_counter()

    def submit(ranges: list[tuple[int, int]], attempts: int) -> None:
        nonlocal next_no
        pending[ex.submit(next_no, ranges)] = (next_no, ranges, attempts)
        next_no += 1

    def stop() -> None:  # the first Ctrl-C: no new batches, the ones not started are dropped
        nonlocal stopping
        stopping = True
        run.interrupted = True
        for h in ex.cancel_queued(set(pending)):
            pending.pop(h, None)
        if pending:
            prog.note(f"stopping: waiting for {len(pending)} batch(es) in flight (Ctrl-C again to abandon them)")

    while True:
        try:
            if intr is not None and intr.requested and not stopping:
                stop()
            limit = in_flight or max(2, 2 * ex.workers)
            while not stopping and len(pending) < limit:
                if retry:
                    submit(*retry.popleft())
                    continue
                nxt = next(source, None)
                if nxt is None:
                    break
                submit(nxt, 0)
            if not pending:
                break
            for h in ex.wait(set(pending), timeout=0.5):
                no, ranges, attempts = pending.pop(h)
                try:
                    res = ex.result(h)
                except WorkerLost:
                    run.worker_deaths += 1
                    if attempts + 1 < MAX_ATTEMPTS:
                        retry.append((ranges, attempts + 1))
                    else:  # this batch keeps killing workers: one cell at a time finds the culprit
                        cells = [(i, i + 1) for a, b in ranges for i in range(a, b)]
                        if len(cells) == 1:
                            _record_crash(run, store, ctx, no, ranges)
                        else:
                            retry.extend(([c], MAX_ATTEMPTS - 1) for c in cells)
                    prog.note(f"a worker died; its batch of {sum(b - a for a, b in ranges)} cells is re-run")
                    continue
                _store(run, store, no, ranges, res)
                policy.observe(res.n, res.eval_s)
                prog.advance(res.n)
                if on_batch is not None:
                    on_batch(run, res)
        except KeyboardInterrupt:
            if stopping:  # the second Ctrl-C: abandon what is in flight
                run.interrupted = True
                prog.note("abandoned the batches in flight")
                break
            stop()  # a KeyboardInterrupt without our handler (not the main thread): the first Ctrl-C
    run.dispatch_s = time.perf_counter() - t0


def _store(run: SweepRun, store: Store, no: int, ranges: list[tuple[int, int]], res: Any) -> None:
    t = res.table
    feas = t.column("feasible").to_pylist()
    errs = t.column("error").to_pylist()
    nf, ne = sum(1 for v in feas if v), sum(1 for e in errs if e)
    store.add_batch(no, ranges, t, {"eval_s": round(res.eval_s, 6), "cpu_s": round(res.cpu_s, 6),
                                    "task_s": round(res.task_s, 6), "worker": res.worker, "feasible": nf,
                                    "errors": ne})
    run.evaluated += res.n
    run.batches += 1
    run.eval_s += res.eval_s
    run.cpu_s += res.cpu_s
    run.task_s += res.task_s
    run.task_cpu_s += res.task_cpu_s
    run.feasible += nf
    run.errors += ne
    if len(run.batch_size) < 64:  # the first batches show the size policy at work; bounded
        run.batch_size.append(res.n)


def _record_crash(run: SweepRun, store: Store, ctx: Context, no: int, ranges: list[tuple[int, int]]) -> None:
    """A single cell that killed its worker MAX_ATTEMPTS times is recorded as an error, not retried forever."""
    (i, _), = ranges
    cell = ctx.spec.cell(i)
    row = {**cell, "index": i, "cell_id": cell_id(cell), "feasible": False,
           "error": f"the worker process died {MAX_ATTEMPTS} times evaluating this cell"}
    table = pa.Table.from_pylist([{f.name: row.get(f.name) for f in ctx.schema}], schema=ctx.schema)
    _store(run, store, no, ranges, BatchResult(no, table, 1, 0.0, 0.0, 0.0, ""))


def default_out(spec: SweepSpec) -> Path:
    return Path(os.environ.get("PRIMASIM_RUNS", "runs")) / f"sweep-{spec.name}"
