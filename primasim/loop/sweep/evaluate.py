"""Evaluating cells on a worker: the context every worker gets once, and one batch of cells -> one table.

The client parses every model and cluster the spec names (and draws the generated clusters) once,
into a `Context` that travels to each worker once (the process pool's initializer, or a Dask
worker plugin). A task is then just a batch number and index ranges: the worker builds
its cells from the spec, evaluates them and returns one Arrow table in the sweep's fixed schema.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from primasim.core.cluster import ClusterSpec, builtin_clusters, load_cluster
from primasim.core.errors import PrimasimError, SpecError
from primasim.core.model import ModelSpec
from primasim.core.model_sources import catalogue, load_model
from primasim.core.speculation import DEFAULT_DRAFT_TOKENS, DraftSpec, FixedRate, check_compatible
from primasim.core.units import MBPS, MS, GiB
from primasim.plan.draft import plan_speculative
from primasim.sim import SimConfig, make_plan, simulate

from .knobs import KNOBS
from .spec import SweepSpec, cell_id

# What one evaluated cell reports, beside its knobs (arrow types fix the dataset's schema).
RESULT_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("feasible", pa.bool_()), ("reason", pa.string()), ("error", pa.string()),
    ("tpot_ms", pa.float64()), ("tpot_p50_ms", pa.float64()), ("tpot_p90_ms", pa.float64()),
    ("ttft_ms", pa.float64()), ("throughput_tok_s", pa.float64()), ("max_memory_pressure", pa.float64()),
    ("plan_k", pa.int64()), ("devices_used", pa.int64()), ("plan", pa.string()),
    ("cluster_devices", pa.int64()), ("cluster_ram_gib", pa.float64()), ("cluster_gpus", pa.int64()),
    ("eval_s", pa.float64()), ("cpu_s", pa.float64()), ("worker", pa.string()),
)
_ARROW = {"str": pa.string(), "choice": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


def knob_type(spec: SweepSpec, key: str) -> pa.DataType:
    if key in ("model", "cluster", "system"):
        return pa.string()
    return _ARROW[KNOBS[key].kind]


def schema_for(spec: SweepSpec) -> pa.Schema:
    cols = [("index", pa.int64()), ("cell_id", pa.string())]
    cols += [(k, knob_type(spec, k)) for k in spec.columns()]
    return pa.schema(cols + list(RESULT_FIELDS), metadata={b"primasim.sweep": spec.fingerprint().encode()})


@dataclass(eq=False)
class Context:
    """Everything a worker needs, shipped once: the spec and every parsed model and cluster."""

    spec: SweepSpec
    models: dict[tuple[str, str | None], ModelSpec]
    clusters: dict[str, ClusterSpec]
    schema: pa.Schema
    token: str = ""

    def digests(self) -> dict[str, str]:
        """A short hash of every parsed model and cluster: results in a folder belong to these."""
        out = {}
        for (m, q), spec in self.models.items():
            out[f"model {m}" + (f" ({q})" if q else "")] = _digest(dataclasses.asdict(spec))
        for name, cl in self.clusters.items():
            out[f"cluster {name}"] = _digest(cl.to_toml())
        return out


def _digest(obj: Any) -> str:
    def clean(o: Any) -> Any:  # where a spec came from is not what it is
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items() if k not in ("path", "source", "sources")}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        return o

    return hashlib.sha1(json.dumps(clean(obj), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _resolve(ref: str, base_dir: str, builtin: set[str]) -> str:
    """A relative file reference is looked up beside the spec first, then in the working folder."""
    if ref in builtin or not base_dir or Path(ref).is_absolute():
        return ref
    cand = Path(base_dir) / ref
    return str(cand) if cand.exists() else ref


def build_context(spec: SweepSpec) -> Context:
    """Parse every model and cluster the spec names (a bad one is a SpecError naming it)."""
    pairs: set[tuple[str, str | None]] = set()
    groups = [{k: b.values_of(k) for k in b.keys()} for b in spec.blocks] + [
        {k: (v,) for k, v in c.items()} for c in spec.explicit]
    for g in groups:
        models = list(g.get("model", ()))
        quants = list(g.get("quant", ())) or [None]
        if spec.sampling is not None:
            for k, d in spec.sampling.ranges:
                if k == "model":
                    models += list(d.choices)
                elif k == "quant":
                    quants = list(d.choices)
        pairs |= {(m, q) for m in models for q in quants}
    names = set(catalogue())
    models_out: dict[tuple[str, str | None], ModelSpec] = {}
    for m, q in sorted(pairs, key=str):
        try:
            models_out[(m, q)] = load_model(_resolve(m, spec.base_dir, names), q)
        except PrimasimError as exc:
            raise SpecError(f"model {m!r}{f' ({q})' if q else ''}: {exc.what}", where=f"{spec.path}: model",
                            fix=exc.fix) from None
    builtin = set(builtin_clusters())
    clusters: dict[str, ClusterSpec] = {}
    for ref in spec.knob_values("cluster"):
        fam, _, idx = str(ref).partition("/")
        if fam in spec.families and idx.isdigit() and int(idx) < spec.families[fam].count:
            clusters[ref] = spec.families[fam].build(int(idx), spec.seed)
            continue
        try:
            clusters[ref] = load_cluster(_resolve(ref, spec.base_dir, builtin))
        except PrimasimError as exc:
            raise SpecError(f"cluster {ref!r}: {exc.what}", where=f"{spec.path}: cluster", fix=exc.fix) from None
    return Context(spec, models_out, clusters, schema_for(spec), token=spec.fingerprint())


# ------------------------------------------------------------------------------ one cell
def apply_knobs(cluster: ClusterSpec, cell: dict[str, Any]) -> ClusterSpec:
    """The cluster with the cell's network, memory and disk knobs applied."""
    net = cluster.network
    if "bandwidth_mbps" in cell:
        net = replace(net, bandwidth=float(cell["bandwidth_mbps"]) * MBPS, links=())
    if "latency_ms" in cell:
        net = replace(net, latency=float(cell["latency_ms"]) * MS, links=())
    if "ram_scale" not in cell and "disk_scale" not in cell:
        return cluster if net is cluster.network else replace(cluster, network=net)
    devs = []
    for d in cluster.devices:
        if "ram_scale" in cell:
            s = float(cell["ram_scale"])
            gpu = d.gpu
            if gpu is not None and d.uma:  # unified memory: the GPU's share is the same RAM
                gpu = replace(gpu, vram_avail=min(gpu.vram_total, gpu.vram_avail * s))
            d = replace(d, ram_avail=min(d.ram_total, d.ram_avail * s), gpu=gpu)
        if "disk_scale" in cell:
            s = float(cell["disk_scale"])
            d = replace(d, disk_seq=d.disk_seq * s, disk_rnd=d.disk_rnd * s)
        devs.append(d)
    return replace(cluster, devices=tuple(devs), network=net)


