"""File-backed weights under a memory limit: disk reads per token vs the bytes that do not fit.

One emulated device (a memory cgroup, root only) holds a 12-layer window of a 14-layer f32 model
(hidden 512, 15.2 MB per layer, 182.5 MB window) with half of that in its memory budget; the head
holds the other 2 layers without a limit. Four runs of 16 tokens:

- residency "lru": the worker just maps the file and the kernel's LRU decides (llama.cpp, prima.cpp;
  with prefetch, the next window is madvise(WILLNEED)'d);
- residency "planned": the worker keeps a fraction of every layer and streams the rest, evicting it
  after use (runtime/worker/residency.py, primasim.core.runtime_facts.plan_residency);

each with prefetch off and on. Reported: disk reads per decode token (/proc/<pid>/io read_bytes of
the worker, median over tokens), the bytes that do not fit (window - budget), TPOT.

    sudo python experiments/file_backed.py      # writes experiments/results/file_backed.{json,md}
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from primasim.core.cluster import cluster_from_toml
from primasim.core.io import atomic_write_json, atomic_write_text
from primasim.core.model import ModelSpec
from primasim.core.plan import DevicePlan, Plan
from primasim.runtime import open_checkpoint, write_random_checkpoint
from primasim.runtime.emulate import is_root
from primasim.runtime.head import RunOptions, run_plan

OUT = Path(__file__).resolve().parent / "results"


def main() -> int:
    if not is_root():
        print("needs root (a memory cgroup per device)", file=sys.stderr)
        return 1
    spec = ModelSpec(name="fb14", family="llama", n_layers=14, hidden=512, n_heads=8, n_kv_heads=2, head_dim=64,
                     ffn=2048, vocab=4096, quant="f32", max_context=256)
    rows = []
    with tempfile.TemporaryDirectory(prefix="primasim-fb-") as d:
        ckpt = open_checkpoint(write_random_checkpoint(spec, Path(d) / "fb14", seed=1))
        window = sum(n for _, _, n in ckpt.layer_ranges(range(2, 14)))
        limit = window / 2
        devs = [{"name": n, "os": "linux", "cores": 1, "ram_total_gib": 4, "ram_avail_gib": 2, "ram_bw_gbs": 10,
                 "cpu_gflops": {"f32": 10}, "disk_seq_gbs": 1, "emulate": em}
                for n, em in (("h", {"cpu_cores": 1.0}), ("w", {"cpu_cores": 1.0, "memory_mib": limit / 2**20}))]
        cl = cluster_from_toml({"name": "fb", "network": {"kind": "switched", "bandwidth_mbps": 1000,
                                                          "latency_ms": 0.2}, "devices": devs}, "fb")
        for residency in ("lru", "planned"):
            for prefetch in (False, True):
                plan = Plan(system="prima", model="fb14", n_layers=14, k=1, quant="f32", n_ctx=64, prefetch=prefetch,
                            devices=(DevicePlan("h", 2), DevicePlan("w", 12)))
                load0 = os.getloadavg()[0]
                res = run_plan(plan, ckpt, cl, [[1, 5, 9, 3]], RunOptions(max_new_tokens=16, residency=residency))
                reads = np.diff([s.value for s in res.trace.samples if s.device == "w" and s.name == "disk_read_bytes"])
                per_tok = float(np.median(reads))
                out = res.to_json()
                rows.append({"residency": residency, "prefetch": prefetch, "window_bytes": window,
                             "budget_bytes": limit, "missing_bytes": window - limit,
                             "planned_stream_bytes": res.loads["w"].get("streamed_bytes", 0),
                             "reads_per_token": per_tok, "reads_over_missing": per_tok / (window - limit),
                             "tpot_ms": out["tpot_ms"], "memory_pressure_w": out["memory_pressure"]["w"],
                             "load_avg_1min": load0})
                print(json.dumps(rows[-1]), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / "file_backed.json", rows, indent=1)
    lines = ["# File-backed weights under a memory limit", "",
             f"`sudo python experiments/file_backed.py` on {time.strftime('%Y-%m-%d %H:%M')}: a worker whose memory "
             f"cgroup holds half of its {rows[0]['window_bytes'] / 1e6:.1f} MB window (budget "
             f"{rows[0]['budget_bytes'] / 1e6:.1f} MB on top of its runtime footprint, so "
             f"{rows[0]['missing_bytes'] / 1e6:.1f} MB do not fit); 16 tokens; reads = /proc/<pid>/io read_bytes "
             "per decode token (median).", "",
             "| residency | prefetch | planned stream MB | reads/token MB | reads / missing | TPOT ms | load |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['residency']} | {'on' if r['prefetch'] else 'off'} | {r['planned_stream_bytes'] / 1e6:.1f} | "
                     f"{r['reads_per_token'] / 1e6:.1f} | {r['reads_over_missing']:.2f} | {r['tpot_ms']:.0f} | "
                     f"{r['load_avg_1min']:.1f} |")
    lines += ["", "kernel: the LRU evicts the pages needed next in a cyclic scan, so every token re-reads about "
              "the whole window. plan: the worker keeps a fraction of every layer and streams the rest, evicted "
              "right after use; a token re-reads the missing bytes plus the room one streamed layer part needs "
              "(two with prefetch)."]
    atomic_write_text(OUT / "file_backed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
