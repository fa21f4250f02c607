"""Diagnostics of experiments/serve_validation.py: where a served token's time goes.

- `cpu_snapshot` / `cpu_delta`: every emulated device's CPU seconds (its worker process, all threads)
  and its cgroup's CFS bandwidth counters (periods, throttled periods, throttled time), the server
  process's and the load generator's CPU seconds, read before and after a load level: per token,
  how much CPU each device, the server and the client used and how long the quota held a device back.
- `measure_run` / `predict_run`: the same plan as one `primasim run` request (no server, no HTTP)
  on the same emulated cluster, before the server starts, and the simulator's prediction of it: the
  run against the simulator is the device model's error, the server's lone requests against the run
  are what serving adds.

None of the above feeds a prediction: it is reported beside the results (in-sample diagnostics).
One measurement here does, as the device profile does: `measure_path` / `path_of`, the server's own
path around the devices (HTTP in and the engine's hop to the head; the SSE stream out), timed on a
few lone requests to the idle server at the start of each hold, from the server's own timestamps.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RUN_TOKENS = 48  # the reference run's generated tokens (more gaps than a 16-token request: a steadier TPOT)


def _load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _proc_cpu_s(pid: int, main_thread: bool = False) -> float:
    """CPU seconds a process used so far (all its threads: utime + stime; or only its main thread,
    a worker's compute thread -- the rest is its background: control, sender, zmq, sampler)."""
    f = Path(f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of a process's threads, summed by thread name (`thread:<comm>`): which of a
    worker's threads (compute, control, sender, zmq, memory sampler, XLA's pool) takes its background."""
    out: dict[str, float] = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = (t / "stat").read_text()
            name = raw[raw.index("(") + 1:raw.rindex(")")]
            f = raw.rsplit(")", 1)[1].split()
            key = "thread:" + ("main" if t.name == str(pid) else name)
            out[key] = out.get(key, 0.0) + (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _cpu_stat(pid: int) -> dict[str, float]:
    """The CFS bandwidth counters of the cgroup v1 `cpu` group a process runs in."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrl, path = line.split(":", 2)
        if "cpu" in ctrl.split(","):
            st = Path(f"/sys/fs/cgroup/{ctrl}{path}/cpu.stat")
            if path != "/" and st.exists():
                kv = dict(x.split() for x in st.read_text().splitlines())
                return {"nr_periods": float(kv["nr_periods"]), "nr_throttled": float(kv["nr_throttled"]),
                        "throttled_s": float(kv["throttled_time"]) / 1e9}
    return {}


def cpu_snapshot(devices: dict[str, Any], server_pid: int) -> dict[str, Any]:
    """`devices`: the server's status()["devices"] (name -> {"pid": ...})."""
    out: dict[str, Any] = {"t": time.monotonic(), "server_cpu_s": _proc_cpu_s(server_pid),
                           "loadgen_cpu_s": sum(os.times()[:2]), "devices": {}}
    for name, d in devices.items():
        pid = d.get("pid")
        if pid:
            with contextlib.suppress(OSError, ValueError, KeyError):
                out["devices"][name] = {"cpu_s": _proc_cpu_s(int(pid)), "main_cpu_s": _proc_cpu_s(int(pid), True),
                                        **_cpu_stat(int(pid)), **_thread_cpu(int(pid))}
    return out


def cpu_delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: b[k] - a[k] for k in ("t", "server_cpu_s", "loadgen_cpu_s")}
    out["devices"] = {n: {k: v - a["devices"][n].get(k, 0.0) for k, v in d.items()}
                      for n, d in b["devices"].items() if n in a["devices"]}
    return out


def _token_times(trace: Any) -> list[list[float]]:
    by: dict[int, list[float]] = {}
    for t in trace.tokens:
        by.setdefault(int(t.seq), []).append(float(t.time))
    return [sorted(v) for _, v in sorted(by.items())]