def _options(cell: dict[str, Any]) -> dict[str, Any]:
    return {k: cell[k] for k in ("k", "planner", "solver", "general", "comm", "variant", "S", "batch") if k in cell}


def _plan_fields(plan: Any, draft_at: str = "") -> dict[str, Any]:
    if plan is None:
        return {}
    return {"plan_k": plan.k, "plan": plan.describe() + (f" draft@{draft_at}" if draft_at else ""),
            "devices_used": sum(1 for d in plan.devices if d.layers > 0)}


def draft_of(cell: dict[str, Any], model: ModelSpec) -> DraftSpec | None:
    """The cell's draft (speculative decoding), or None without one."""
    if not cell.get("draft"):
        for k in ("draft_tokens", "acceptance", "draft_on"):
            if k in cell:
                raise SpecError(f"{k} needs a draft model", where=k, fix="set draft = \"MODEL\" in the same cell")
        return None
    d = load_model(str(cell["draft"]), cell.get("quant"))
    check_compatible(model, d)
    dev, _, side = str(cell.get("draft_on", "")).partition(":")
    return DraftSpec(d, int(cell.get("draft_tokens", DEFAULT_DRAFT_TOKENS)), dev or None, side or None,  # type: ignore[arg-type]
                     FixedRate(float(cell.get("acceptance", 0.7))))


