"""Which lru rows of the Q4_K_M streaming study miss, and by which mechanism (issue 15 part 6).

For every measured `lru` configuration of the committed runs (fidelity_stream_q4k_room/run1..4),
re-simulates it as `fidelity.py --analyze` does and puts, per device, the bytes read per token,
the major faults per token and the compute time per token the runtime recorded beside the
simulator's (bytes, faults, the stall its compute spent waiting for faults). The rows sorted by
TPOT error say where the model misses: a row whose bytes are right but whose TPOT is not misses
time per byte (CPU per fault, the disk's throttle); a row whose bytes are wrong misses the page
cache (readahead against reclaim).

    python experiments/lru_mechanisms.py [--runs run1,run2,run3,run4]   # ~2 min; no root

Writes experiments/results/lru_mechanisms.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE / "results" / "fidelity_stream_q4k_room"


def _fidelity() -> Any:
    spec = importlib.util.spec_from_file_location("fidelity", HERE / "fidelity.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fidelity"] = mod
    spec.loader.exec_module(mod)
    return mod


def rows(runs: list[str], root: Path = ROOT) -> list[dict[str, Any]]:
    from primasim import load_model
    from primasim.core import runtime_facts
    from primasim.core.cluster import load_cluster
    from primasim.core.plan import Plan
    from primasim.loop.validate import predict

    fid = _fidelity()
    fid.QUANT = "q4k"
    model = load_model(fid.MODEL, fid.QUANT)
    out = []
    for run in runs:
        d = root / run
        meta = json.loads((d / "fidelity_run.json").read_text())
        runtime_facts.ACT_RESERVE = int(meta.get("act_reserve_mib", 8.0) * 2**20)  # as the run reserved
        fid.HOST["cpus"] = int(meta.get("host_cpus", 0))
        cl0 = load_cluster(d / "fidelity_cluster_stream.toml")
        for line in (d / "fidelity_runs.jsonl").read_text().splitlines():
            j = json.loads(line)
            if "measured" not in j:
                continue
            c = fid.CONFIGS[j["name"]]
            plan = Plan.from_json(j["plan"])
            cl = cl0.subset(list(c.devices)) if len(c.devices) < len(cl0.devices) else cl0
            sim = predict(plan, model, fid._calibrated(cl, dict(fid.COMMITTED_FIT)), tokens=c.n_tokens,
                          prompt_tokens=fid.PROMPT, residency=c.mode, host_cpus=fid.HOST["cpus"])
            m, n = j["measured"], sim.metrics.n_tokens
            devs = {}
            for dn in c.devices:
                ps, ms = sim.trace.device_stats.get(dn, {}), m["device_stats"].get(dn, {})
                devs[dn] = {"pred_mb": ps.get("disk_read_bytes", 0.0) / n / 1e6,
                            "meas_mb": ms.get("disk_read_bytes", 0.0) / c.n_tokens / 1e6,
                            "pred_pf": ps.get("page_faults", 0.0) / n, "meas_pf": ms.get("page_faults", 0.0) / c.n_tokens,
                            "pred_stall_ms": 1e3 * ps.get("stall_s", 0.0) / n,
                            "meas_compute_ms": 1e3 * ms.get("compute_s", 0.0) / c.n_tokens}
            out.append({"run": run, "name": j["name"], "pred_tpot": sim.metrics.tpot_ms, "meas_tpot": m["tpot_ms"],
                        "pred_ttft": sim.metrics.ttft_ms, "meas_ttft": m["ttft_ms"], "dev": devs})
            print(f"{run} {j['name']}: TPOT {sim.metrics.tpot_ms:.0f} / {m['tpot_ms']:.0f} ms", flush=True)
    return out


def _p90(a: list[float]) -> float:
    a = sorted(a)
    k = (len(a) - 1) * 0.9
    f = int(k)
    return a[f] + (a[min(f + 1, len(a) - 1)] - a[f]) * (k - f)


def report(out: list[dict[str, Any]], cmd: str, src: str = "fidelity_stream_q4k_room/run1..4") -> str:
    def err(p: float, m: float) -> float:
        return (p - m) / m * 100 if m else float("nan")

    lines = ["# lru rows: where the simulator misses, per device", "",
             f"`{cmd}` on {time.strftime('%Y-%m-%d %H:%M')} (the simulator of this commit; the measurements of "
             f"{src}). Bytes = disk MB read per token, pf = major faults per token, "
             "predicted / measured; stall = the simulator's compute waiting for faults, compute = the runtime's "
             "compute time per token (its faults included).", "",
             "| group | rows | TPOT median / P90 % | TTFT median % | bytes median / P90 % | TPOT err where bytes within 15 % "
             "(median, n) | where bytes off > 15 % |", "|---|---|---|---|---|---|---|"]
    for g in ("stream-2", "stream-3", "stream-4", ""):
        rs = [r for r in out if r["name"].startswith(g)]
        if not rs:
            continue
        t = [abs(err(r["pred_tpot"], r["meas_tpot"])) for r in rs]
        tt = [abs(err(r["pred_ttft"], r["meas_ttft"])) for r in rs]
        b = [abs(err(sum(v["pred_mb"] for v in r["dev"].values()), sum(v["meas_mb"] for v in r["dev"].values())))
             for r in rs]
        ok = [ti for ti, bi in zip(t, b) if bi <= 15]
        bad = [ti for ti, bi in zip(t, b) if bi > 15]
        lines.append(f"| {g or 'all'} | {len(rs)} | {statistics.median(t):.1f} / {_p90(t):.1f} | "
                     f"{statistics.median(tt):.1f} | {statistics.median(b):.1f} / {_p90(b):.1f} | "
                     f"{statistics.median(ok) if ok else float('nan'):.1f} ({len(ok)}) | "
                     f"{statistics.median(bad) if bad else float('nan'):.1f} ({len(bad)}) |")
    lines += ["", "## The 20 rows with the largest TPOT error", "",
              "| run | configuration | TPOT pred / meas ms | err % | per device: bytes pred / meas, pf pred / meas, "
              "stall pred ms, compute meas ms |", "|---|---|---|---|---|"]
    for r in sorted(out, key=lambda r: -abs(err(r["pred_tpot"], r["meas_tpot"])))[:20]:
        devs = "; ".join(f"{dn} {v['pred_mb']:.0f}/{v['meas_mb']:.0f}, {v['pred_pf']:.1f}/{v['meas_pf']:.1f}, "
                         f"{v['pred_stall_ms']:.0f}, {v['meas_compute_ms']:.0f}" for dn, v in r["dev"].items())
        lines.append(f"| {r['run']} | {r['name']} | {r['pred_tpot']:.0f} / {r['meas_tpot']:.0f} | "
                     f"{err(r['pred_tpot'], r['meas_tpot']):+.1f} | {devs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="run1,run2,run3,run4")
    ap.add_argument("--root", default=str(ROOT), help="the study's results directory (run1..N inside)")
    ap.add_argument("--out", default=str(HERE / "results" / "lru_mechanisms.md"))
    a = ap.parse_args(argv)
    cmd = "python experiments/lru_mechanisms.py" + (f" --runs {a.runs}" if a.runs != "run1,run2,run3,run4" else "")
    if Path(a.root).resolve() != ROOT.resolve():
        cmd += f" --root {a.root}"
    out = rows(a.runs.split(","), Path(a.root))
    md = report(out, cmd, f"{Path(a.root).name}/{a.runs}")
    Path(a.out).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
