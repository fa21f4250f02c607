"""Serving, predicted vs measured: `primasim serve` on the emulated home cluster against the simulator.

(Longer than ~600 lines: one study's measurement, prediction and report, which share its constants and
journal; what only explains the results is in serve_diagnostics.py.)

One server (real process, `primasim serve`) runs llama-mini-300m on the emulated memory-rich home
cluster, planned by Halda on the *profiled* cluster (each device measured inside its limits); the
load generator (`primasim.serve.loadgen`, the openai client, open loop) replays Poisson request
streams at >= 5 load levels up to and past saturation; the simulator serves the same streams --
the arrival times as they were sent -- with the runtime model (`serve_workload(..., SimConfig(
runtime=True))`, the same plan, slots and prompt padding). Reported per level: P50 / P90 TTFT and
TPOT predicted vs measured and their errors, throughput, queueing; the saturation curve (offered
load vs P90 latency, both sides) as a figure. Then a device leaves: a worker is killed mid-stream
at a moderate load; the measured recovery time (kill -> the first token after it) against the
simulator's (`Departure` + `Recovery`: detection, re-plan, the survivors' set-up measured when the
server started, reading their windows from disk, re-prefill).

What is fitted: nothing. The profiled device figures come from the probe, the per-call cost
included (measured in CPU time over windows of 1-4 layers, primasim/loop/validate/probes.py);
experiments/fidelity.py's fitted `call_scale` (2) corrected the earlier wall-clock probe of that
cost on fidelity's own profiles and is not applied here (CALL_SCALE = 1).

    sudo .venv/bin/python experiments/serve_validation.py            # profile + serve + replay (~30 min)
    sudo .venv/bin/python experiments/serve_validation.py --resume [--reprofile]   # keep the measured levels
    python experiments/serve_validation.py --analyze                 # re-simulate + report from the journal

Writes experiments/results/serve_validation.{md,csv,json}, serve_saturation.png, serve_runs.jsonl
(journal: measured records per level), serve_cluster.toml (the profiled cluster), serve_plan.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from primasim.core.cluster import ClusterSpec, load_cluster
from primasim.core.io import (
    Journal,
    atomic_csv_rows,
    atomic_savefig,
    atomic_write_json,
    atomic_write_text,
    read_journal,
)
from primasim.core.model_sources import load_model
from primasim.core.plan import Plan
from primasim.core.serving import RequestRecord, summarize
from primasim.core.units import MiB
from primasim.core.workload import RequestSpec, Workload, poisson
from primasim.loop.validate.hostload import HostLoad
from primasim.serve.engine import worker_setup_s

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_diagnostics as diag  # noqa: E402  (next to this script)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
MODEL = "llama-mini-300m"
PROMPT, OUTPUT, N_CTX = 16, 16, 256
BUCKETS = (16, 64)
CALL_SCALE = 1.0  # the probed per-call cost as measured (the ablation in the report varies it)
LEVELS = (0.15, 0.3, 0.45, 0.55, 0.65, 0.75, 0.9, 1.1, 1.3)  # offered load / predicted capacity
N_REQUESTS = 32
SEED = 11
JOURNAL = RESULTS / "serve_runs.jsonl"
END_PROFILE = False  # --end-profile: probe the plan's devices again after each hold's levels
PLAN_FILE = ""  # --plan: serve this plan instead of Halda's on the first profile
HOST_CPUS = len(os.sched_getaffinity(0))  # the emulated devices are pinned to these (SimConfig.host_cpus)
HOST_CONTENTION = True  # --no-host-contention: an ablation (SimConfig.host_contention, runtime_facts.HOST_CONTENTION)


# ------------------------------------------------------------------------------------ cluster and plan
def rich_cluster() -> ClusterSpec:
    """home-emu with every window fitting its device (fidelity.py's memory-rich variant)."""
    base = load_cluster("home-emu")
    mem = {"desktop": 1024, "laptop": 768, "tablet": 512, "phone": 384}
    devs = []
    for d in base.devices:
        assert d.emulate is not None
        em = dataclasses.replace(d.emulate, memory_limit=mem[d.name] * MiB)
        devs.append(d.replace(emulate=em, ram_avail=mem[d.name] * MiB, ram_total=max(d.ram_total, mem[d.name] * MiB)))
    return ClusterSpec("home-emu-rich", tuple(devs), base.network, base.head, base.description, base.path)


def calibrated(cl: ClusterSpec) -> ClusterSpec:  # the per-call cost x CALL_SCALE
    return scaled_calls(cl, CALL_SCALE)


def scaled_calls(cl: ClusterSpec, k: float) -> ClusterSpec:
    devs = tuple(d.replace(call_overhead=d.call_overhead * k) for d in cl.devices)
    return ClusterSpec(cl.name, devs, cl.network, cl.head, cl.description, cl.path)


def weights() -> Path:
    from primasim.runtime.head import cached_random_weights

    return cached_random_weights(load_model(MODEL))


def profiled(resume: bool, reprofile: bool = False) -> tuple[ClusterSpec, str]:
    """The profile to predict this part's levels from, and its file name under RESULTS: the first
    part's (`serve_cluster.toml`, also the plan's and the load levels' basis), or with `reprofile` a new
    one taken now (`serve_cluster_<n>.toml`), so that each hold is predicted from a profile taken
    minutes before it rather than one the host's drift has left behind."""
    first = RESULTS / "serve_cluster.toml"
    if resume and first.exists() and not reprofile:
        return load_cluster(first), first.name
    n = 2 if resume and first.exists() else 1
    while n > 1 and (RESULTS / f"serve_cluster_{n}.toml").exists():
        n += 1
    path = first if n == 1 else RESULTS / f"serve_cluster_{n}.toml"
    from primasim.core.runtime_facts import runtime_model
    from primasim.loop.validate.calibrate import profile_cluster

    print(f"profiling the emulated cluster (each device inside its limits) -> {path.name}...", file=sys.stderr,
          flush=True)
    prof = profile_cluster(rich_cluster(), weights(), runtime_model(load_model(MODEL)),
                           progress=lambda m, *_: print("  " + m, file=sys.stderr, flush=True))
    prof.cluster.save(path)
    return load_cluster(path), path.name


def level_cluster(r: dict[str, Any], rows: dict[str, Any] | None = None) -> ClusterSpec:
    """The profile taken before the record's hold; with `rows` (the journal) and an end profile of that
    hold (`--end-profile`: the plan's devices probed again after its levels), each device's figures
    at the record's time, interpolated between the two (`between`)."""
    name = r.get("profile", "serve_cluster.toml")
    start = load_cluster(RESULTS / name)
    a, b = (rows or {}).get(f"profile:{name}"), (rows or {}).get(f"profile_end:{name}")
    if a is None or b is None or "time" not in r or not (RESULTS / b["file"]).exists():
        return start
    ta, tb = a["time"] + a.get("profile_s", 0.0) / 2, b["time"] + b.get("profile_s", 0.0) / 2
    t = r["time"] + r.get("wall_s", 0.0) / 2
    w = min(1.0, max(0.0, (t - ta) / (tb - ta))) if tb > ta else 0.0
    return between(start, load_cluster(RESULTS / b["file"]), w)


def between(a: ClusterSpec, b: ClusterSpec, w: float) -> ClusterSpec:
    """`a` with every device that `b` also profiled at the fraction `w` of the way to `b`: per-call
    times (1 / a rate, the per-call and KV-copy costs) interpolated linearly; disks and links as in `a`.
    The one-token probe of a device moved by up to 40 % between profiles 18 minutes apart on this shared
    host (the drift table): a level is predicted from the device figures of its own time in the hold."""
    def rate(x: float, y: float) -> float:
        return 1.0 / ((1 - w) / x + w / y) if x > 0 and y > 0 else x

    devs = []
    for d in a.devices:
        if d.name not in b.names:
            devs.append(d)
            continue
        e = b.device(d.name)
        devs.append(d.replace(
            ram_bw=rate(d.ram_bw, e.ram_bw), gemm_bw=rate(d.gemm_bw, e.gemm_bw),
            gemm_bw_rows={k: rate(v, e.gemm_bw_rows.get(k, v)) for k, v in d.gemm_bw_rows.items()},
            cpu_flops={k: rate(v, e.cpu_flops.get(k, v)) for k, v in d.cpu_flops.items()},
            call_overhead=(1 - w) * d.call_overhead + w * e.call_overhead, kv_copy=(1 - w) * d.kv_copy + w * e.kv_copy))
    return ClusterSpec(a.name, tuple(devs), a.network, a.head, a.description, a.path)


def end_profile(prof_name: str, plan: Any) -> dict[str, Any]:
    """Profile the plan's devices again at the end of a hold (`serve_cluster*_end.toml`)."""
    from primasim.core.runtime_facts import runtime_model
    from primasim.loop.validate.calibrate import profile_cluster

    t0, l0 = time.time(), _load1()
    path = RESULTS / (prof_name.removesuffix(".toml") + "_end.toml")
    names = [d.name for d in plan.active]
    print(f"profiling {', '.join(names)} again -> {path.name}...", file=sys.stderr, flush=True)
    prof = profile_cluster(rich_cluster().subset(names), weights(), runtime_model(load_model(MODEL)),
                           progress=lambda m, *_: print("  " + m, file=sys.stderr, flush=True))
    prof.cluster.save(path)
    return {"level": f"profile_end:{prof_name}", "profile": prof_name, "file": path.name, "time": t0, "load1": l0,
            "profile_s": time.time() - t0}


def level_path(rows: dict[str, Any], r: dict[str, Any]) -> tuple[float, float]:  # the server's path, same hold
    p = rows.get(f"path:{r.get('profile', 'serve_cluster.toml')}")
    return diag.path_of(records_from_json(p["records"])) if p else (0.0, 0.0)


def make_plan_(cl: ClusterSpec) -> Any:
    from primasim.serve.engine import plan_for_runtime

    out = plan_for_runtime("prima", load_model(MODEL), cl, N_CTX, {})
    if not out.feasible:
        raise SystemExit(f"no plan: {out.reason}")
    return out.plan


# ------------------------------------------------------------------------------------ prediction
def simulate(plan: Any, cl: ClusterSpec, wl: Workload, slots: int, departure: Any = None, recovery: Any = None,
             path: tuple[float, float] = (0.0, 0.0), plan_cl: ClusterSpec | None = None) -> Any:
    """The levels' prediction on `cl` (the hold's profile); a re-plan after a departure is the
    server's: its planner on the cluster file it was started with (`plan_cl`, serve_cluster.toml),
    timed on `cl` -- the 22:34 hold's own profile put the leftover layer on the tablet where the
    server, planning on the first hold's profile, put it on the phone."""
    from primasim.core.runtime_facts import runtime_model
    from primasim.serve.engine import plan_for_runtime
    from primasim.sim import SimConfig, serve_workload

    cfg = SimConfig(runtime=True, warmup=False, tokens=OUTPUT, prompt_tokens=PROMPT, seed=SEED, host_cpus=HOST_CPUS,
                    host_contention=HOST_CONTENTION)
    model = runtime_model(load_model(MODEL))
    cal = calibrated(cl)

    def replan(surv: ClusterSpec) -> Any:  # the server's planner, on the profiled survivors
        names = surv.names
        return plan_for_runtime("prima", load_model(MODEL), (plan_cl or cl).subset(names), N_CTX, {})

    return serve_workload("prima", model, cal, wl, plan=plan, config=cfg, slots=slots, buckets=BUCKETS,
                          departure=departure, recovery=recovery, replan=replan, path=path)


def capacity(plan: Any, cl: ClusterSpec, slots: int) -> float:
    """Predicted requests/s at saturation: everybody at once, throughput of the busy middle."""
    wl = Workload(tuple(RequestSpec(i, 0.0, PROMPT, OUTPUT) for i in range(4 * slots + 8)))
    res = simulate(plan, cl, wl, slots)
    ends = sorted(r.token_times[-1] for r in res.records)
    k = len(ends) // 4
    return (len(ends) - 2 * k) / (ends[-k - 1] - ends[k - 1])


# ------------------------------------------------------------------------------------ measurement
class Server:
    def __init__(self, cl_path: Path, plan_path: Path, slots: int, log: Path) -> None:
        self.ready = RESULTS / ".serve_ready.json"
        self.ready.unlink(missing_ok=True)
        self.log = open(log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "primasim", "serve", "--cluster", str(cl_path), "--model", str(weights()),
             "--plan", str(plan_path), "--slots", str(slots), "--n-ctx", str(N_CTX), "--prefill-buckets",
             ",".join(map(str, BUCKETS)), "--listen", "127.0.0.1:0", "--ready-file", str(self.ready),
             "--heartbeat-timeout", "30", "--link-timeout", "30"], stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        t0 = time.monotonic()
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() - t0 > 1800:
                raise SystemExit("server did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.5)
        self.url = json.loads(self.ready.read_text())["url"]

    def status(self) -> dict[str, Any]:
        import httpx2 as httpx

        return httpx.get(self.url + "/primasim/status", timeout=30).json()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        self.ready.unlink(missing_ok=True)


def _load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def measure_level(srv: Server, wl: Workload, model_id: str) -> list[RequestRecord]:
    from primasim.serve.loadgen import replay

    return replay(srv.url, model_id, wl, vocab=load_model(MODEL).vocab, timeout=900)


def records_to_json(recs: list[RequestRecord]) -> list[dict[str, Any]]:
    return [{"rid": r.rid, "arrival": r.arrival, "prompt": r.prompt_tokens, "max": r.max_tokens,
             "times": r.token_times, "admitted": r.admitted, "status": r.status, "error": r.error,
             "restarts": r.restarts, "server": r.server} for r in recs]


def records_from_json(rows: list[dict[str, Any]]) -> list[RequestRecord]:
    return [RequestRecord(r["rid"], r["arrival"], r["prompt"], r["max"], list(r["times"]), r["admitted"],
                          r["status"], r["error"], r["restarts"], server=r.get("server") or {}) for r in rows]


def as_sent(recs: list[RequestRecord]) -> Workload:
    """The workload the server really saw: arrivals as sent (BLIS-style replay isolates the model's error)."""
    t0 = min(r.arrival for r in recs)
    return Workload(tuple(RequestSpec(r.rid, r.arrival - t0, r.prompt_tokens, r.max_tokens) for r in recs), "as sent")


# ------------------------------------------------------------------------------------ main
def run(resume: bool, skip_leave: bool = False, reprofile: bool = False) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_prof = time.time()
    l_prof, (_, prof_name) = _load1(), profiled(resume, reprofile)
    cl_path = RESULTS / "serve_cluster.toml"  # the first part's profile: the plan and the levels' rates
    cl = load_cluster(cl_path)
    plan = Plan.from_json(PLAN_FILE) if PLAN_FILE else make_plan_(cl)
    plan_path = RESULTS / "serve_plan.json"
    atomic_write_text(plan_path, json.dumps(plan.to_json(), indent=1))
    slots = len(plan.active)
    cap = capacity(plan, cl, slots)
    print(f"plan {plan.describe()}, {slots} slots, predicted capacity {cap:.3f} req/s", file=sys.stderr, flush=True)
    jr = Journal(JOURNAL, key="level", resume=resume)
    run_key = "run" if prof_name == "serve_cluster.toml" else f"run:{prof_name}"
    if f"profile:{prof_name}" not in jr.records:
        jr.add({"level": f"profile:{prof_name}", "profile": prof_name, "time": t_prof, "load1": l_prof,
                "profile_s": time.time() - t_prof})
    srv = None
    try:
        if run_key not in jr.records:
            print("reference: the same plan as one `primasim run` request...", file=sys.stderr, flush=True)
            try:  # a diagnostic: its failure must not cost the levels
                ref = diag.measure_run(plan, load_cluster(cl_path), weights(), load_model(MODEL), PROMPT)
                ref["level"], ref["profile"] = run_key, prof_name
                jr.add(ref)
                print(f"  run: TPOT {ref['tpot_ms']:.1f} ms (P50 {ref['tpot_p50_ms']:.1f}), TTFT {ref['ttft_ms']:.0f} "
                      f"ms, load {ref['load1_before']:.1f}", file=sys.stderr, flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"  run reference failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        todo = [f for f in LEVELS if f"{f:g}" not in jr.records]
        if "leave" not in jr.records and not skip_leave:
            todo.append("leave")
        if todo:
            srv = Server(cl_path, plan_path, slots, RESULTS / "serve_server.log")
            st = srv.status()
            import httpx2 as httpx

            model_id = httpx.get(srv.url + "/models", timeout=30).json()["data"][0]["id"]
            starts = [e for e in st["events"] if e["event"] == "start"]
            if f"path:{prof_name}" not in jr.records:  # the server's own path, timed on lone requests
                c0 = diag.cpu_snapshot(st["devices"], srv.proc.pid)  # and the workers' CPU per token, by thread
                recs = diag.measure_path(srv.url, model_id, PROMPT, load_model(MODEL).vocab)
                jr.add({"level": f"path:{prof_name}", "profile": prof_name, "records": records_to_json(recs),
                        "cpu": diag.cpu_delta(c0, diag.cpu_snapshot(st["devices"], srv.proc.pid))})
        for f in todo:
            if f == "leave":
                continue
            rate = f * cap
            wl = poisson(rate, N_REQUESTS, prompt=PROMPT, output=OUTPUT, seed=SEED + int(f * 100))
            l0 = _load1()
            t0 = time.time()
            hl = HostLoad().start()
            c0 = diag.cpu_snapshot(srv.status()["devices"], srv.proc.pid)  # type: ignore[union-attr]
            recs = measure_level(srv, wl, model_id)  # type: ignore[arg-type]
            cpu = diag.cpu_delta(c0, diag.cpu_snapshot(srv.status()["devices"], srv.proc.pid))  # type: ignore[union-attr]
            foreign = hl.stop()
            rec = {"level": f"{f:g}", "fraction": f, "rate": rate, "capacity_pred": cap, "load1_before": l0,
                   "load1_after": _load1(), "foreign_cpu": foreign, "nice": os.nice(0),
                   "cpu_shares": int(os.environ.get("PRIMASIM_EMULATE_CPU_SHARES", "0") or 0), "wall_s": time.time() - t0,
                   "records": records_to_json(recs), "server_start": starts[0] if starts else None, "cpu": cpu,
                   "profile": prof_name, "time": t0}
            jr.add(rec)
            s = summarize(recs)
            print(f"level {f:g} ({rate:.3f} req/s): {s['completed']}/{s['requests']} ok, P50 TTFT "
                  f"{s['ttft_ms']['p50']:.0f} ms, P50 TPOT {s['tpot_ms']['p50']:.0f} ms, load {l0:.1f}, others' CPU {100 * foreign:.0f} %",
                  file=sys.stderr, flush=True)
            time.sleep(3)
        if "leave" in todo:
            jr.add({**measure_leave(srv, cap, model_id, plan), "profile": prof_name})  # type: ignore[arg-type]
        if srv is not None:
            srv.close()
            srv = None
        if END_PROFILE and f"profile_end:{prof_name}" not in jr.records:
            jr.add(end_profile(prof_name, plan))
    finally:
        if srv is not None:
            srv.close()
        jr.close()
    analyze()


def measure_leave(srv: Server, cap: float, model_id: str, plan: Any) -> dict[str, Any]:
    """A worker is SIGKILLed mid-stream at 60 % of capacity; every request must complete."""
    import threading

    from primasim.serve.loadgen import replay

    st = srv.status()
    victim = [d.name for d in plan.active][-1]  # the ring's last device (not the head)
    rate = 0.6 * cap
    wl = poisson(rate, 24, prompt=PROMPT, output=OUTPUT, seed=SEED + 999)
    kill_at = wl.requests[8].arrival + 1.0
    out: dict[str, Any] = {}

    def killer(t0: float) -> None:
        time.sleep(max(0.0, t0 + kill_at - time.monotonic()))
        out["kill_mono"] = time.monotonic()
        out["wall_minus_mono"] = time.time() - time.monotonic()
        os.kill(int(st["devices"][victim]["pid"]), signal.SIGKILL)

    t0 = time.monotonic() + 0.2  # the workload's time 0, shared with the load generator
    th = threading.Thread(target=killer, args=(t0,), daemon=True)
    th.start()
    hl = HostLoad().start()
    recs = replay(srv.url, model_id, wl, vocab=load_model(MODEL).vocab, timeout=1800, t0=t0)
    foreign = hl.stop()
    th.join()
    after = srv.status()
    ev = [e for e in after["events"] if e["event"] in ("device left", "restart")]
    # the server's wall-clock events on the load generator's clock (seconds since the workload's time 0)
    to_rel = out["wall_minus_mono"] + t0
    return {"level": "leave", "victim": victim, "rate": rate, "kill_at_s": out["kill_mono"] - t0,
            "wall_to_rel_s": to_rel, "records": records_to_json(recs), "events": ev, "foreign_cpu": foreign,
            "server_start": [e for e in st["events"] if e["event"] == "start"][0], "time": t0 - time.monotonic() + time.time(),
            "ring_after": after["ring"], "plan_after": after["plan"]}


# ------------------------------------------------------------------------------------ recovery model
def setup_model(start: dict[str, Any], cl: ClusterSpec) -> tuple[Any, dict[str, Any]]:
    """The survivors' start-up besides disk reads, from the server's own start (the only fitted part:
    in sample = the start, out of sample = the restart). A worker's spawn (Python + JAX import) and its
    set-up (compile every window's executables, map and touch the weights, run each once) are CPU work
    under the device's quota: CPU-seconds = time x quota. Spawn: one figure (the slowest device sets
    `connect_s`); set-up: a + b x resident bytes, least squares over the start's devices (exact for two)."""
    from primasim.sim._serving import _read_time

    def quota(name: str) -> float:
        em = cl.device(name).emulate
        return float(em.cpu_quota) if em is not None and em.cpu_quota > 0 else float(cl.device(name).cores)

    ring = list(start["loads"])
    spawn_cpu = start["connect_s"] * min(quota(n) for n in ring)
    xs, ys = [], []
    for n, ld in start["loads"].items():
        res = float(ld.get("resident_bytes", 0.0))
        busy = worker_setup_s(ld)  # compile + LOAD (its warm-up inside: counted once)
        busy -= _read_time(cl.device(n), res)  # the disk's share is the simulator's own (reload="all")
        xs.append(res)
        ys.append(max(0.0, busy) * quota(n))
    if len(set(xs)) > 1:
        b, a = np.polyfit(xs, ys, 1)
        b = max(0.0, float(b))
        a = float(np.mean(ys) - b * np.mean(xs))
    else:
        a, b = float(np.mean(ys)), 0.0

    def setup_s(name: str, read_bytes: float, new_plan: Any) -> float:
        q_min = min(quota(d.name) for d in new_plan.active)
        return spawn_cpu / q_min + (a + b * read_bytes) / quota(name)

    return setup_s, {"spawn_cpu_s": spawn_cpu, "setup_cpu_s": a, "setup_cpu_s_per_gb": b * 1e9,
                     "fitted_on": {n: {"resident_gb": x / 1e9, "cpu_s": y} for n, x, y in zip(ring, xs, ys)}}


def slowed(cl: ClusterSpec, f: float) -> ClusterSpec:
    """Every device's compute f times slower (FLOPS, memory and GEMM bandwidths, per-call and KV-copy
    costs); disks and links as they were: the host's other load, as one factor."""
    devs = tuple(d.replace(cpu_flops={k: v / f for k, v in d.cpu_flops.items()}, ram_bw=d.ram_bw / f,
                           gemm_bw=d.gemm_bw / f, gemm_bw_rows={k: v / f for k, v in d.gemm_bw_rows.items()},
                           call_overhead=d.call_overhead * f, kv_copy=d.kv_copy * f) for d in cl.devices)
    return ClusterSpec(cl.name, devs, cl.network, cl.head, cl.description, cl.path)


def run_factor(plan: Any, cl: ClusterSpec, run: dict[str, Any]) -> float:
    """The slow-down f (every device's compute) that makes the predicted plain run its measured TPOT:
    the device model scaled to a measurement outside the served levels, taken in the same hold."""
    lo, hi = 0.3, 2.0
    for _ in range(12):
        mid = (lo + hi) / 2
        pred = diag.predict_run(plan, calibrated(slowed(cl, mid)), load_model(MODEL), PROMPT, HOST_CPUS)["tpot_ms"]
        lo, hi = (mid, hi) if pred < run["tpot_ms"] else (lo, mid)
    return (lo + hi) / 2


def _compare(meas: list[RequestRecord], sim: Any, row: dict[str, Any], prefix: str = "") -> None:
    sm, sp = summarize(meas), summarize(sim.records)
    for m in ("ttft_ms", "tpot_ms", "e2e_ms", "queue_ms"):
        for p in ("p50", "p90"):
            mv, pv = sm[m][p], sp[m][p]
            row[f"{prefix}meas_{m[:-3]}_{p}"] = mv
            row[f"{prefix}pred_{m[:-3]}_{p}"] = pv
            row[f"{prefix}err_{m[:-3]}_{p}"] = (pv - mv) / mv * 100 if mv and pv is not None else None
    row[f"{prefix}pred_throughput_req_s"] = sp["throughput_req_s"]


def analyze() -> None:
    global HOST_CONTENTION
    rows = {r["level"]: r for r in read_journal(JOURNAL)}
    if not rows:
        raise SystemExit(f"nothing measured yet in {JOURNAL}")
    cl = load_cluster(RESULTS / "serve_cluster.toml")

    plan = Plan.from_json(str(RESULTS / "serve_plan.json"))
    slots = len(plan.active)
    levels = sorted((r for r in rows.values() if "fraction" in r), key=lambda r: r["fraction"])
    factors = {r["profile"]: run_factor(plan, level_cluster(r), rows[k])  # per hold, from its plain run
               for r in rows.values() if "profile" in r and str(r["level"]).startswith("profile:")
               if (k := "run" if r["profile"] == "serve_cluster.toml" else f"run:{r['profile']}") in rows}
    table, cpu_rows = [], []
    for r in levels:
        meas = records_from_json(r["records"])
        ok = [x for x in meas if x.status == "ok"]
        lcl = level_cluster(r, rows)
        row = {"fraction": r["fraction"], "rate_req_s": r["rate"], "requests": len(meas), "completed": len(ok),
               "meas_throughput_req_s": summarize(meas)["throughput_req_s"],
               "load1": r["load1_before"], "foreign_cpu": r.get("foreign_cpu"), "nice": r.get("nice", 0),
               "cpu_shares": r.get("cpu_shares", 0), "profile": r.get("profile", "serve_cluster.toml"),
               "time": r.get("time")}
        path = level_path(rows, r)
        row["path_in_ms"], row["path_out_ms"] = 1e3 * path[0], 1e3 * path[1]
        with diag.predicted_cpu() as cpu_pred:
            sim = simulate(plan, lcl, as_sent(meas), slots, path=path)
        _compare(meas, sim, row)
        if r.get("cpu") and HOST_CONTENTION:  # the contention each level met (a diagnostic)
            HOST_CONTENTION = False
            with diag.predicted_cpu() as cpu_flat:
                simulate(plan, lcl, as_sent(meas), slots, path=path)
            HOST_CONTENTION = True
            cpu_rows.append({"rate_req_s": r["rate"], "tokens": sum(len(x.token_times) for x in ok), "pred": cpu_pred,
                             "flat": cpu_flat, "meas": {n: diag.compute_cpu_s(d) for n, d in r["cpu"]["devices"].items()}})
        row["pred_prefill_ms"] = 1e3 * float(np.median([x.token_times[0] - path[1] - x.admitted for x in sim.records
                                                         if x.token_times and x.admitted is not None]))
        if f"profile_end:{row['profile']}" in rows:  # ablation: the hold's start profile alone
            _compare(meas, simulate(plan, level_cluster(r), as_sent(meas), slots, path=path), row, "start_")
        row["factor"] = factor = factors.get(row["profile"], math.nan)
        if not math.isnan(factor):
            _compare(meas, simulate(plan, slowed(lcl, factor), as_sent(meas), slots, path=path), row, "cal_")
        if any(x.server for x in ok):
            row.update(diag.ttft_split(ok))
        table.append(row)
    # saturation: the server's measured capacity is the throughput of the most loaded levels
    cap_meas = max(t["meas_throughput_req_s"] or 0 for t in table)
    for t in table:
        t["offered_over_capacity"] = t["rate_req_s"] / cap_meas if cap_meas else None
        t["below_saturation"] = bool(t["offered_over_capacity"] is not None and t["offered_over_capacity"] < 0.9)
    atomic_csv_rows(RESULTS / "serve_validation.csv", table)
    lv = rows.get("leave")
    leave = _leave_report(lv, plan, level_cluster(lv, rows) if lv else cl, slots, level_path(rows, lv) if lv else (0, 0))
    atomic_write_json(RESULTS / "serve_validation.json", {"levels": table, "leave": leave, "run_factors": factors,
                                                           "capacity_measured_req_s": cap_meas})
    pred_run = diag.predict_run(plan, calibrated(cl), load_model(MODEL), PROMPT, HOST_CPUS) if "run" in rows else None
    if pred_run is not None:  # an ablation of the per-call cost (not a fit): the probe as measured, and none
        pred_run["call_ablation"] = {f"{k:g}": diag.predict_run(plan, scaled_calls(cl, k), load_model(MODEL), PROMPT,
                                                                 HOST_CPUS)["tpot_ms"] for k in (1.0, 0.0)}
    diag_lines = diag.report(rows, levels, pred_run, lambda r: next(
        (t["pred_tpot_p50"], t["meas_tpot_p50"]) for t in table if t["fraction"] == r["fraction"]))
    def profile_named(name: str) -> ClusterSpec:  # an end profile: its hold's start profile moved all the way
        if name.endswith("_end.toml"):
            return between(load_cluster(RESULTS / (name.removesuffix("_end.toml") + ".toml")), load_cluster(RESULTS / name), 1.0)
        return load_cluster(RESULTS / name)

    diag_lines += diag.drift_report(rows, lambda name: diag.predict_run(
        plan, calibrated(profile_named(name)), load_model(MODEL), PROMPT, HOST_CPUS),
        lambda name: diag.layer_ms(load_cluster(RESULTS / name)))
    diag_lines += diag.split_report(table)
    diag_lines += diag.contention_report(cpu_rows)
    _figure(table)
    _report(table, leave, plan, cap_meas, rows, factors, diag_lines)


def per_request(level: str) -> None:
    """Print one level's requests, measured beside predicted (the same arrivals): TPOT, TTFT and how
    long each overlapped another request (two in flight), to see which requests the simulator overlaps."""
    rows = {r["level"]: r for r in read_journal(JOURNAL)}
    plan = Plan.from_json(str(RESULTS / "serve_plan.json"))
    r = rows[level]
    meas = sorted(records_from_json(r["records"]), key=lambda x: x.arrival)
    sim = sorted(simulate(plan, level_cluster(r, rows), as_sent(meas), len(plan.active), path=level_path(rows, r)).records,
                 key=lambda x: x.arrival)

    def tpot(x: RequestRecord) -> float:
        return (x.token_times[-1] - x.token_times[0]) / max(1, len(x.token_times) - 1) * 1e3

    def overlap(recs: list[RequestRecord], i: int) -> float:
        a, b = recs[i].token_times[0], recs[i].token_times[-1]
        return sum(max(0.0, min(b, y.token_times[-1]) - max(a, y.arrival)) for j, y in enumerate(recs) if j != i)

    print("arrival s | measured TPOT ms, TTFT ms, overlap s | predicted TPOT ms, TTFT ms, overlap s")
    for i, (m, p) in enumerate(zip(meas, sim)):
        print(f"{m.arrival:7.2f} | {tpot(m):6.1f} {1e3 * (m.token_times[0] - m.arrival):6.0f} {overlap(meas, i):5.2f} | "
              f"{tpot(p):6.1f} {1e3 * (p.token_times[0] - p.arrival):6.0f} {overlap(sim, i):5.2f}")


def _leave_report(r: dict[str, Any] | None, plan: Any, cl: ClusterSpec, slots: int,
                  path: tuple[float, float]) -> dict[str, Any] | None:
    if r is None:
        return None
    from primasim.sim import Departure, Recovery

    meas = records_from_json(r["records"])
    t_kill = r["kill_at_s"]
    ev = {e["event"]: e for e in r["events"]}
    left, restart = ev.get("device left", {}), ev.get("restart", {})
    rel = r["wall_to_rel_s"]
    resumed = left["resumed_at"] - rel if "resumed_at" in left else None
    # measured recovery: the kill -> the first token the client received from the new ring
    after = [t for x in meas for t in x.token_times if resumed is not None and t >= resumed]
    meas_rec = min(after) - t_kill if after else None
    measured = {"detect_s": left.get("detected_at", math.nan) - rel - t_kill, "replan_s": left.get("replan_s"),
                "stop_old_ring_s": restart.get("start_s", math.nan) - left.get("detected_at", math.nan)
                - (left.get("replan_s") or 0.0),
                "connect_s": restart.get("connect_s"), "setup_s": restart.get("setup_s"),
                "restart_s": (restart["ready_at"] - restart["start_s"]) if "ready_at" in restart else None,
                "setup_by_device": {n: worker_setup_s(ld) for n, ld in restart.get("loads", {}).items()}}
    setup_fn, fitted = setup_model(r["server_start"], cl)
    make_plan_(load_cluster(RESULTS / "serve_cluster.toml"))  # the server plans once at start: the re-plan timed below is a warm one
    rcv = Recovery(detect_kill_s=0.05, setup_s=setup_fn, reload="all", warmup=slots, buckets=BUCKETS)
    t_first = min(x.arrival for x in meas)
    sim = simulate(plan, cl, as_sent(meas), slots, departure=Departure(t_kill - t_first, r["victim"]), recovery=rcv,
                   path=path, plan_cl=load_cluster(RESULTS / "serve_cluster.toml"))
    pr = sim.recovery or {}
    return {"victim": r["victim"], "requests": len(meas), "completed": sum(x.status == "ok" for x in meas),
            "restarted": sum(x.restarts > 0 for x in meas), "measured_recovery_s": meas_rec,
            "predicted_recovery_s": pr.get("recovery_s"), "plan_after_measured": r["plan_after"],
            "plan_after_predicted": pr.get("plan"), "measured": measured, "foreign_cpu": r.get("foreign_cpu"),
            "predicted": {k: pr.get(k) for k in ("detect_s", "replan_s", "setup_s", "setup_by_device")},
            "setup_model": fitted, "meas_summary": summarize(meas), "pred_summary": summarize(sim.records)}


def _figure(table: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [t["rate_req_s"] for t in table]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, m, title in ((axes[0], "ttft", "P90 TTFT"), (axes[1], "e2e", "P90 end-to-end latency")):
        ax.plot(x, [t[f"pred_{m}_p90"] / 1e3 for t in table], "-", color="C0", label="predicted (simulator)")
        ax.plot(x, [t[f"meas_{m}_p90"] / 1e3 for t in table], "o", color="C1", label="measured (primasim serve)")
        ax.plot(x, [t.get(f"cal_pred_{m}_p90", math.nan) / 1e3 for t in table], ":", color="C2",
                label="predicted, devices scaled to the hold's plain run")
        ax.plot(x, [t[f"pred_{m}_p50"] / 1e3 for t in table], "--", color="C0", alpha=0.5, label="P50 predicted")
        ax.plot(x, [t[f"meas_{m}_p50"] / 1e3 for t in table], "x", color="C1", alpha=0.6, label="P50 measured")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel("seconds")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{MODEL} on the emulated home cluster: load vs latency ({PROMPT}+{OUTPUT} tokens per request, "
                 f"{table[0]['requests'] if table else 0} Poisson requests per level)")
    fig.tight_layout()
    atomic_savefig(fig, RESULTS / "serve_saturation.png", dpi=120)


def _fmt(v: Any, d: int = 0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def _report(table: list[dict[str, Any]], leave: dict[str, Any] | None, plan: Any, cap: float,
            rows: dict[str, Any], factors: dict[str, float], diag_lines: list[str]) -> None:
    below = [t for t in table if t["below_saturation"]]
    lines = [
        "# Serving: predicted vs measured (`primasim serve` on the emulated home cluster)", "",
        f"Measured by `sudo .venv/bin/python experiments/serve_validation.py` (the options: docs/serving.md), reported by "
        f"`python experiments/serve_validation.py --analyze` ({time.strftime('%Y-%m-%d %H:%M')}). "
        f"{MODEL} (f32 random weights) on home-emu with every window fitting its device, profiled inside the "
        f"emulation at the start of each hold (`serve_cluster*.toml`); plan {plan.describe()} (`serve_plan.json`), "
        f"{len(plan.active)} slots, prompts {PROMPT} tokens, {OUTPUT} generated (ignore_eos), Poisson arrivals, "
        f"{table[0]['requests'] if table else N_REQUESTS} requests per level, replayed with the openai client (open loop; profile, server and workers at "
        f"nice {table[0]['nice'] if table else 0}, the devices' cgroups at cpu.shares "
        f"{table[0]['cpu_shares'] if table else 0}, so that the emulated devices get their CPU quota on the shared "
        f"host: the others' CPU share is in the last column). The simulator serves the "
        f"same arrivals (as sent) with the runtime model; nothing is fitted (the probed per-call cost x "
        f"{CALL_SCALE:g}).", "",
        f"Measured capacity (best throughput): {cap:.3f} req/s. A level is below saturation when its offered rate "
        f"is < 0.9 of it.", "",
        "| offered req/s | / capacity | done | TTFT P50 pred / meas ms | err % | TTFT P90 pred / meas | err % | "
        "TPOT P50 pred / meas ms | err % | TPOT P90 pred / meas | err % | throughput pred / meas req/s | load1 | "
        "others' CPU % |",
        "|---" * 14 + "|"]
    for t in table:
        cells = [f"{t['rate_req_s']:.3f}", f"{t['offered_over_capacity']:.2f}" + ("" if t["below_saturation"] else " (sat.)"),
                 f"{t['completed']}/{t['requests']}"]
        for m in ("ttft", "tpot"):
            for p in ("p50", "p90"):
                cells += [f"{_fmt(t[f'pred_{m}_{p}'])} / {_fmt(t[f'meas_{m}_{p}'])}", _fmt(t[f"err_{m}_{p}"], 1)]
        cells += [f"{_fmt(t['pred_throughput_req_s'], 3)} / {_fmt(t['meas_throughput_req_s'], 3)}", f"{t['load1']:.1f}",
                  _fmt(100 * t["foreign_cpu"] if t["foreign_cpu"] is not None else None)]
        lines.append("| " + " | ".join(cells) + " |")
    if below:
        def worst(key: str) -> float:
            return max(abs(t[key]) for t in below if t[key] is not None)
        lines += ["", f"Below saturation ({len(below)} levels), largest absolute errors: TTFT P50 "
                      f"{worst('err_ttft_p50'):.1f} %, P90 {worst('err_ttft_p90'):.1f} %; TPOT P50 "
                      f"{worst('err_tpot_p50'):.1f} %, P90 {worst('err_tpot_p90'):.1f} % "
                      f"(targets: 10 % at P50, 20 % at P90)."]
        ok = sum(abs(t[f"err_{m}_{p}"]) <= (10 if p == "p50" else 20) for t in below for m in ("ttft", "tpot")
                 for p in ("p50", "p90") if t[f"err_{m}_{p}"] is not None)
        lines += [f"Level x metric cells within their target: {ok} of {4 * len(below)}."]
        st = [t for t in below if "start_err_ttft_p50" in t]
        if st:
            rng = {k: (min(t[f"start_err_{k}"] for t in st), max(t[f"start_err_{k}"] for t in st))
                   for k in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")}
            ok_s = sum(abs(t[f"start_err_{k}"]) <= (10 if k.endswith("p50") else 20) for t in st for k in rng)
            lines += [f"Ablation, each level predicted from its hold's start profile alone (no `--end-profile` "
                      f"interpolation), {len(st)} levels below saturation: " + ", ".join(
                          f"{k.replace('_', ' ').upper()} {a:+.1f} ... {b:+.1f} %" for k, (a, b) in rng.items())
                      + f"; cells within target {ok_s} of {4 * len(st)}."]
        out = [t for t in below if "cal_err_ttft_p50" in t]

        def worst_cal(key: str) -> float:
            return max((abs(t[key]) for t in out if t[key] is not None), default=math.nan)
        lines += ["", "### Diagnostic: the device model scaled to each hold's plain run", "",
                  "The profile's device figures moved between profiles taken minutes apart (below, \"Profiles per "
                  "hold\"). Scaling every device's compute by one factor per hold, fitted so that the plain `primasim "
                  "run` of the same hold (a measurement outside the served levels) is predicted exactly -- f = "
                  + ", ".join(f"{v:.3f} ({k})" for k, v in factors.items()) + " -- every served level is out of "
                  "sample and shows what is left for the serving model itself (queueing, slots, prefill, path):", "",
                  "| offered req/s | TTFT P50 pred / meas ms | err % | TTFT P90 pred / meas | err % | TPOT P50 err % | "
                  "TPOT P90 err % | throughput pred / meas req/s |", "|---" * 8 + "|"]
        for t in (t for t in table if "cal_err_ttft_p50" in t):
            lines.append("| " + " | ".join([
                f"{t['rate_req_s']:.3f}" + ("" if t["below_saturation"] else " (sat.)"),
                f"{_fmt(t['cal_pred_ttft_p50'])} / {_fmt(t['meas_ttft_p50'])}", _fmt(t["cal_err_ttft_p50"], 1),
                f"{_fmt(t['cal_pred_ttft_p90'])} / {_fmt(t['meas_ttft_p90'])}", _fmt(t["cal_err_ttft_p90"], 1),
                _fmt(t["cal_err_tpot_p50"], 1), _fmt(t["cal_err_tpot_p90"], 1),
                f"{_fmt(t['cal_pred_throughput_req_s'], 3)} / {_fmt(t['meas_throughput_req_s'], 3)}"]) + " |")
        lines += ["", f"Below saturation ({len(out)} levels), largest absolute errors: TTFT P50 "
                      f"{worst_cal('cal_err_ttft_p50'):.1f} %, P90 {worst_cal('cal_err_ttft_p90'):.1f} %; TPOT P50 "
                      f"{worst_cal('cal_err_tpot_p50'):.1f} %, P90 {worst_cal('cal_err_tpot_p90'):.1f} %."]
    lines += ["", *diag_lines, "![saturation](serve_saturation.png)", ""]
    if leave:
        m, p = leave["measured"], leave["predicted"]
        sm = leave["setup_model"]
        lines += ["## A device leaves", "",
                  f"At 60 % of capacity, the worker of {leave['victim']} is SIGKILLed mid-stream. "
                  f"{leave['completed']}/{leave['requests']} requests completed ({leave['restarted']} re-prefilled). "
                  f"Plan after: measured {leave['plan_after_measured']}, predicted {leave['plan_after_predicted']}.", "",
                  "| | recovery (kill -> first token of the new ring) s | detect s | re-plan s | "
                  "survivors' start-up (slowest) s |", "|---|---|---|---|---|",
                  f"| measured | {_fmt(leave['measured_recovery_s'], 2)} | {_fmt(m['detect_s'], 2)} | "
                  f"{_fmt(m['replan_s'], 3)} | {_fmt(m['restart_s'], 1)} |",
                  f"| predicted | {_fmt(leave['predicted_recovery_s'], 2)} | {_fmt(p['detect_s'], 2)} | "
                  f"{_fmt(p['replan_s'], 3)} | {_fmt(p['setup_s'], 1)} |", "",
                  "Survivors' start-up per device (s), measured (the shared spawn of "
                  f"{_fmt(m['connect_s'], 1)} s + the device's compile and LOAD, its warm-up inside: `worker_setup_s`) / predicted "
                  "(spawn + set-up + disk reads): "
                  + ", ".join(f"{n} {_fmt((m['connect_s'] or 0) + v, 1)} / {_fmt((p['setup_by_device'] or {}).get(n), 1)}"
                              for n, v in m["setup_by_device"].items()) + "; the whole start-up also runs the warm-up "
                  f"requests (one per slot). Stopping the old ring took {_fmt(m['stop_old_ring_s'], 2)} s "
                  "(not modelled).", "",
                  "Predicted = detection (the driver's poll) + re-plan (timed here) + the slowest survivor's start-up + "
                  "warm-up (one short request per slot) + the re-prefill of in-flight requests on the new plan, in the "
                  "simulator (`Departure` + `Recovery(reload='all')`). The start-up besides disk reads is the one "
                  "thing taken from the server: its own start (in sample), as CPU-seconds under each device's quota "
                  f"(spawn {sm['spawn_cpu_s']:.2f} CPU-s; set-up {sm['setup_cpu_s']:.2f} CPU-s + "
                  f"{sm['setup_cpu_s_per_gb']:.2f} CPU-s per GB resident), applied to the survivors' new windows "
                  "(out of sample); the disk reads are the simulator's own throttle model."]
    atomic_write_text(RESULTS / "serve_validation.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    global RESULTS, JOURNAL, N_REQUESTS, LEVELS, PLAN_FILE, END_PROFILE, HOST_CONTENTION
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resume", action="store_true", help="keep the profile and the levels already measured")
    ap.add_argument("--analyze", action="store_true", help="only re-simulate and report from the journal")
    ap.add_argument("--results", default=None, help="write here instead of experiments/results (a trial run)")
    ap.add_argument("--requests", type=int, default=N_REQUESTS, help=f"requests per level ({N_REQUESTS})")
    ap.add_argument("--levels", default=None, help="offered load / predicted capacity, comma-separated (split a run "
                    "into parts: the first without --resume, the others with it)")
    ap.add_argument("--skip-leave", action="store_true", help="do not measure the device-leave run (yet)")
    ap.add_argument("--plan", default="", help="serve this plan (JSON) instead of Halda's on the first profile")
    ap.add_argument("--reprofile", action="store_true", help="with --resume: profile again before this part's "
                    "levels and predict them from that profile (the host drifts between holds)")
    ap.add_argument("--end-profile", action="store_true", help="profile the plan's devices again after this part's "
                    "levels; each level is then predicted from the device figures interpolated to its time")
    ap.add_argument("--per-request", default="", metavar="LEVEL", help="print one level's requests, measured beside "
                    "predicted (e.g. 0.2; with --results DIR for an earlier run)")
    ap.add_argument("--no-host-contention", action="store_true", help="an ablation: predict without the host CPUs' "
                    "contention (SimConfig.host_contention=False); use with --analyze --results DIR (a copy)")
    ap.add_argument("--nice", type=int, default=-5,
                    help="niceness of the profile, server and workers (-5: on a shared host the emulated devices get "
                         "their CPU quota; the others' CPU share is recorded per level)")
    ap.add_argument("--cpu-shares", type=int, default=8192,
                    help="CPU weight of the emulated devices' cgroups ($PRIMASIM_EMULATE_CPU_SHARES; 0 = the default "
                         "1024): on an oversubscribed host a device then gets its quota, still capped by it")
    a = ap.parse_args()
    if a.results:
        RESULTS = Path(a.results)
        JOURNAL = RESULTS / "serve_runs.jsonl"
    N_REQUESTS, PLAN_FILE, END_PROFILE = a.requests, a.plan, a.end_profile
    HOST_CONTENTION = not a.no_host_contention
    if a.levels:
        LEVELS = tuple(float(x) for x in a.levels.split(","))
    if a.per_request:
        per_request(a.per_request)
    elif a.analyze:
        analyze()
    else:
        if a.nice:
            os.nice(a.nice)
        if a.cpu_shares:
            os.environ["PRIMASIM_EMULATE_CPU_SHARES"] = str(a.cpu_shares)
        run(a.resume, a.skip_leave, a.reprofile)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
