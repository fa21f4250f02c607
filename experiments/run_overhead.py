"""Per-token cost of `primasim run` outside the model's layers, on one device.

    python experiments/run_overhead.py                          # llama-mini-300m GGUF, F32 and Q8_0
    python experiments/run_overhead.py --formats f32 --rounds 5 --tokens 96
    python experiments/run_overhead.py --file path/to/model-Q4_K_M.gguf   # any GGUF the runtime reads

Issue 14 asks that what `primasim run` adds to a token beyond the model's own compute stay under
5 % of TPOT. Each round runs, back to back on the same file and the same cores (the host is shared
and noisy, so only ratios within a round count):

- **in-process**: `primasim.runtime.generate` in a fresh Python process: one jitted call per token
  (embedding, blocks, head), greedy, nothing else -- the engine without the toolkit around it;
- **run**: `primasim run --cluster local --model FILE --prompt-ids ... --tokens N --json
  --save-trace T`, exactly what a user types (driver process + one worker process, zmq between
  them, the recorder, heartbeats, memory sampling).

Reported per round: each side's TPOT (median decode step), **overhead = run / in-process - 1**,
and from the run's own trace the decomposition of its token: time inside the worker's model call
per token vs the rest of the token interval ("outside": sampling, emitting the token, the
recorder, the Python between calls), and the CPU seconds per token of every thread other than the
compute (the driver process, the worker's control thread, memory sampler, ...): on a 2-core host
those compete with XLA's threads. Tokens of both sides must be identical (greedy).

Writes experiments/results/run_overhead.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "llama-mini-300m"
PROMPT = [1, 5, 9, 200, 7000, 31, 4, 999]
PY = sys.executable


# ---------------------------------------------------------------------------- the in-process side
def inproc_main(path: str, tokens: int) -> None:
    """Child mode: generate with the in-process engine, print one JSON line."""
    import numpy as np

    from primasim.runtime import generate, load_params, open_checkpoint

    ckpt = open_checkpoint(path)
    params = load_params(ckpt, range(ckpt.spec.n_layers), embed=True, head=True)
    generate(params, PROMPT, 4, max_seq=1024)  # compile the prefill and the first span bucket
    cpu0 = time.process_time()  # every thread of this process (XLA's included)
    g = generate(params, PROMPT, tokens, max_seq=1024)
    cpu = time.process_time() - cpu0
    print(json.dumps({"tpot_ms": 1e3 * float(np.median(g.step_s)), "tokens": g.tokens,
                      "cpu_ms_per_token": 1e3 * cpu / tokens, "steps_ms": [1e3 * s for s in g.step_s]}))


def inproc(path: Path, tokens: int) -> dict[str, Any]:
    out = subprocess.run([PY, __file__, "--inproc", str(path), "--tokens", str(tokens)], capture_output=True,
                         text=True, check=True, timeout=1800)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------- the `primasim run` side
def run_cli(path: Path, tokens: int, work: Path) -> dict[str, Any]:
    trace = work / "trace.json"
    cmd = [PY, "-m", "primasim", "run", "--cluster", "local", "--model", str(path), "--prompt-ids",
           ",".join(map(str, PROMPT)), "--tokens", str(tokens), "--json", "--save-trace", str(trace)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"primasim run failed ({out.returncode}):\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    tr = json.loads(trace.read_text())
    return {"json": res, "trace": tr, "command": " ".join(cmd[1:])}


def decompose(tr: dict[str, Any], n_tokens: int) -> dict[str, Any]:
    """Per decode token: interval between tokens, time inside the worker's model calls, the rest;
    CPU seconds per token of the non-compute threads and of the driver."""
    toks = sorted((t for t in tr["tokens"] if t["seq"] == 0), key=lambda t: t["index"])
    model: dict[int, float] = {}
    for sp in tr["spans"]:
        if sp["resource"] == "cpu":
            model[sp["token"]] = model.get(sp["token"], 0.0) + sp["end"] - sp["start"]
    rows = []
    for a, b in zip(toks, toks[1:]):
        gap = b["time"] - a["time"]
        m = model.get(b["index"], 0.0)
        rows.append((gap, m, gap - m))
    decode = rows[1:]  # the first decode step may still touch the next span bucket's code
    med = lambda i: statistics.median(r[i] for r in decode) * 1e3  # noqa: E731
    dev = next(iter(tr["device_stats"].values()))
    threads = {k.split(".", 1)[1]: v for k, v in dev.items() if k.startswith("thread_cpu_s.")}
    other = {k: v / n_tokens * 1e3 for k, v in threads.items() if k not in ("python", "tf_XLAEigen")
             and not k.startswith("llvm")}
    return {"interval_ms": med(0), "model_ms": med(1), "outside_ms": med(2),
            "outside_mean_ms": statistics.mean(r[2] for r in decode) * 1e3,
            "thread_cpu_ms_per_token": other, "compute_cpu_ms_per_token": {
                k: v / n_tokens * 1e3 for k, v in threads.items() if k in ("python", "tf_XLAEigen")},
            "driver_cpu_ms_per_token": tr.get("meta", {}).get("driver_cpu_s", 0.0) / n_tokens * 1e3,
            # every worker thread + the driver: what a token costs in CPU, comparable with the
            # in-process engine's whatever else the host runs (wall times are not, on a busy host)
            "run_cpu_ms_per_token": (sum(threads.values()) + tr.get("meta", {}).get("driver_cpu_s", 0.0))
            / n_tokens * 1e3}


# ---------------------------------------------------------------------------- files
def weight_file(fmt: str) -> Path:
    from primasim.core.model_sources import load_model
    from primasim.runtime.head import cached_random_weights

    return cached_random_weights(load_model(MODEL, fmt), fmt="gguf")


def load_avg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="f32,q8_0", help="random-weight GGUF files of llama-mini-300m to run")
    ap.add_argument("--file", action="append", default=[], help="also run this GGUF file (repeatable)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--inproc", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inproc:
        inproc_main(a.inproc, a.tokens)
        return 0
    from primasim.core.io import atomic_write_json, atomic_write_text
    from primasim.loop.validate.hostload import HostLoad

    files = {f: weight_file(f) for f in a.formats.split(",") if f} | {Path(f).name: Path(f) for f in a.file}
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="run-overhead-") as tmp:
        for r in range(a.rounds):
            for name, path in files.items():
                host = HostLoad().start()
                load0 = load_avg()
                ip = inproc(path, a.tokens)
                rn = run_cli(path, a.tokens, Path(tmp))
                host.stop()
                d = decompose(rn["trace"], a.tokens)
                row = {"round": r, "file": name, "path": str(path), "tokens": a.tokens,
                       "inproc_tpot_ms": ip["tpot_ms"], "run_tpot_ms": rn["json"]["tpot_p50_ms"],
                       "run_tpot_mean_ms": rn["json"]["tpot_ms"], **d,
                       "same_tokens": ip["tokens"] == rn["json"]["token_ids"][:len(ip["tokens"])],
                       "load1_before": load0, "load1_after": load_avg(),
                       "other_processes_cpu_share": host.foreign_share, "command": rn["command"]}
                row["overhead"] = row["run_tpot_ms"] / row["inproc_tpot_ms"] - 1
                # the threads beside the compute (and the driver) as a share of one core over the run:
                # what they can take from XLA's threads on a 2-core host, whatever the host's load
                row["side_cpu_share"] = (sum(d["thread_cpu_ms_per_token"].values()) + d["driver_cpu_ms_per_token"]) \
                    / row["run_tpot_mean_ms"]
                row["inproc_cpu_ms_per_token"] = ip["cpu_ms_per_token"]
                row["cpu_overhead"] = row["run_cpu_ms_per_token"] / ip["cpu_ms_per_token"] - 1
                row["outside_share"] = row["outside_ms"] / row["run_tpot_ms"]
                rounds.append(row)
                print(f"round {r} {name}: in-process {row['inproc_tpot_ms']:.1f} ms, run {row['run_tpot_ms']:.1f} ms "
                      f"({100 * row['overhead']:+.1f} %); outside the model call {row['outside_ms']:.2f} ms "
                      f"({100 * row['outside_share']:.1f} % of TPOT); CPU/token {row['inproc_cpu_ms_per_token']:.1f} -> "
                      f"{row['run_cpu_ms_per_token']:.1f} ms ({100 * row['cpu_overhead']:+.1f} %); driver {row['driver_cpu_ms_per_token']:.2f} "
                      f"ms CPU/token; same tokens {row['same_tokens']}; load {load0:.1f}", flush=True)
    out = Path(a.out)
    summary = summarize(rounds)
    atomic_write_json(out / "run_overhead.json", {"rounds": rounds, "summary": summary, "argv": sys.argv[1:],
                                                  "cpus": len(os.sched_getaffinity(0)),
                                                  "time": time.strftime("%Y-%m-%d %H:%M")})
    atomic_write_text(out / "run_overhead.md", report(rounds, summary, a))
    print(report(rounds, summary, a))
    return 0


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["file"] for r in rounds):
        rs = [r for r in rounds if r["file"] == name]
        out[name] = {k: statistics.median(r[k] for r in rs)
                     for k in ("inproc_tpot_ms", "run_tpot_ms", "overhead", "outside_ms", "outside_share",
                               "driver_cpu_ms_per_token", "model_ms", "inproc_cpu_ms_per_token",
                               "run_cpu_ms_per_token", "cpu_overhead", "side_cpu_share")}
        out[name]["same_tokens"] = all(r["same_tokens"] for r in rs)
        threads: dict[str, list[float]] = {}
        for r in rs:
            for k, v in r["thread_cpu_ms_per_token"].items():
                threads.setdefault(k, []).append(v)
        out[name]["thread_cpu_ms_per_token"] = {k: statistics.median(v) for k, v in threads.items()}
    return out


def report(rounds: list[dict[str, Any]], summary: dict[str, Any], a: argparse.Namespace) -> str:
    lines = ["# Per-token cost of `primasim run` outside the model (issue 14, part 2)", "",
             f"`python experiments/run_overhead.py {' '.join(sys.argv[1:])}` -- {time.strftime('%Y-%m-%d %H:%M')}, "
             f"{len(os.sched_getaffinity(0))} CPUs, {a.tokens} tokens, {a.rounds} rounds (in-process and run back to "
             "back per round; medians over rounds).", "",
             "| file | in-process TPOT | `primasim run` TPOT | run / in-process - 1 | outside the model call "
             "| share of TPOT | CPU / token in-process -> run (all threads) | driver CPU / token | same tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['inproc_tpot_ms']:.2f} ms | {s['run_tpot_ms']:.2f} ms | "
                     f"{100 * s['overhead']:+.1f} % | {s['outside_ms']:.3f} ms | {100 * s['outside_share']:.2f} % | "
                     f"{s['inproc_cpu_ms_per_token']:.1f} -> {s['run_cpu_ms_per_token']:.1f} ms "
                     f"({100 * s['cpu_overhead']:+.1f} %) | "
                     f"{s['driver_cpu_ms_per_token']:.3f} ms | {s['same_tokens']} |")
    lines += ["", "CPU per token of the threads that are not the compute (ms; they compete with XLA's threads), and "
              "with the driver's, as a share of one core over the run:", ""]
    for name, s in summary.items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(s["thread_cpu_ms_per_token"].items()))
                     + f"; driver {s['driver_cpu_ms_per_token']:.3f}; together {100 * s['side_cpu_share']:.2f} % of a core")
    lines += ["", "Wall times (TPOT, run / in-process) are only comparable on a quiet host: see the rounds' load "
              "and the share of the host's CPU other processes took. The time outside the model call (from the "
              "run's own trace) does not depend on what else runs; CPU per token (every thread, both sides) "
              "less, but contention (caches, context switches) inflates it too, unevenly.",
              "", "## Rounds", "", "| round | file | in-process | run | overhead | outside | CPU overhead "
              "| load1 before/after | other processes' CPU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        lines.append(f"| {r['round']} | {r['file']} | {r['inproc_tpot_ms']:.2f} | {r['run_tpot_ms']:.2f} | "
                     f"{100 * r['overhead']:+.1f} % | {r['outside_ms']:.3f} ms | {100 * r['cpu_overhead']:+.1f} % | "
                     f"{r['load1_before']:.1f} / "
                     f"{r['load1_after']:.1f} | {100 * r['other_processes_cpu_share']:.0f} % |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
