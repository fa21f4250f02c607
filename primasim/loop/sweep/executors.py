"""Where batches run: in this process, on a local process pool, or on a Dask cluster.

Each executor takes the context once (`start`), then batches (`submit` -> a handle), and reports
finished handles (`wait`). A worker that dies surfaces as WorkerLost from `result`: the engine
submits the batch again (and splits a batch that keeps killing workers, to find the cell).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from primasim.core.errors import SpecError

from .evaluate import (
    BatchResult,
    Context,
    init_worker,
    run_batch,
    run_batch_local,
    run_batch_named,
)


class WorkerLost(Exception):
    """The process evaluating a batch died (killed, out of memory, crashed)."""


class SerialExecutor:
    """Batches run one at a time in this process when waited for (workers = 1; tests, debugging)."""

    name = "serial"

    def __init__(self) -> None:
        self.workers = 1
        self._ctx: Context | None = None
        self._queue: list[Future[BatchResult]] = []
        self._args: dict[Future[BatchResult], tuple[int, list[tuple[int, int]]]] = {}

    def start(self, ctx: Context) -> None:
        self._ctx = ctx

    def submit(self, batch: int, ranges: list[tuple[int, int]]) -> Future[BatchResult]:
        f: Future[BatchResult] = Future()
        self._queue.append(f)
        self._args[f] = (batch, ranges)
        return f

    def wait(self, handles: set[Any], timeout: float) -> set[Any]:
        done = {h for h in handles if h.done()}
        if done:
            return done
        f = next((q for q in self._queue if q in handles), None)
        if f is None:
            return set()
        self._queue.remove(f)
        assert self._ctx is not None
        f.set_result(run_batch(self._ctx, *self._args.pop(f)))
        return {f}

    def result(self, handle: Future[BatchResult]) -> BatchResult:
        return handle.result()

    def cancel_queued(self, handles: set[Any]) -> set[Any]:
        # nothing runs between calls to wait(): a handle not done is queued, or was cut short by Ctrl-C
        gone = {h for h in handles if not h.done()}
        self._queue = [q for q in self._queue if q not in gone]
        return gone

    def close(self, abandon: bool = False) -> None:
        self._queue.clear()


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread while it spawns processes (CPython's resource tracker does the
    same): a child inherits the blocked mask, so a Ctrl-C while it imports stays pending there until
    its initializer ignores SIGINT (which discards it); here, a Ctrl-C in the window is delivered to
    the client's handler as soon as the mask is lifted, not lost."""
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    except (AttributeError, ValueError, OSError):  # no pthread_sigmask (Windows)
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class LocalExecutor:
    """A process pool (spawn: the parent may hold JAX/zmq state that must not be forked); each worker
    receives the context once, through the pool's initializer. A dead worker breaks the pool: the
    pool is restarted and the lost batches come back as WorkerLost."""

    name = "local"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.restarts = 0  # pools replaced after a worker died
        self._ctx: Context | None = None
        self._pool: ProcessPoolExecutor | None = None

    def start(self, ctx: Context) -> None:
        """Start every worker now (the pool would otherwise spawn them lazily, at later submits),
        each with SIGINT blocked until it ignores it: a terminal's Ctrl-C, sent to the whole process
        group, is the client's alone, also while a worker is still importing."""
        self._ctx = ctx
        self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                         initializer=init_worker, initargs=(ctx, os.getpid()))
        with _sigint_blocked():  # a submit spawns a process in this thread (Python >= 3.9, spawn)
            started = [self._pool.submit(os.getpid) for _ in range(self.workers)]
        wait(started)  # one per process: all have imported and run the initializer

    def submit(self, batch: int, ranges: list[tuple[int, int]]) -> Future[BatchResult]:
        assert self._pool is not None
        try:
            return self._pool.submit(run_batch_local, batch, ranges)
        except BrokenProcessPool:
            self._restart()
            return self._pool.submit(run_batch_local, batch, ranges)

    def _restart(self) -> None:
        assert self._ctx is not None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.restarts += 1
        self.start(self._ctx)

    def wait(self, handles: set[Any], timeout: float) -> set[Any]:
        done, _ = wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        return set(done)

    def result(self, handle: Future[BatchResult]) -> BatchResult:
        try:
            return handle.result()
        except BrokenProcessPool as exc:
            if self._pool is not None and getattr(self._pool, "_broken", False):
                self._restart()
            raise WorkerLost(str(exc) or "a worker process died") from None

    def cancel_queued(self, handles: set[Any]) -> set[Any]:
        return {h for h in handles if h.cancel()}

    def pids(self) -> list[int]:
        procs = getattr(self._pool, "_processes", None) or {}  # private, only for measuring memory
        return [p.pid for p in procs.values() if p.pid is not None]

    def close(self, abandon: bool = False) -> None:
        if self._pool is None:
            return
        if abandon:  # a second Ctrl-C: stop the running batches too
            for p in list((getattr(self._pool, "_processes", None) or {}).values()):
                p.terminate()
        self._pool.shutdown(wait=not abandon, cancel_futures=True)
        self._pool = None