def measure_run(plan: Any, cluster: Any, weights: Any, model: Any, prompt_tokens: int) -> dict[str, Any]:
    from primasim.core.trace import metrics
    from primasim.loop.validate import measure, prompt_ids

    l0 = _load1()
    res, host = measure(plan, weights, cluster, tokens=RUN_TOKENS, prompt=prompt_ids(prompt_tokens, model.vocab),
                        timeout=600)
    m = metrics(res.trace)
    return {"level": "run", "tokens": RUN_TOKENS, "load1_before": l0, "load1_after": _load1(),
            "foreign_cpu": host.foreign_share, "tpot_ms": m.tpot_ms, "tpot_p50_ms": m.tpot_p50_ms,
            "tpot_p90_ms": m.tpot_p90_ms, "ttft_ms": m.ttft_ms, "busy": m.busy, "times": _token_times(res.trace),
            "device_stats": {n: {k: v for k, v in d.items() if isinstance(v, int | float)}
                             for n, d in res.trace.device_stats.items()},
            "driver_cpu_s": res.trace.meta.get("driver_cpu_s")}


def predict_run(plan: Any, cluster: Any, model: Any, prompt_tokens: int, host_cpus: int = 0) -> dict[str, Any]:
    from primasim.loop.validate import predict

    sim = predict(plan, model, cluster, tokens=RUN_TOKENS, prompt_tokens=prompt_tokens, host_cpus=host_cpus)
    m = sim.metrics
    return {"tpot_ms": m.tpot_ms, "tpot_p50_ms": m.tpot_p50_ms, "tpot_p90_ms": m.tpot_p90_ms, "ttft_ms": m.ttft_ms,
            "busy": m.busy}


@contextlib.contextmanager
def predicted_cpu() -> Any:
    """Within the block, the simulator's devices on a shared host CPU record the CPU seconds they
    are charged (`CpuQuota.used`, contention included): yields a dict filled with device -> seconds
    when the block ends. (Wraps `CpuQuota.__init__` to find them: a diagnostic, not the model's API.)"""
    from primasim.sim import _cpu

    quotas: list[Any] = []
    init = _cpu.CpuQuota.__init__

    def collect(self: Any, dev: Any, *a: Any, **k: Any) -> None:
        init(self, dev, *a, **k)
        self.device_name = dev.spec.name
        quotas.append(self)

    out: dict[str, float] = {}
    _cpu.CpuQuota.__init__ = collect  # type: ignore[method-assign]
    try:
        yield out
    finally:
        _cpu.CpuQuota.__init__ = init  # type: ignore[method-assign]
        for q in quotas:
            if q.host is not None:
                out[q.device_name] = out.get(q.device_name, 0.0) + q.used


def compute_cpu_s(dev: dict[str, Any]) -> float:
    """A device's compute CPU seconds over a level: its main thread and XLA's executor thread (named
    after the process, "python": the head's output layer runs there), not the background threads."""
    return float(dev.get("main_cpu_s", 0.0)) + float(dev.get("thread:python", 0.0))


