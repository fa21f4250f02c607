"""Long runs (issue 7): 2,000 greedy tokens on the emulated cluster with worker memory measured,
and the same tokens (and logits) as a single-device run of the same model.

Longer than ~600 lines: one experiment end to end (model, cluster run, single-device reference,
memory sampling, the report), kept in one script so a run reads top to bottom.

Model: `llama-long-180m`, a random-weight f32 Llama (12 blocks, hidden 512, 8 heads = 8 KV heads
of 64, SwiGLU 1536, vocab 4096, max_position_embeddings 4096; 173 MB) written once into the cache
with `primasim.runtime.head.cached_random_weights`. llama-mini-300m's context is 2048 and its ring takes
~230 ms a token on home-emu; this one holds 4096 positions, and its KV cache is large for its size
(48 KiB per token over 12 layers), so KV growth would be plain to see next to everything else.

Cluster run: `home-emu` (4 emulated devices: cgroups v1 + network namespaces as root, plain
processes otherwise), plan `even` with k = 2 (12 layers -> windows 2/2/1/1 per lap: desktop and
laptop 4 layers each, tablet and phone 2), prompt of 8 ids, `--tokens` greedy tokens, the head's
logits returned with every token. A side thread samples every worker process every `--interval` s:
/proc/PID/status (VmRSS, RssAnon, RssFile, RssShmem) and its memory cgroup (memory.usage_in_bytes,
memory.stat rss / cache / mapped_file). Each sample gets the token index by the driver's arrival
time of the tokens (same clock as the sampler).

Single-device run: a child process (`--single`) loads the whole model (file-backed) and runs
`runtime.generate` on the same prompt with the same KV length, keeping logits; it is sampled the
same way. Token ids and logits are compared.

KV accounting: per worker 2 * layers * n_kv_heads * head_dim * 4 bytes per token. The runtime
allocates the KV caches at set-up with jnp.zeros, which XLA writes, so their pages are resident
before the first token (the probe below measures it); the anonymous memory the KV cache adds during
decode is then zero, and any anonymous growth during decode is not KV.

Two sources of growth found by this experiment are gone from the runtime (runtime/worker/): the
worker's trace recorder kept every span and sample in Python lists until the driver's STATS
(3.6-4.1 KB a token per worker at 97119e8) and now spills them to an unlinked temporary file in
fixed-size records (the report still counts what the lists would have held, and the file's page
cache shows in the cgroup cache column); and each attention-span bucket (256, 512, 1024, ...
positions) compiled a new shape at its first token (21-32 MiB steps at tokens 249/505/1017) and
is now compiled at set-up, up to the KV length, so decode compiles nothing.

    sudo .venv/bin/python experiments/long_run.py        # ~4.5 min here; writes experiments/results/long_run.*
    python experiments/long_run.py --tokens 200 --no-emulate --out /tmp/lr   # quick, plain processes
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from primasim.core.io import atomic_open, atomic_savefig, atomic_write_bytes, atomic_write_text
from primasim.core.model import ModelSpec
from primasim.runtime.running import worker_pids

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "experiments" / "results"
PROMPT = [1, 17, 301, 4000, 42, 999, 7, 2048]
MODEL = ModelSpec(name="llama-long-180m", family="llama", n_layers=12, hidden=512, n_heads=8, n_kv_heads=8,
                  head_dim=64, ffn=1536, vocab=4096, rope_theta=500000.0, max_context=4096, quant="f32",
                  source="experiments/long_run.py")
# decode analysed from this token on: the single-device process compiles its decode step at token 1
FROM_TOKEN = 3
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
CG_KEYS = ("rss", "cache", "mapped_file")


def kv_bytes_per_token(spec: ModelSpec, layers: int) -> int:
    """f32 K and V of one token on `layers` layers."""
    return 2 * layers * spec.n_kv_heads * spec.head_dim * 4


# ================================================================================ sampling
def proc_memory(pid: int) -> dict[str, float] | None:
    """RSS figures of a process (bytes) and of its memory cgroup (cgroup v1), or None if gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cgs = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    out: dict[str, float] = {}
    for k in STATUS_KEYS:
        m = re.search(rf"^{k}:\s+(\d+) kB", status, re.M)
        out[k] = float(m.group(1)) * 1024 if m else float("nan")
    m = re.search(r"^\d+:(?:[^:]*,)?memory(?:,[^:]*)?:(.*)$", cgs, re.M)
    # only an emulated device's own memory cgroup (primasim-e...): a shared one says nothing per worker
    cg = Path("/sys/fs/cgroup/memory") / m.group(1).lstrip("/") if m and "primasim-e" in m.group(1) else None
    out["cg_usage"] = float("nan")
    for k in CG_KEYS:
        out[f"cg_{k}"] = float("nan")
    if cg is not None:
        try:
            out["cg_usage"] = float((cg / "memory.usage_in_bytes").read_text())
            st = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines())
            for k in CG_KEYS:
                out[f"cg_{k}"] = float(st.get(k, "nan"))
        except (OSError, ValueError):
            pass
    return out


