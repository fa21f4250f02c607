"""A model larger than the device's memory, run inside a memory limit smaller than its file (issue 14's
done-when; root).

    sudo .venv/bin/python experiments/stream_from_disk.py                 # every model/format below
    sudo .venv/bin/python experiments/stream_from_disk.py --only llama-mini-300m:q4k --tokens 32
    sudo .venv/bin/python experiments/stream_from_disk.py --only tinyllama-1.1b:q4k --merge   # keep the other rows

For each random-weight GGUF file (the papers run Q4_K_M; f32 and Q8_0 beside it), one emulated device
(a memory cgroup: the runtime's own footprint + `--fraction` of the file for the model, which is a
small share of the model's f32 size) runs greedy generation in both residency modes:

- planned: the worker keeps part of every layer and streams the rest from disk, evicting it after use;
- lru: mmap, and the kernel's LRU decides (llama.cpp / prima.cpp on one device: no prefetch hint);

and a run without any limit gives the reference tokens. Reported per run: the same tokens or not,
TPOT, disk MB read per token, anonymous and file-backed memory (`run --json` `devices`), the
cgroup's peak against its limit, and how the worker held its weights. A format the runtime cannot
yet keep file-backed (dequantised into anonymous memory at load) is OOM-killed inside the limit --
recorded as such, which is the point of applying the limit before the weights are mapped.

Writes experiments/results/stream_from_disk.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("llama-mini-300m:f32", "llama-mini-300m:q8_0", "llama-mini-300m:q4k", "tinyllama-1.1b:q4k")
PROMPT = [1, 5, 9, 200, 3000, 7, 42, 1234]
N_CTX = 256


def device(memory_mib: float | None, disk_mbs: float) -> Any:
    from primasim.core.cluster import cluster_from_toml

    em: dict[str, Any] = {"cpu_cores": 2.0, "threads": 2}
    if memory_mib is not None:
        em["memory_mib"] = memory_mib
    if disk_mbs > 0:
        em["disk_read_mbs"] = disk_mbs
    return cluster_from_toml({"name": "one", "network": {"kind": "switched"}, "devices": [
        {"name": "dev", "os": "linux", "cores": 2, "ram_total_gib": 4, "ram_avail_gib": 2, "ram_bw_gbs": 10,
         "cpu_gflops": {"f32": 10}, "disk_seq_gbs": 1, "emulate": em}]}, "one")


def sim_device(limit: float, disk_mbs: float) -> Any:
    """The emulated device as the simulator sees it: the model's memory = the limit (the worker's
    own footprint is outside it, as in the cgroup), the disk at its throttle (else 1 GB/s)."""
    from primasim.core.cluster import cluster_from_toml
    from primasim.core.units import GiB

    disk = disk_mbs / 1e3 if disk_mbs > 0 else 1.0
    return cluster_from_toml({"name": "one", "network": {"kind": "switched"}, "devices": [
        {"name": "dev", "os": "linux", "cores": 2, "ram_total_gib": 4, "ram_avail_gib": limit / GiB, "ram_bw_gbs": 10,
         "cpu_gflops": {"f32": 10}, "disk_seq_gbs": disk}]}, "one")


def predict(spec: Any, limit: float, mode: str, a: argparse.Namespace) -> dict[str, float]:
    """The simulator's runtime model of the same run: disk bytes per token and resident weights
    (decided by the policy, so comparable across hosts; its TPOT needs a profiled device, so
    it is not reported here -- `primasim validate` compares that)."""
    from primasim.core.runtime_facts import runtime_model
    from primasim.sim import SimConfig, simulate

    plan = plan_for(spec)
    cfg = SimConfig(runtime=True, tokens=a.tokens, prompt_tokens=len(PROMPT), warmup=False, residency=mode)
    res = simulate(plan.system, runtime_model(spec), sim_device(limit, a.disk_mbs), plan=plan, config=cfg)
    st = res.trace.device_stats.get("dev", {})
    r = res.extra.get("residency", {}).get("dev", {})
    return {"sim_disk_read_mb_per_token": st.get("disk_read_bytes", 0.0) / max(1, res.metrics.n_tokens) / 1e6,
            "sim_resident_mb": float(r.get("resident_bytes", 0.0)) / 1e6, "sim_residency": str(r.get("mode", ""))}


def plan_for(spec: Any) -> Any:
    from primasim.core.plan import DevicePlan, Plan

    return Plan(system="prima", model=spec.name, n_layers=spec.n_layers, k=1, quant=spec.quant, n_ctx=N_CTX,
                devices=(DevicePlan("dev", spec.n_layers),), prefetch=True)


def one(cfg: str, a: argparse.Namespace) -> list[dict[str, Any]]:
    from primasim.core.errors import CheckpointError, PrimasimError
    from primasim.core.model_sources import load_model
    from primasim.core.units import MiB
    from primasim.runtime.head import RunOptions, cached_random_weights, open_weights, run_plan

    name, quant = cfg.split(":")
    spec = load_model(name, quant)
    try:
        path = cached_random_weights(spec, fmt="gguf")
    except CheckpointError as exc:
        print(f"{cfg}: skipped ({exc.what})", flush=True)
        return [{"config": cfg, "skipped": exc.what}]
    ckpt = open_weights(path)
    size = Path(path).stat().st_size
    f32 = 4.0 * ckpt.spec.n_params  # the model at f32 (total_bytes is the file's)
    limit = a.fraction * size
    opts = {"max_new_tokens": a.tokens}
    ref = run_plan(plan_for(ckpt.spec), ckpt, device(None, 0), [PROMPT], RunOptions(emulate=False, **opts))
    rows = [{"config": cfg, "mode": "unlimited", "file_bytes": size, "f32_bytes": f32, "limit_bytes": None,
             "same_tokens": True, "tpot_ms": ref.to_json()["tpot_ms"], **ref.to_json()["devices"]["dev"]}]
    print(f"{cfg}: file {size / 1e6:.0f} MB (f32 {f32 / 1e9:.2f} GB), unlimited TPOT {rows[0]['tpot_ms']:.1f} ms",
          flush=True)
    for mode in ("planned", "lru"):
        t0 = time.time()
        row: dict[str, Any] = {"config": cfg, "mode": mode, "file_bytes": size, "f32_bytes": f32, "limit_bytes": limit}
        try:
            res = run_plan(plan_for(ckpt.spec), ckpt, device(limit / MiB, a.disk_mbs), [PROMPT],
                           RunOptions(residency=mode, **opts))
        except PrimasimError as exc:
            row["error"] = exc.message.splitlines()[0]
            rows.append(row)
            print(f"  {mode}: {row['error']}", flush=True)
            continue
        out = res.to_json()
        st = res.trace.device_stats["dev"]
        row.update(out["devices"]["dev"])
        row.update(predict(ckpt.spec, limit, mode, a))
        row.update({"same_tokens": res.token_ids == ref.token_ids, "tpot_ms": out["tpot_ms"],
                    "cg_limit_bytes": st.get("cg_mem_limit"), "cg_peak_bytes": st.get("cg_mem_max_usage"),
                    "footprint_bytes": st.get("cg_mem_limit", 0.0) - limit,
                    "residency": res.loads["dev"].get("residency"), "keep_fraction": res.loads["dev"].get("keep_fraction"),
                    "seconds": time.time() - t0, "load1": round(os.getloadavg()[0], 1)})
        rows.append(row)
        print(f"  {mode}: same tokens {row['same_tokens']}, TPOT {row['tpot_ms']:.1f} ms, disk "
              f"{row['disk_read_mb_per_token']:.1f} MB/token (simulated {row['sim_disk_read_mb_per_token']:.1f}), anon {row['anon_mb']:.1f} MB, file {row['file_mb']:.1f} MB "
              f"(limit {limit / 1e6:.0f} MB; cgroup peak {st.get('cg_mem_max_usage', 0) / 1e6:.0f} of "
              f"{st.get('cg_mem_limit', 0) / 1e6:.0f} MB)", flush=True)
    return rows


def report(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    lines = ["# A model larger than memory, inside a limit smaller than its file (issue 14)", "",
             "One emulated device, 2 cores; the model's memory = a fraction of the file on top of the runtime's "
             "footprint; greedy tokens; `load1` = the host's load average when the run ended. Commands:", ""]
    for run in runs:
        a = run["args"]
        lines.append(f"- `sudo .venv/bin/python experiments/stream_from_disk.py {' '.join(run['argv'])}` -- "
                     f"{run['time']}: {', '.join(run['configs'])}; memory {a['fraction']:.0%} of the file, "
                     + (f"disk throttled to {a['disk_mbs']:.0f} MB/s" if a["disk_mbs"] else "disk not throttled")
                     + f", {a['tokens']} tokens; uptime: {run.get('uptime', '-')}")
    lines += ["", "| model:format | file | f32 size | limit | residency | same tokens as unlimited | TPOT | disk MB/token "
              "(simulated) | anon MB | file MB | cgroup peak / limit | load1 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['config']} | skipped: {r['skipped']} |||||||||| ")
            continue
        lim = "-" if r["limit_bytes"] is None else f"{r['limit_bytes'] / 1e6:.0f} MB"
        if "error" in r:
            lines.append(f"| {r['config']} | {r['file_bytes'] / 1e6:.0f} MB | {r['f32_bytes'] / 1e9:.2f} GB | {lim} | "
                         f"{r['mode']} | failed: {r['error']} ||||||")
            continue
        cg = (f"{r['cg_peak_bytes'] / 1e6:.0f} / {r['cg_limit_bytes'] / 1e6:.0f} MB" if r.get("cg_limit_bytes")
              else "-")
        mode = r["mode"] + (f" ({r['residency']})" if r.get("residency") else "")
        sim = f"{r['sim_disk_read_mb_per_token']:.1f}" if "sim_disk_read_mb_per_token" in r else "-"
        load = f"{r['load1']:.1f}" if "load1" in r else "-"
        lines.append(f"| {r['config']} | {r['file_bytes'] / 1e6:.0f} MB | {r['f32_bytes'] / 1e9:.2f} GB | {lim} | {mode} "
                     f"| {r['same_tokens']} | {r['tpot_ms']:.1f} ms | {r['disk_read_mb_per_token']:.1f} ({sim}) | "
                     f"{r['anon_mb']:.1f} | {r['file_mb']:.1f} | {cg} | {load} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(CONFIGS), help="model:quant,... (default: all)")
    ap.add_argument("--fraction", type=float, default=0.6, help="the model's memory as a fraction of the file")
    ap.add_argument("--disk-mbs", type=float, default=0.0, help="throttle the device's disk (MB/s; 0 = not)")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows (and commands) of other configurations already in --out's results")
    a = ap.parse_args()
    from primasim.core.io import atomic_write_json, atomic_write_text
    from primasim.runtime.emulate import is_root

    if not is_root():
        print("needs root (a memory cgroup per device)", file=sys.stderr)
        return 2
    configs = a.only.split(",")
    rows: list[dict[str, Any]] = []
    for cfg in configs:
        rows += one(cfg, a)
    out = Path(a.out)
    this = {"argv": sys.argv[1:], "time": time.strftime("%Y-%m-%d %H:%M"), "configs": configs,
            "uptime": os.popen("uptime").read().strip(),
            "args": {"fraction": a.fraction, "disk_mbs": a.disk_mbs, "tokens": a.tokens}}
    runs = [this]
    old_path = out / "stream_from_disk.json"
    if a.merge and old_path.exists():
        old = json.loads(old_path.read_text())
        old_runs = old.get("runs") or [{"argv": old.get("argv", []), "time": old.get("time", "?"),
                                        "configs": sorted({r["config"] for r in old["rows"]}),
                                        "args": {"fraction": 0.6, "disk_mbs": 0.0, "tokens": 24}}]
        kept = [r for r in old["rows"] if r["config"] not in configs]
        runs = [dict(r, configs=[c for c in r["configs"] if c not in configs]) for r in old_runs]
        runs = [r for r in runs if r["configs"]] + [this]
        order = {c: i for i, c in enumerate(CONFIGS)}
        rows = sorted(kept + rows, key=lambda r: order.get(r["config"], len(order)))  # stable: mode order kept
    atomic_write_json(old_path, {"rows": rows, "runs": runs})
    atomic_write_text(out / "stream_from_disk.md", report(rows, runs))
    print(report(rows, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