def contention_report(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: per level (`rate_req_s`, `tokens`; device -> CPU seconds `meas`ured, `pred`icted
    with the host CPUs' contention, and without it: `flat`), each device's compute CPU per generated
    token -- the contention each level met."""
    if not rows:
        return []
    names = sorted({n for t in rows for n, v in t["pred"].items() if v > 0})  # devices that compute
    lines = ["Contention the levels met: each device's compute CPU (main + XLA's executor thread) per generated "
             "token, measured / predicted (host contention as modelled) / predicted without it, ms. A device whose "
             "measured CPU per token rises with the load as the first prediction does met the modelled contention; "
             "one that stays as flat as the second did not:", "",
             "| offered req/s | " + " | ".join(f"{n} meas / pred / pred without" for n in names) + " |",
             "|---" * (1 + len(names)) + "|"]
    for t in rows:
        tok = t["tokens"]
        lines.append(f"| {t['rate_req_s']:.3f} | " + " | ".join(
            f"{1e3 * t['meas'].get(n, math.nan) / tok:.1f} / {1e3 * t['pred'][n] / tok:.1f} / "
            f"{1e3 * t['flat'].get(n, math.nan) / tok:.1f}" for n in names) + " |")
    return lines + [""]


def report(rows: dict[str, Any], levels: list[dict[str, Any]], pred_run: dict[str, Any] | None,
           tpot_p50: Callable[[dict[str, Any]], tuple[float | None, float | None]]) -> list[str]:
    """Markdown lines: the reference run against the simulator and the server, and per level the CPU
    per token of each device, the server and the load generator, and the quota's throttling.
    `tpot_p50(level)` -> (predicted, measured) P50 TPOT in ms."""
    lines = ["### Diagnostics (in sample: what the measurements say, nothing here feeds a prediction)", ""]
    ref = rows.get("run")
    if ref is not None and pred_run is not None and levels:
        p0, m0 = tpot_p50(levels[0])
        lines += [f"**One request without the server** (`primasim run`, the same plan and emulated cluster, "
                  f"{ref['tokens']} tokens, just before the server started; load {ref['load1_before']:.1f}): TPOT mean "
                  f"predicted {pred_run['tpot_ms']:.1f} / measured {ref['tpot_ms']:.1f} ms "
                  f"({(pred_run['tpot_ms'] - ref['tpot_ms']) / ref['tpot_ms'] * 100:+.1f} %), P50 "
                  f"{pred_run['tpot_p50_ms']:.1f} / {ref['tpot_p50_ms']:.1f} ms; TTFT {pred_run['ttft_ms']:.0f} / "
                  f"{ref['ttft_ms']:.0f} ms. The server's quietest level: P50 TPOT predicted {p0:.1f} / measured "
                  f"{m0:.1f} ms."]

        def per_token(x: dict[str, Any], dev: str) -> float:  # CPU-busy ms per pass, makespan ~ TTFT + (n-1) TPOT
            span = x["ttft_ms"] + (ref["tokens"] - 1) * x["tpot_ms"]
            return float(x["busy"].get(dev, {}).get("cpu", 0.0)) * span / ref["tokens"]
        devs = [n for n in ref["busy"] if ref["busy"][n].get("cpu")]
        lines += ["Per pass (prefill included), the run's compute time on each device, predicted / measured: "
                  + ", ".join(f"{n} {per_token(pred_run, n):.1f} / {per_token(ref, n):.1f} ms" for n in devs) + "."]
        abl = pred_run.get("call_ablation") or {}
        if abl:
            lines += [f"The per-call cost's share (an ablation, not a fit): the run's TPOT predicted with the probed "
                      f"per-call overhead x 1: {abl.get('1', math.nan):.1f} ms (the probe as measured), without any: "
                      f"{abl.get('0', math.nan):.1f} ms (measured {ref['tpot_ms']:.1f} ms)."]
        lines.append("")
    have = [r for r in levels if r.get("cpu")]
    if have:
        names = sorted({n for r in have for n in r["cpu"]["devices"]})
        lines += ["CPU per generated token (ms) over each level, from the worker processes' CPU time and their "
                  "cgroups' `cpu.stat` (throttled: time the CFS quota held the device back; background, where measured: the "
                  "worker's threads other than its compute thread -- control, sender, zmq, sampler -- under the same quota):", "",
                  "| offered req/s | tokens | " + " | ".join(f"{n} CPU / throttled (/ background)" for n in names)
                  + " | server CPU | load generator CPU |", "|---" * (4 + len(names)) + "|"]
        for r in have:
            c = r["cpu"]
            tok = sum(len(x["times"]) for x in r["records"])
            cells = [f"{r['rate']:.3f}", str(tok)]
            for n in names:
                d = c["devices"].get(n, {})
                bg = f" / {1e3 * (d['cpu_s'] - d['main_cpu_s']) / tok:.1f}" if "main_cpu_s" in d and tok else ""
                cells.append(f"{1e3 * d.get('cpu_s', 0) / tok:.1f} / {1e3 * d.get('throttled_s', 0) / tok:.1f}{bg}"
                             if tok else "-")
            cells += [f"{1e3 * c['server_cpu_s'] / tok:.1f}", f"{1e3 * c['loadgen_cpu_s'] / tok:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += thread_report(rows, have)
    return lines


def thread_report(rows: dict[str, Any], levels: list[dict[str, Any]]) -> list[str]:
    """Markdown: each worker's threads other than its compute thread, CPU ms per generated token and
    per second of wall time, over the path probes (lone requests to the idle server, apart from the
    levels) and over each level -- whether a background is a per-token or a per-second cost."""
    runs = [(f"path probe ({k.split(':', 1)[1]})", r) for k, r in rows.items() if k.startswith("path:") and r.get("cpu")]
    runs += [(f"{r['rate']:.3f} req/s", r) for r in levels]
    runs = [(lab, r) for lab, r in runs if any(k.startswith("thread:") for d in r["cpu"]["devices"].values() for k in d)]
    if not runs:
        return []
    lines = ["Background threads (all but the compute thread), CPU ms per generated token / per second:", "",
             "| run | tokens | wall s | " + " | ".join(["device: thread ms/token (ms/s)"]) + " |", "|---|---|---|---|"]
    for lab, r in runs:
        tok = sum(len(x["times"]) for x in r["records"])
        wall = float(r["cpu"]["t"])
        cells = []
        for n, d in sorted(r["cpu"]["devices"].items()):
            th = sorted(((k[7:], v) for k, v in d.items() if k.startswith("thread:") and k != "thread:main" and v > 0),
                        key=lambda kv: -kv[1])[:4]
            cells.append(f"{n}: " + ", ".join(f"{k} {1e3 * v / max(tok, 1):.1f} ({1e3 * v / max(wall, 1e-9):.0f})"
                                              for k, v in th))
        lines.append(f"| {lab} | {tok} | {wall:.0f} | " + "; ".join(cells) + " |")
    return [*lines, ""]


def ttft_split(recs: list[Any]) -> dict[str, float]:
    """Where the measured TTFT goes, from the server's own times (median ms over the level's requests):
    HTTP in (the client's send -> the server has the request), queue (-> a slot took it), prefill (->
    the head sampled the first token), out (-> the client read it from the SSE stream)."""
    parts: dict[str, list[float]] = {"http_in": [], "queue": [], "prefill": [], "sse_out": []}
    for r in recs:
        sv = r.server
        if not r.token_times or not all(k in sv for k in ("received", "admitted", "first_token")):
            continue
        parts["http_in"].append(sv["received"] - r.arrival)
        parts["queue"].append(sv["admitted"] - sv["received"])
        parts["prefill"].append(sv["first_token"] - sv["admitted"])
        parts["sse_out"].append(r.token_times[0] - sv["first_token"])
    return {f"split_{k}_ms": float(np.median(v)) * 1e3 for k, v in parts.items() if v}


def split_report(table: list[dict[str, Any]]) -> list[str]:
    """Markdown: the measured TTFT split by the server's own times, per level (medians)."""
    have = [t for t in table if "split_prefill_ms" in t]
    if not have:
        return []
    lines = ["Where the measured TTFT goes (medians over each level's requests, from the server's own times: the "
             "client's send -> the server has the request (HTTP in) -> a slot took it (queue) -> the head sampled "
             "the first token (prefill, waiting for the devices included) -> the client read it (SSE out)); the "
             "path probe of the same hold (lone requests, idle server: in = send -> admitted, out = SSE), which the "
             "prediction adds:", "",
             "| offered req/s | TTFT P50 meas ms | HTTP in | queue | prefill | predicted prefill | SSE out | "
             "probe in / out |", "|---" * 8 + "|"]
    for t in have:
        lines.append(f"| {t['rate_req_s']:.3f} | {t['meas_ttft_p50']:.0f} | {t.get('split_http_in_ms', math.nan):.1f} | "
                     f"{t.get('split_queue_ms', math.nan):.0f} | {t.get('split_prefill_ms', math.nan):.0f} | "
                     f"{t.get('pred_prefill_ms', math.nan):.0f} | "
                     f"{t.get('split_sse_out_ms', math.nan):.1f} | {t.get('path_in_ms', math.nan):.1f} / "
                     f"{t.get('path_out_ms', math.nan):.1f} |")
    return [*lines, ""]


def layer_ms(cluster: Any) -> dict[str, dict[str, float]]:
    """Per device, the probe's ms per layer at 1 and 16 tokens per call (its profile's sources)."""
    import re

    out = {}
    for d in cluster.devices:
        got = dict(re.findall(r"T=(\d+): ([\d.]+) ms/layer", d.sources.get("ram_bw_gbs", "")))
        if got:
            out[d.name] = {t: float(got[t]) for t in ("1", "16") if t in got}
    return out


def drift_report(rows: dict[str, Any], predict: Callable[[str], dict[str, Any]],
                 layers: Callable[[str], dict[str, dict[str, float]]] | None = None) -> list[str]:
    """Markdown: each profile (one per hold with --reprofile) and what it predicts for the plain run,
    beside the plain run measured in the same hold: the host's drift between holds, as measured."""
    profs = {"serve_cluster.toml": rows.get("profile:serve_cluster.toml", {})}
    profs.update({r["profile"]: r for k, r in rows.items() if k.startswith("profile:")})
    profs.update({r["file"]: r for k, r in rows.items() if k.startswith("profile_end:")})  # after the hold's levels
    if len(profs) < 2:
        return []
    lines = ["**Profiles per hold** (`--reprofile`: each hold's levels are predicted from the profile taken at its "
             "start; with `--end-profile` also the plan's devices probed after its levels, `*_end.toml`, and each level "
             "from the figures interpolated to its time): the plain `primasim run` of the plan predicted from each profile, and measured in the same "
             "hold, and the probe's ms per layer (1 / 16 tokens per call, at the quota's average rate) per device:", "",
             "| profile | taken | load1 | predicted TPOT / TTFT ms | measured TPOT / TTFT ms | err TPOT % | "
             "ms per layer |", "|---" * 7 + "|"]
    for name, r in profs.items():
        p = predict(name)
        hold = r.get("profile", name)  # an end profile: its hold's run
        m = rows.get("run" if hold == "serve_cluster.toml" else f"run:{hold}")
        when = time.strftime("%H:%M", time.gmtime(r["time"])) if r.get("time") else "-"
        meas = f"{m['tpot_ms']:.1f} / {m['ttft_ms']:.0f}" if m else "-"
        err = f"{(p['tpot_ms'] - m['tpot_ms']) / m['tpot_ms'] * 100:+.1f}" if m else "-"
        lay = layers(name) if layers else {}
        per = ", ".join(f"{d} {v.get('1', math.nan):.2f} / {v.get('16', math.nan):.2f}" for d, v in lay.items()
                        if v and d in ("desktop", "laptop"))
        lines.append(f"| {name} | {when} | {r.get('load1', math.nan):.1f} | {p['tpot_ms']:.1f} / {p['ttft_ms']:.0f} | "
                     f"{meas} | {err} | {per} |")
    return [*lines, ""]


PATH_PROBES = 6  # lone requests of the path probe (1.5 s apart: each is alone on the idle server)


def measure_path(url: str, model_id: str, prompt: int, vocab: int) -> list[Any]:
    """Lone requests to the idle server (prompt as the levels', 2 tokens); records with server times."""
    from primasim.core.workload import RequestSpec, Workload
    from primasim.serve.loadgen import replay

    wl = Workload(tuple(RequestSpec(-100 - i, 1.5 * i, prompt, 2) for i in range(PATH_PROBES)), "path probe")
    return replay(url, model_id, wl, vocab=vocab, timeout=300)


def path_of(recs: list[Any]) -> tuple[float, float]:
    """(in, out) seconds: medians of send -> admitted on the head (HTTP in + the engine's hop, no queue:
    the server is idle) and of the head's first token -> the client has it (SSE out)."""
    ins, outs = [], []
    for r in recs:
        sv = r.server
        if r.token_times and all(k in sv for k in ("admitted", "first_token")):
            ins.append(sv["admitted"] - r.arrival)
            outs.append(r.token_times[0] - sv["first_token"])
    return (float(np.median(ins)), float(np.median(outs))) if ins else (0.0, 0.0)