class Sampler(threading.Thread):
    """Samples the memory of a set of processes every `interval` s until stopped."""

    def __init__(self, interval: float, pids: dict[str, int] | None = None, parent: int | None = None) -> None:
        super().__init__(name="long-run-sampler", daemon=True)
        self.interval = interval
        self.pids = dict(pids or {})
        self.parent = parent
        self.rows: list[dict[str, Any]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        next_scan = 0.0
        while not self.stop_event.is_set():
            t = time.time()
            if self.parent is not None and t >= next_scan:
                self.pids.update(worker_pids(self.parent))
                next_scan = t + 2.0
            for dev, pid in list(self.pids.items()):
                m = proc_memory(pid)
                if m is not None:
                    self.rows.append({"time": t, "device": dev, "pid": pid, **m})
            self.stop_event.wait(max(0.0, self.interval - (time.time() - t)))

    def stop(self) -> list[dict[str, Any]]:
        self.stop_event.set()
        self.join(timeout=5)
        return self.rows


# ================================================================================ runs
def checkpoint(spec: ModelSpec = MODEL) -> Path:
    from primasim.runtime.head import cached_random_weights

    return cached_random_weights(spec)


def kv_probe(path: Path, max_seq: int) -> dict[str, float]:
    """Whether the runtime's KV allocation (init_kv, as a worker's set-up) is resident at once:
    RssAnon before/after allocating the whole model's cache in a fresh process."""
    code = f"""
import json, re, jax, jax.numpy as jnp
from primasim.runtime.head import open_weights
from primasim.runtime.model import init_kv
def anon():
    return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
spec = open_weights({str(path)!r}).spec
jnp.zeros(8).block_until_ready()
a0 = anon()
kv = init_kv(spec, range(spec.n_layers), {max_seq})
jax.block_until_ready(kv.layers)
print(json.dumps({{"anon_delta": anon() - a0,
                   "nominal": 2 * spec.n_layers * spec.n_kv_heads * ({max_seq} + 1) * spec.head_dim * 4}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_cluster(path: Path, cluster_name: Any, tokens: int, k: int, interval: float, emulate: bool,
                prompt: list[int] = PROMPT) -> dict[str, Any]:
    from primasim import make_plan
    from primasim.core.cluster import load_cluster
    from primasim.core.runtime_facts import runtime_model
    from primasim.runtime.head import RunOptions, open_weights, run_plan

    ckpt = open_weights(path)
    cluster = load_cluster(cluster_name) if isinstance(cluster_name, str) else cluster_name
    need = len(prompt) + tokens
    outcome = make_plan("even", runtime_model(ckpt.spec), cluster, n_ctx=need, prompt_tokens=len(prompt), k=k)
    if not outcome.feasible or outcome.plan is None:
        raise SystemExit(f"plan not feasible: {outcome.reason}")
    plan = outcome.plan
    arrivals: list[float] = []
    logits = np.zeros((tokens, ckpt.spec.vocab), np.float32)

    def on_token(t: dict[str, Any]) -> None:
        arrivals.append(time.time())
        lg = t.get("logits")
        if lg is not None:
            logits[int(t["index"])] = np.asarray(lg, np.float32)
            lg.clear()  # the driver keeps every token's dict: drop the float list once copied

    sampler = Sampler(interval, parent=os.getpid())
    sampler.start()
    t0 = time.time()
    try:
        res = run_plan(plan, ckpt, cluster, [list(prompt)],
                       RunOptions(max_new_tokens=tokens, return_logits=True, emulate=emulate, max_seq=need,
                                  token_timeout=300.0), on_token=on_token)
    finally:
        rows = sampler.stop()
    wall = time.time() - t0
    layers = {d.name: 0 for d in plan.devices}
    for s in plan.segments():
        layers[s.device] += s.end - s.start
    return {"plan": plan, "rows": rows, "arrivals": arrivals, "tokens": res.token_ids[0], "logits": logits,
            "wall_s": wall, "setup_s": arrivals[0] - t0 if arrivals else float("nan"), "layers": layers, "trace": res.trace, "emulation": res.emulation,
            "tpot_ms": res.to_json().get("tpot_ms"), "max_seq": need}


def single_child(path: str, tokens: int, out: str, prompt: list[int] = PROMPT) -> None:
    """(child process) the whole model on one device: runtime.generate, greedy, logits kept."""
    from primasim.runtime import generate, load_params, open_checkpoint

    ckpt = open_checkpoint(path)
    params = load_params(ckpt, range(ckpt.spec.n_layers), embed=True, head=True)
    times: list[float] = []
    t_start = time.time()
    gen = generate(params, list(prompt), tokens, keep_logits=True, max_seq=len(prompt) + tokens,
                   on_token=lambda _tok: times.append(time.time()))
    np.savez(out, tokens=np.asarray(gen.tokens, np.int64), logits=np.stack(gen.logits).astype(np.float32),
             times=np.asarray(times), t_start=t_start)


def run_single(path: Path, tokens: int, interval: float, work: Path) -> dict[str, Any]:
    out = work / "long_run_single.npz"
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--single", str(path),
                             "--tokens", str(tokens), "--single-out", str(out)], cwd=ROOT)
    sampler = Sampler(interval, pids={"single": proc.pid})
    sampler.start()
    rc = proc.wait()
    rows = sampler.stop()
    if rc != 0:
        raise SystemExit(f"single-device run failed (exit {rc})")
    z = np.load(out)
    res = {"rows": rows, "arrivals": list(z["times"]), "tokens": [int(x) for x in z["tokens"]],
           "logits": z["logits"], "wall_s": time.time() - t0}
    out.unlink(missing_ok=True)
    return res


# ================================================================================ analysis
def attach_tokens(rows: list[dict[str, Any]], arrivals: list[float]) -> None:
    """token = tokens delivered by the sample's time (0 before the first; phase setup/decode/done)."""
    first, last = (arrivals[0], arrivals[-1]) if arrivals else (float("inf"), float("inf"))
    for r in rows:
        r["token"] = bisect.bisect_right(arrivals, r["time"])
        r["phase"] = "setup" if r["time"] < first else ("decode" if r["time"] <= last else "done")


def fit(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.polyfit(x, y, 1)[0]) if len(x) >= 3 and np.ptp(x) > 0 else float("nan")


def analyse_device(rows: list[dict[str, Any]], kv_bpt: int, tokens: int, prompt_len: int = len(PROMPT)) -> dict[str, Any]:
    """Memory over the decode of one process: growth from the first token to the last, the slope
    (least squares over tokens), and the same for the second half only (bounded growth flattens)."""
    dec = [r for r in rows if r["phase"] == "decode" and r["token"] >= FROM_TOKEN]
    if len(dec) < 4:
        return {"samples": len(dec)}
    tok = np.array([r["token"] for r in dec], float)
    out: dict[str, Any] = {"samples": len(dec), "kv_bytes_per_token": kv_bpt,
                           "kv_bytes_total": kv_bpt * tokens}
    half = tok >= tok.max() / 2
    for key in ("RssAnon", "RssFile", "VmRSS", "cg_usage", "cg_rss", "cg_cache"):
        y = np.array([r[key] for r in dec], float)
        if not np.isfinite(y).all():
            continue
        n = max(1, len(y) // 20)  # growth: mean of the last 5 % of samples minus the first 5 %
        out[key] = {"start": float(np.mean(y[:n])), "end": float(np.mean(y[-n:])), "min": float(y.min()),
                    "max": float(y.max()), "growth": float(np.mean(y[-n:]) - np.mean(y[:n])),
                    "slope": fit(tok, y), "slope_2nd_half": fit(tok[half], y[half])}
    # between the attention-span buckets (256, 512, ... positions: a new jitted shape each, compiled on
    # first use): least-squares slope inside each stretch, weighted by its tokens
    if "RssAnon" in out:
        edges = [0] + [b - prompt_len for b in (256, 512, 1024, 2048, 4096, 8192) if 0 < b - prompt_len < tokens] \
            + [tokens + 1]
        segs = []
        for lo, hi in zip(edges, edges[1:], strict=False):
            m = (tok >= lo + 12) & (tok < hi - 3)
            if m.sum() >= 8:
                y = np.array([r["RssAnon"] for r in dec], float)[m]
                segs.append({"from": int(lo + 12), "to": int(hi - 4), "slope": fit(tok[m], y), "n": int(np.ptp(tok[m]))})
        w = sum(g["n"] for g in segs)
        out["RssAnon"]["segments"] = segs
        out["RssAnon"]["slope_between_buckets"] = sum(g["slope"] * g["n"] for g in segs) / w if w else float("nan")
        out["RssAnon"]["growth_in_steps"] = out["RssAnon"]["growth"] - out["RssAnon"]["slope_between_buckets"] * (
            tok.max() - tok.min())
    pre = [r for r in rows if r["phase"] == "setup"]
    if pre:
        out["setup_last"] = {k: pre[-1][k] for k in ("RssAnon", "RssFile", "VmRSS", "cg_usage")}
    return out


def steps_in_anon(rows: list[dict[str, Any]], min_step: float = 512 * 1024) -> list[tuple[int, float]]:
    """(token, bytes) of jumps in RssAnon between consecutive decode samples larger than min_step."""
    dec = [r for r in rows if r["phase"] == "decode"]
    return [(int(b["token"]), float(b["RssAnon"] - a["RssAnon"])) for a, b in zip(dec, dec[1:], strict=False)
            if abs(b["RssAnon"] - a["RssAnon"]) >= min_step]


def recorder_bytes(trace: Any, device: str, first_token_time: float) -> dict[str, float]:
    """What the worker's own trace recorder keeps in Python lists during the decode (it holds every
    span and sample until the driver asks for them at the end): counts from the returned trace,
    bytes by building the same objects here under tracemalloc (an upper bound: every name string a
    new object, as after JSON decoding)."""
    import tracemalloc

    spans = [sp for sp in trace.spans if sp.device == device and sp.end >= first_token_time]
    samples = [sm for sm in trace.samples if sm.device == device and sm.time >= first_token_time]
    n_mem = sum(1 for sm in samples if sm.name == "mem_available_bytes")
    n_smp = len(samples) - n_mem
    tracemalloc.start()
    a0 = tracemalloc.get_traced_memory()[0]
    keep_s = [[sp.resource, sp.start + 1e9, sp.end + 1e9, "".join(list(sp.name)), sp.seq, sp.token,
               float(sp.nbytes)] for sp in spans]
    a1 = tracemalloc.get_traced_memory()[0]
    keep_m = [["".join(list(sm.name)), sm.time + 1e9, sm.value + 0.5] for sm in samples if sm.name != "mem_available_bytes"]
    a2 = tracemalloc.get_traced_memory()[0]
    keep_v = [(sm.time + 1e9, sm.value + 0.5) for sm in samples if sm.name == "mem_available_bytes"]
    a3 = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del keep_s, keep_m, keep_v
    return {"spans": len(spans), "samples": n_smp, "mem_samples": n_mem, "bytes_spans": a1 - a0,
            "bytes_samples": a2 - a1, "bytes_mem_samples": a3 - a2, "bytes": a3 - a0}


def compare(a: list[int], b: list[int], la: np.ndarray, lb: np.ndarray) -> dict[str, Any]:
    n = min(len(a), len(b))
    div = next((i for i in range(n) if a[i] != b[i]), None)
    m = min(len(la), len(lb), n if div is None else div + 1)
    d = np.abs(la[:m].astype(np.float64) - lb[:m].astype(np.float64)).max(axis=1) if m else np.zeros(0)
    srt = np.sort(lb[:m], axis=1) if m else np.zeros((0, 2))
    margin = srt[:, -1] - srt[:, -2] if m else np.zeros(0)
    return {"compared": n, "identical": div is None and len(a) == len(b), "first_divergence": div,
            "logit_max_abs_diff": float(d.max()) if m else None,
            "logit_max_abs_diff_at": int(np.argmax(d)) if m else None,
            "logit_median_abs_diff": float(np.median(d)) if m else None,
            "min_top2_margin": float(margin.min()) if m else None,
            "min_top2_margin_at": int(np.argmin(margin)) if m else None}


# ================================================================================ outputs
def write_csv(path: Path, rows: list[dict[str, Any]], devices: list[str], kv_bpt: dict[str, int]) -> None:
    """One row per sampling instant: time, token, phase, and per device its memory figures."""
    by_t: dict[float, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_t.setdefault(round(r["time"], 3), {})[r["device"]] = r
    cols = ["VmRSS", "RssAnon", "RssFile", "RssShmem", "cg_usage", "cg_rss", "cg_cache", "cg_mapped_file"]
    t0 = min(by_t) if by_t else 0.0
    with atomic_open(path, "w") as f:
        f.write(",".join(["time_s", "token", "phase"] + [f"{d}_{c}" for d in devices for c in cols]
                         + [f"{d}_kv_expected" for d in devices]) + "\n")
        for t in sorted(by_t):
            g = by_t[t]
            any_r = next(iter(g.values()))
            vals = [f"{t - t0:.3f}", str(any_r["token"]), any_r["phase"]]
            for d in devices:
                r = g.get(d)
                vals += ["" if r is None or not np.isfinite(r[c]) else str(int(r[c])) for c in cols]
            vals += [str(kv_bpt[d] * int(any_r["token"])) for d in devices]
            f.write(",".join(vals) + "\n")


def plot(path: Path, rows: list[dict[str, Any]], devices: list[str], kv_bpt: dict[str, int],
         single_rows: list[dict[str, Any]], single_kv: int, tpot: list[tuple[int, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(17, 5))
    colors = dict(zip(devices + ["single"], plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))

    def series(rs: list[dict[str, Any]], dev: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        d = [r for r in rs if r["device"] == dev and r["phase"] == "decode" and r["token"] >= FROM_TOKEN]
        if not d:
            return np.zeros(0), np.zeros(0)
        x = np.array([r["token"] for r in d], float)
        y = np.array([r[key] for r in d], float)
        return x, (y - y[: max(1, len(y) // 20)].mean()) / 2**20

    for dev in devices + ["single"]:
        rs = single_rows if dev == "single" else rows
        kv = single_kv if dev == "single" else kv_bpt[dev]
        x, y = series(rs, dev, "RssAnon")
        if not len(x):
            continue
        ax[0].plot(x, y, color=colors[dev], lw=1.2, label=f"{dev} RssAnon")
        ax[0].plot([0, x.max()], [0, kv * x.max() / 2**20], color=colors[dev], ls="--", lw=0.8,
                   label=f"{dev} KV if backed per token ({kv / 1024:.0f} KiB/tok)")
        x, y = series(rs, dev, "RssFile")
        ax[1].plot(x, y, color=colors[dev], lw=1.2, label=f"{dev} RssFile")
        x, y = series(rs, dev, "cg_usage")
        if len(y) and np.isfinite(y).all():
            ax[1].plot(x, y, color=colors[dev], lw=0.8, ls=":", label=f"{dev} cgroup usage")
    ax[0].set(xlabel="token", ylabel="growth since token 1 (MiB)",
              title="anonymous memory per worker vs the KV-only expectation")
    ax[0].legend(fontsize=7)
    ax[1].set(xlabel="token", ylabel="growth since token 1 (MiB)", title="file-backed RSS and cgroup usage")
    ax[1].legend(fontsize=7)
    if tpot:
        ax[2].plot([t for t, _ in tpot], [v for _, v in tpot], lw=0.6, color="0.3")
        ax[2].set(xlabel="token", ylabel="ms", title="time between tokens at the driver (cluster)")
        ax[2].set_ylim(0, np.percentile([v for _, v in tpot], 99.5) * 1.3)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)


def mib(x: float) -> str:
    return f"{x / 2**20:+.2f} MiB" if np.isfinite(x) else "-"


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def per_token_diff(la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    m = min(len(la), len(lb))
    return np.abs(la[:m].astype(np.float64) - lb[:m].astype(np.float64)).max(axis=1)


def finish(raw: dict[str, Any], out: Path) -> dict[str, Any]:
    """Analysis and outputs (csv, png, md, json summary) from the raw measurements."""
    spec = MODEL
    cl_rows, sg_rows = raw["cluster_rows"], raw["single_rows"]
    attach_tokens(cl_rows, raw["cluster_arrivals"])
    attach_tokens(sg_rows, raw["single_arrivals"])
    layers = raw["layers"]
    devices = [d for d in layers if layers[d] > 0]
    n = raw["tokens"]
    kv_bpt = {d: kv_bytes_per_token(spec, layers[d]) for d in devices}
    single_kv = kv_bytes_per_token(spec, spec.n_layers)
    per_dev = {}
    for d in devices:
        rows = [r for r in cl_rows if r["device"] == d]
        v = analyse_device(rows, kv_bpt[d], n)
        v["anon_steps"] = steps_in_anon(rows)
        v["layers"] = layers[d]
        rec = dict(raw["recorder"][d])
        rec["bytes_per_token"] = rec["bytes"] / max(1, n - FROM_TOKEN)
        v["recorder"] = rec
        if "RssAnon" in v:  # KV adds 0 (resident from set-up); the recorder's records are on disk
            an = v["RssAnon"]
            an["growth_per_token"] = an["growth"] / max(1, n - FROM_TOKEN)
        per_dev[d] = v
    single = analyse_device(sg_rows, single_kv, n)
    single["anon_steps"] = steps_in_anon(sg_rows)
    arr = np.asarray(raw["cluster_arrivals"])
    tpot = [(i + 1, float(v) * 1e3) for i, v in enumerate(np.diff(arr))]
    sarr = np.asarray(raw["single_arrivals"])
    summary = {k: raw[k] for k in ("command", "cluster", "emulated", "limitations", "plan", "k", "layers", "prompt",
                                   "tokens", "max_seq", "kv_probe", "cluster_wall_s", "single_wall_s",
                                   "total_wall_s", "git_head", "agreement")}
    summary["cluster_setup_s"] = raw.get("cluster_setup_s")
    summary.update({
        "model": {"name": spec.name, "n_layers": spec.n_layers, "hidden": spec.hidden, "n_heads": spec.n_heads,
                  "n_kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim, "ffn": spec.ffn, "vocab": spec.vocab,
                  "max_context": spec.max_context, "checkpoint": raw["checkpoint"]},
        "tpot_ms_median": float(np.median(np.diff(arr)) * 1e3) if len(arr) > 1 else None,
        "tpot_ms_first_100": float(np.median(np.diff(arr[:101])) * 1e3) if len(arr) > 2 else None,
        "tpot_ms_last_100": float(np.median(np.diff(arr[-101:])) * 1e3) if len(arr) > 2 else None,
        "single_tpot_ms_median": float(np.median(np.diff(sarr)) * 1e3) if len(sarr) > 1 else None,
        "decode_s": float(arr[-1] - arr[0]) if len(arr) else None,
        "devices": per_dev, "single": single, "token_ids_head": raw["cluster_tokens"][:32],
    })
    atomic_write_text(out / "long_run.json", json.dumps(summary, indent=1, default=str))
    write_csv(out / "long_run.csv", cl_rows, devices, kv_bpt)
    write_csv(out / "long_run_single.csv", sg_rows, ["single"], {"single": single_kv})
    plot(out / "long_run.png", cl_rows, devices, kv_bpt, sg_rows, single_kv, tpot)
    atomic_write_text(out / "long_run.md", report(summary))
    print(report(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--cluster", default="home-emu")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--interval", type=float, default=0.25, help="s between memory samples")
    ap.add_argument("--no-emulate", action="store_true", help="plain processes (no cgroups / namespaces)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--analyze", action="store_true", help="rebuild the outputs from OUT/long_run_raw.json.gz")
    ap.add_argument("--single", metavar="CKPT", help=argparse.SUPPRESS)
    ap.add_argument("--single-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.single:
        single_child(a.single, a.tokens, a.single_out)
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.analyze:
        with gzip.open(out / "long_run_raw.json.gz", "rt") as f:
            finish(json.load(f), out)
        return 0
    cmd = "python experiments/long_run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t_all = time.time()
    path = checkpoint()
    need = len(PROMPT) + a.tokens
    probe = kv_probe(path, need)
    print(f"KV probe: init_kv of {probe['nominal'] / 2**20:.1f} MiB -> RssAnon +{probe['anon_delta'] / 2**20:.1f} MiB",
          flush=True)

    cl = run_cluster(path, a.cluster, a.tokens, a.k, a.interval, not a.no_emulate)
    print(f"cluster: {len(cl['tokens'])} tokens in {cl['wall_s']:.1f} s", flush=True)
    sg = run_single(path, a.tokens, a.interval, out)
    print(f"single: {len(sg['tokens'])} tokens in {sg['wall_s']:.1f} s", flush=True)
    # the decode window in the trace's clock (trace timestamps): the stamp of the token analysis starts from
    t_first = sorted(t.time for t in cl["trace"].tokens)[FROM_TOKEN - 1]
    raw = {"command": cmd, "cluster": a.cluster, "tokens": a.tokens, "max_seq": need, "prompt": PROMPT,
           "checkpoint": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
           "emulated": bool(cl["emulation"].get("emulated")),
           "limitations": [str(x) for x in cl["emulation"].get("limitations", [])],
           "plan": cl["plan"].describe(), "k": cl["plan"].k, "layers": cl["layers"], "kv_probe": probe,
           "cluster_wall_s": cl["wall_s"], "cluster_setup_s": cl["setup_s"], "single_wall_s": sg["wall_s"], "total_wall_s": time.time() - t_all,
           "git_head": _git_head(),
           "recorder": {d: recorder_bytes(cl["trace"], d, t_first) for d in cl["layers"] if cl["layers"][d] > 0},
           "cluster_rows": cl["rows"], "cluster_arrivals": cl["arrivals"], "cluster_tokens": cl["tokens"],
           "single_rows": sg["rows"], "single_arrivals": sg["arrivals"], "single_tokens": sg["tokens"],
           "agreement": compare(cl["tokens"], sg["tokens"], cl["logits"], sg["logits"]),
           "logit_diff_per_token": per_token_diff(cl["logits"], sg["logits"]).tolist()}
    atomic_write_bytes(out / "long_run_raw.json.gz", gzip.compress(json.dumps(raw).encode()))
    finish(raw, out)
    return 0


def report(s: dict[str, Any]) -> str:
    n = s["tokens"]
    setup = s.get("cluster_setup_s")
    setup_txt = f"set-up to the first token {setup:.0f} s, " if setup is not None else ""
    ag = s["agreement"]
    L = [f"# Long run: {n} tokens on `{s['cluster']}`, worker memory and single-device agreement", "",
         f"Command: `sudo .venv/bin/{s['command'].strip()}` on the working tree at {s.get('git_head', '?')} (with uncommitted runtime/ edits of the time; devices emulated: "
         f"{'yes' if s['emulated'] else 'NO'}). Wall time {s['total_wall_s']:.0f} s: cluster run "
         f"{s['cluster_wall_s']:.0f} s ({setup_txt}decode {s['decode_s']:.0f} s, median {s['tpot_ms_median']:.1f} ms a token), "
         f"single-device run {s['single_wall_s']:.0f} s.", "",
         f"Model `{s['model']['name']}` (random weights, f32; {s['model']['n_layers']} blocks, hidden "
         f"{s['model']['hidden']}, {s['model']['n_kv_heads']} KV heads of {s['model']['head_dim']}, vocab "
         f"{s['model']['vocab']}, context {s['model']['max_context']}); prompt {s['prompt']}, greedy, "
         f"KV sized {s['max_seq']}. Plan: even, k = {s['k']} ({s['plan']}).", ""]
    dv = [v for v in s["devices"].values() if "RssAnon" in v]
    if dv:
        per_tok = [v["RssAnon"]["growth_per_token"] for v in dv]
        slopes = [v["RssAnon"]["slope"] for v in dv]
        last = [v["RssAnon"]["segments"][-1] for v in dv if v["RssAnon"]["segments"]]
        steps = [f"{d} {b / 2**20:+.1f} MiB at token {t}" for d, v in s["devices"].items() for t, b in v.get("anon_steps", [])]
        rec_bpt = [v["recorder"]["bytes_per_token"] for v in dv]
        L += ["**Headline.** " + ("Tokens: all identical to the single-device run, logits bit-identical. "
              if ag["identical"] and ag["logit_max_abs_diff"] == 0 else
              f"Tokens identical: {ag['identical']} (first divergence {ag['first_divergence']}), max logit "
              f"difference {ag['logit_max_abs_diff']:.2e}. ") +
              f"Worker memory: KV resident from set-up (adds 0 B/token); anonymous memory over the decode grows "
              f"{min(per_tok):+.0f} to {max(per_tok):+.0f} B/token (total over {n} tokens "
              f"{min(v['RssAnon']['growth'] for v in dv) / 2**20:+.2f} to "
              f"{max(v['RssAnon']['growth'] for v in dv) / 2**20:+.2f} MiB; least-squares slopes {min(slopes):+.0f} to "
              f"{max(slopes):+.0f} B/token; over the last stretch, tokens {last[0]['from']}-{last[0]['to']}, "
              f"{min(g['slope'] for g in last):+.0f} to {max(g['slope'] for g in last):+.0f} B/token). One-off steps of "
              f">= 0.5 MiB during the decode: {', '.join(steps) or 'none'} (21-32 MiB a worker before, from compiling "
              f"each attention-span bucket at its first token; the buckets are now compiled at set-up and the decode "
              f"compiles nothing, so a step left is the allocator's heap growing). The trace recorder's spans "
              f"and samples ({min(rec_bpt):.0f}-{max(rec_bpt):.0f} B/token as Python lists) are spilled to an "
              f"unlinked temporary file, not kept in memory. File-backed RSS: flat (weights resident, "
              f"{max(abs(v['RssFile']['growth']) for v in dv) / 2**20:.2f} MiB max change); cgroup page cache "
              f"{min(v.get('cg_cache', {}).get('growth', float('nan')) for v in dv) / 2**20:+.2f} to "
              f"{max(v.get('cg_cache', {}).get('growth', float('nan')) for v in dv) / 2**20:+.2f} MiB (the recorder's "
              f"file; reclaimable).", ""]
    if s["limitations"]:
        L += ["Emulation limitations: " + "; ".join(map(str, s["limitations"])), ""]
    L += ["## Tokens", ""]
    if ag["identical"]:
        L.append(f"All {ag['compared']} token ids are identical to the single-device run.")
    else:
        L.append(f"Token ids differ from the single-device run from token {ag['first_divergence']} on "
                 f"(of {ag['compared']}).")
    L += [f"Head logits vs single-device logits (up to the first divergence): max abs difference "
          f"{ag['logit_max_abs_diff']:.2e} (token {ag['logit_max_abs_diff_at']}), median per token "
          f"{ag['logit_median_abs_diff']:.2e}; the smallest top-1/top-2 margin of the single-device logits was "
          f"{ag['min_top2_margin']:.2e} (token {ag['min_top2_margin_at']}).", "",
          "## Memory per worker over the decode", "",
          f"KV probe: the runtime's set-up allocation (`init_kv`, jnp.zeros) of the whole model's cache "
          f"({s['kv_probe']['nominal'] / 2**20:.1f} MiB) raised RssAnon by {s['kv_probe']['anon_delta'] / 2**20:.1f} MiB"
          " before any token: the KV pages are resident from set-up, so the KV cache adds 0 bytes of anonymous"
          " memory per decoded token (net of KV = the measured figure) and the expectation column is what"
          " per-token backing would add.", "",
          "Growth = mean of the last 5 % of decode samples minus the first 5 % (from token "
          f"{FROM_TOKEN}); growth per token = that growth over the decoded tokens; slopes are least squares in bytes"
          " per token. Two former sources of anonymous growth, neither of them KV, are checked here: (1) steps when"
          " the sequence crosses an attention-span bucket (prompt + tokens = 256, 512, 1024: one more jitted shape per"
          " bucket, now compiled at set-up; 'in bucket steps' = growth minus the slope between the steps times the"
          " tokens), and (2) the worker's trace recorder, which kept every span and sample in Python lists until"
          " the driver collected them (3.6-4.1 KB/token per worker before) and now spills them to an unlinked"
          " temporary file; its column gives what the lists would have held (counted from the returned trace,"
          " sized by building the same objects under tracemalloc).", "",
          "| worker | layers | KV expected B/token (total) | RssAnon growth (in bucket steps) | **RssAnon growth "
          "B/token** | slope between steps B/token | recorder as lists B/token (now on disk) | RssFile growth | "
          "cgroup usage growth | cgroup cache growth |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    rows = [(d, v) for d, v in s["devices"].items()] + [("single device", s["single"])]
    for d, v in rows:
        if "RssAnon" not in v:
            L.append(f"| {d} | - | too few samples | | | | | | | |")
            continue
        an = v["RssAnon"]
        cg = v.get("cg_usage", {})
        cc = v.get("cg_cache", {})
        layers = v.get("layers", s["model"]["n_layers"])
        rec = v.get("recorder")
        L.append(f"| {d} | {layers} | {v['kv_bytes_per_token']} ({v['kv_bytes_total'] / 2**20:.1f} MiB) | "
                 f"{mib(an['growth'])} ({mib(an['growth_in_steps'])}) | "
                 f"**{an['growth'] / max(1, n - FROM_TOKEN):+.0f}** | {an['slope_between_buckets']:+.0f} | "
                 + (f"{rec['bytes_per_token']:.0f} | " if rec else "- | ")
                 + f"{mib(v['RssFile']['growth'])} | {mib(cg.get('growth', float('nan')))} | "
                 f"{mib(cc.get('growth', float('nan')))} |")
    L += ["", "Slopes per stretch between bucket steps (tokens: B/token):", ""]
    for d, v in rows:
        if "RssAnon" in v:
            L.append(f"- {d}: " + ", ".join(f"{g['from']}-{g['to']}: {g['slope']:+.0f}" for g in v["RssAnon"]["segments"]))
    L += ["", "The single-device process keeps every token's logits for the comparison (`generate(keep_logits=True)`:"
          " 16 KiB of f32 per token plus a numpy/jax object each), so its slope is not a runtime figure.", "",
          "Levels at the first -> last decode samples (MiB):", ""]
    for d, v in rows:
        if "RssAnon" in v:
            parts = [f"{k} {v[k]['start'] / 2**20:.1f} -> {v[k]['end'] / 2**20:.1f}"
                     for k in ("RssAnon", "RssFile", "cg_usage", "cg_cache") if k in v]
            L.append(f"- {d}: " + ", ".join(parts))
    L += ["", "Steps in RssAnon between consecutive samples (>= 0.5 MiB; token, MiB):", ""]
    for d, v in rows:
        st = v.get("anon_steps", [])
        L.append(f"- {d}: " + (", ".join(f"{t}: {b / 2**20:+.1f}" for t, b in st) if st else "none"))
    L += ["", "Files: `long_run.csv` (cluster workers, one row per sample: token, per-worker VmRSS / RssAnon / RssFile /"
          " RssShmem, cgroup usage / rss / cache / mapped_file, bytes; KV-only expectation), `long_run_single.csv`"
          " (the single-device process), `long_run.json` (all numbers), `long_run.png`.", ""]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