class DaskExecutor:
    """A Dask cluster the user started (`dask scheduler` + `dask worker`, on any machines). The
    context reaches every worker once through a worker plugin, which the scheduler also gives to
    workers that join later; a task carries only its index ranges and has no data dependency, so
    a dead worker loses nothing but its tasks, which the scheduler runs elsewhere. (Scattered data
    would not do: the active memory manager keeps a single replica, and a dead worker takes it
    along.) A task that killed several workers comes back as KilledWorker: WorkerLost."""

    name = "dask"

    def __init__(self, address: str) -> None:
        from distributed import Client

        self.address = address
        try:
            if address.endswith(".json"):
                if not Path(address).exists():
                    raise SpecError("scheduler file not found", where=address,
                                    fix="give the file `dask scheduler --scheduler-file FILE` writes")
                self.client = Client(scheduler_file=address, timeout="10s")
            else:
                self.client = Client(address, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise SpecError(f"cannot reach the Dask scheduler at {address} ({exc})", where="--executor",
                            fix="start one (`dask scheduler`, then `dask worker tcp://HOST:8786` on each machine), "
                            "or use --executor local") from None
        self._plugin = ""
        self._polled = time.monotonic()
        self.workers = self._threads()

    def _threads(self) -> int:
        info = self.client.scheduler_info()
        return max(1, sum(w.get("nthreads", 1) for w in info.get("workers", {}).values()))

    def start(self, ctx: Context) -> None:
        if not self.client.scheduler_info().get("workers"):
            try:
                self.client.wait_for_workers(1, timeout=60)
            except TimeoutError:
                raise SpecError(f"no Dask worker joined the scheduler at {self.address} in 60 s", where="--executor",
                                fix=f"start workers: dask worker {self.address} --nthreads 1") from None
        self._plugin = f"primasim-sweep-{ctx.token}-{uuid.uuid4().hex[:8]}"
        from .dask_plugin import ContextPlugin  # imports distributed: only when Dask is used

        self.client.register_plugin(ContextPlugin(self._plugin, ctx), name=self._plugin)
        self.workers = self._threads()

    def submit(self, batch: int, ranges: list[tuple[int, int]]) -> Any:
        return self.client.submit(run_batch_named, self._plugin, batch, ranges, pure=False,
                                  key=f"{self._plugin}-{batch}")

    def wait(self, handles: set[Any], timeout: float) -> set[Any]:
        from distributed import wait as dwait

        try:
            done, _ = dwait(list(handles), timeout=timeout, return_when="FIRST_COMPLETED")
        except TimeoutError:
            return set()
        if time.monotonic() - self._polled > 5:  # workers come and go: resize the window now and then
            self._polled = time.monotonic()
            self.workers = self._threads()
        return set(done)

    def result(self, handle: Any) -> BatchResult:
        from distributed import KilledWorker

        try:
            return handle.result()
        except KilledWorker as exc:
            raise WorkerLost(str(exc)) from None

    def cancel_queued(self, handles: set[Any]) -> set[Any]:
        return set()  # the scheduler does not say which tasks started; running ones are waited for

    def pids(self) -> list[int]:
        return [int(p) for p in self.client.run(os.getpid).values()]

    def close(self, abandon: bool = False) -> None:
        try:
            if self._plugin:  # the workers drop the context
                with contextlib.suppress(Exception):
                    self.client.unregister_worker_plugin(self._plugin)
        finally:
            self.client.close()


def make_executor(spec: str, workers: int | None) -> Any:
    if spec == "local":
        n = workers or os.cpu_count() or 1
        return SerialExecutor() if n <= 1 else LocalExecutor(n)
    if spec.startswith(("dask://", "tcp://")):
        return DaskExecutor("tcp://" + spec.split("://", 1)[1])
    if spec.endswith(".json"):
        return DaskExecutor(spec)
    raise SpecError(f"unknown executor {spec!r}", where="--executor",
                    fix="use local, dask://HOST:PORT or a Dask scheduler file (.json)")


def stop_process_groups(procs: list[subprocess.Popen], grace: float = 30.0) -> None:
    """SIGTERM each process's group, then SIGKILL what is still there after `grace` seconds: the
    documented recipe's `dask scheduler` / `dask worker` processes (started with their own session)."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