def evaluate_plan(model: ModelSpec, cluster: ClusterSpec, cell: dict[str, Any]) -> dict[str, Any]:
    draft = draft_of(cell, model)
    if draft is not None and draft.tokens > 0:
        return evaluate_plan_draft(model, cluster, cell, draft)
    out = make_plan(cell["system"], model, cluster, n_ctx=int(cell.get("n_ctx", 1024)),
                    prompt_tokens=int(cell.get("prompt_tokens", 16)), **_options(cell))
    row: dict[str, Any] = {"feasible": out.feasible, "reason": out.reason,
                           "tpot_ms": None if out.predicted_tpot is None else out.predicted_tpot * 1e3,
                           "ttft_ms": None if out.predicted_ttft is None else out.predicted_ttft * 1e3,
                           "throughput_tok_s": out.throughput,
                           "max_memory_pressure": max(out.memory_pressure.values(), default=None)}
    row.update(_plan_fields(out.plan))
    return row


def evaluate_plan_draft(model: ModelSpec, cluster: ClusterSpec, cell: dict[str, Any], draft: DraftSpec) -> dict[str, Any]:
    """The planner's expected TPOT with a draft of K tokens (its placement: the cell's, or the best)."""
    dp = plan_speculative(cell["system"], model, cluster, draft, n_ctx=int(cell.get("n_ctx", 1024)),
                          prompt_tokens=int(cell.get("prompt_tokens", 16)), ks=(draft.tokens,), fixed_k=draft.tokens,
                          **_options(cell))
    b = dp.best
    row: dict[str, Any] = {"feasible": b.feasible, "reason": b.reason,
                           "tpot_ms": b.tpot_s * 1e3 if b.feasible else None,
                           "throughput_tok_s": 1.0 / b.tpot_s if b.feasible and b.tpot_s > 0 else None}
    row.update(_plan_fields(b.plan, f"{b.device}:{b.where}"))
    return row


def evaluate_simulate(model: ModelSpec, cluster: ClusterSpec, cell: dict[str, Any]) -> dict[str, Any]:
    opts = _options(cell)
    cfg = SimConfig(tokens=int(cell.get("tokens", 16)), prompt_tokens=int(cell.get("prompt_tokens", 16)),
                    seed=int(cell.get("seed", 0)), prefetch=cell.get("prefetch"),
                    S=opts.pop("S", None), batch=opts.pop("batch", None), draft=draft_of(cell, model))
    res = simulate(cell["system"], model, cluster, config=cfg, n_ctx=int(cell.get("n_ctx", 1024)), **opts)
    m = res.metrics
    row: dict[str, Any] = {"feasible": res.feasible, "reason": res.reason}
    if m is not None:
        row.update(tpot_ms=m.tpot_ms, tpot_p50_ms=m.tpot_p50_ms, tpot_p90_ms=m.tpot_p90_ms, ttft_ms=m.ttft_ms,
                   throughput_tok_s=m.throughput_tok_s,
                   max_memory_pressure=max(m.memory_pressure.values(), default=None))
    sp = res.extra.get("speculation", {}).get("draft") if res.feasible else None
    row.update(_plan_fields(res.plan, f"{sp['device']}:{sp['where']}" if sp else ""))
    return row


EVALUATORS = {"plan": evaluate_plan, "simulate": evaluate_simulate}


def run_cell(ctx: Context, index: int) -> dict[str, Any]:
    """Evaluate cell `index`; errors are recorded in the row, never raised (a sweep must not die)."""
    cell = ctx.spec.cell(index)
    t0, c0 = time.perf_counter(), time.process_time()
    row: dict[str, Any] = {}
    try:
        cluster = apply_knobs(ctx.clusters[cell["cluster"]], cell)
        row.update(cluster_devices=len(cluster.devices),
                   cluster_ram_gib=sum(d.ram_avail for d in cluster.devices) / GiB,
                   cluster_gpus=sum(1 for d in cluster.devices if d.gpu is not None))
        row.update(EVALUATORS[ctx.spec.evaluate](ctx.models[(cell["model"], cell.get("quant"))], cluster, cell))
        row["error"] = ""
    except PrimasimError as exc:
        row.update(feasible=False, error=exc.message)
    except Exception as exc:  # a bug in one cell must not lose the others' results
        row.update(feasible=False, error=f"{type(exc).__name__}: {exc}")
    for k in ("tpot_ms", "tpot_p50_ms", "tpot_p90_ms", "ttft_ms", "throughput_tok_s"):
        v = row.get(k)
        if v is not None and not math.isfinite(v):  # NaN/inf -> missing
            row[k] = None
    row["eval_s"] = time.perf_counter() - t0
    row["cpu_s"] = time.process_time() - c0
    return {"index": index, "cell_id": cell_id(cell), **cell, **row}


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class BatchResult:
    batch: int
    table: pa.Table
    n: int
    eval_s: float  # the cells' own wall time
    cpu_s: float  # the cells' own CPU time
    task_s: float  # the whole task on the worker (cells + building the table)
    worker: str
    task_cpu_s: float = 0.0  # CPU time of the whole task


def run_batch(ctx: Context, batch: int, ranges: list[tuple[int, int]]) -> BatchResult:
    """Evaluate every cell in `ranges` ([start, stop) pairs) and return them as one Arrow table."""
    t0, c0 = time.perf_counter(), time.process_time()
    worker = worker_name()
    rows = []
    for a, b in ranges:
        for i in range(a, b):
            r = run_cell(ctx, i)
            r["worker"] = worker
            rows.append(r)
    cols = {f.name: [r.get(f.name) for r in rows] for f in ctx.schema}
    table = pa.Table.from_pydict(cols, schema=ctx.schema)
    return BatchResult(batch, table, len(rows), sum(r["eval_s"] for r in rows), sum(r["cpu_s"] for r in rows),
                       time.perf_counter() - t0, worker, time.process_time() - c0)


# ------------------------------------------------------------------------------ worker-resident contexts
_CONTEXTS: dict[str, Context] = {}  # on a Dask worker: installed once by a worker plugin, by name


def install_context(name: str, ctx: Context) -> None:
    _CONTEXTS[name] = ctx


def drop_context(name: str) -> None:
    _CONTEXTS.pop(name, None)


def run_batch_named(name: str, batch: int, ranges: list[tuple[int, int]]) -> BatchResult:
    """A task on a Dask worker: the context comes from the worker's memory, not from the task."""
    ctx = _CONTEXTS.get(name)
    if ctx is None:
        raise LookupError(f"sweep context {name} is not installed on this worker")
    return run_batch(ctx, batch, ranges)


# ------------------------------------------------------------------------------ process-pool workers
_CTX: Context | None = None


def init_worker(ctx: Context, client_pid: int | None = None) -> None:
    """Process-pool initializer: keep the context for every task; Ctrl-C is the client's to handle;
    exit when the client is gone (a SIGKILLed client must not leave workers computing for nobody)."""
    import signal
    import threading

    global _CTX
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # discards a Ctrl-C that arrived while we imported
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the client at spawn
    _CTX = ctx
    # the client's pid comes from the client: a worker still starting when the client dies is
    # already re-parented when this runs, so its own getppid() would not tell
    threading.Thread(target=_exit_with_parent, args=(client_pid or os.getppid(),), daemon=True).start()


def _exit_with_parent(ppid: int, every: float = 1.0) -> None:
    while True:
        if os.getppid() != ppid:  # re-parented: the client died
            os._exit(3)
        time.sleep(every)


def run_batch_local(batch: int, ranges: list[tuple[int, int]]) -> BatchResult:
    assert _CTX is not None, "init_worker was not called"
    return run_batch(_CTX, batch, ranges)
