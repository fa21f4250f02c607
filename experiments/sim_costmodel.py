"""Simulator vs the analytic cost model (predict_tpot, paper variant with communication).

    python experiments/sim_costmodel.py [--out experiments/results]

Where the cost model's assumptions hold (resident weights, no overlap, idle network, no jitter)
the two agree; where they do not, this prints by how much and in which direction (the cases of
tests/test_sim_costmodel.py). Writes sim_costmodel.csv and sim_costmodel.md.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from primasim import load_model, make_plan
from primasim.core.cluster import ClusterSpec, NetworkSpec, load_cluster
from primasim.core.io import atomic_csv_rows, atomic_write_text
from primasim.core.plan import DevicePlan, Plan
from primasim.plan.cost import predict_tpot
from primasim.sim import SimConfig, simulate
from primasim.sim._testbeds import prefetch_pair

ROOT = Path(__file__).resolve().parents[1]
EXACT = SimConfig(tokens=6, jitter=False, prefetch=False, sample_cost_per_vocab=0.0, kv_read="ctx", roofline=False,
                  wifi_frames=False)  # the cost model's accounting


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    cl = load_cluster("prima-d1-d4")
    rows = []

    def add(case: str, sim: float, pred: float, note: str) -> None:
        rows.append({"case": case, "sim_ms": round(sim, 2), "cost_model_ms": round(pred, 2),
                     "sim_over_model": round(sim / pred, 4), "note": note})

    m = load_model("llama3-8b", "q4k")
    for devs, k in ([("D3", 32, 32)], 1), ([("D3", 32, 20)], 1), \
            ([("D1", 2, 2), ("D2", 6, 6), ("D3", 6, 6), ("D4", 2, 0)], 2), \
            ([("D1", 1, 1), ("D2", 3, 3), ("D3", 3, 2), ("D4", 1, 0)], 4), \
            ([("D1", 4, 4), ("D2", 12, 12), ("D3", 14, 14), ("D4", 2, 0)], 1):
        plan = Plan("prima", m.name, 32, k, tuple(DevicePlan(*d) for d in devs), quant="q4k")
        r = simulate("prima", m, cl, plan=plan, config=EXACT)
        add(f"llama3-8b {plan.describe()}", r.tpot_ms, predict_tpot(plan, m, cl) * 1e3, "assumptions hold")
    # contention
    p = make_plan("dllama", m, cl).plan
    w = simulate("dllama", m, cl, plan=p, config=EXACT)
    n = cl.network
    sw = ClusterSpec(cl.name, cl.devices, NetworkSpec("switched", n.bandwidth, n.latency, 0.0, contention="pair"), cl.head)
    s = simulate("dllama", m, sw, plan=p, config=EXACT)
    add("dllama 8B on one Wi-Fi medium (vs the same links switched)", w.tpot_ms, s.tpot_ms,
        "airtime contention (second column: simulated on a switched network)")
    # prefetch overlap
    pc = prefetch_pair(m)
    plan = Plan("prima", m.name, 32, 2, (DevicePlan("A", 13), DevicePlan("B", 3)), quant="q4k")
    r = simulate("prima", m, pc, plan=plan, config=EXACT.replace(prefetch=True))
    add("piped ring k=2 with prefetch, B overloaded (two-device testbed)", r.tpot_ms, predict_tpot(plan, m, pc) * 1e3,
        "prefetch overlaps disk reads with the other device's compute")
    r = simulate("prima", m, pc, plan=plan, config=EXACT)
    add("the same without prefetch", r.tpot_ms, predict_tpot(plan, m, pc) * 1e3,
        "LRU re-reads B's whole slice; the model re-reads only its shortfall")
    # page-cache dynamics
    for name in ("llama3-70b", "llama3-45b"):
        mm = load_model(name, "q4k")
        plan = make_plan("llama.cpp", mm, cl).plan
        r = simulate("llama.cpp", mm, cl, plan=plan, config=EXACT.replace(tokens=8))
        add(f"llama.cpp {name} on D3", r.tpot_ms, predict_tpot(plan, mm, cl) * 1e3,
            f"{r.extra['disk_read_bytes_per_token']['D3'] / 1e9:.1f} GB read per token")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_csv_rows(out / "sim_costmodel.csv", rows)
    lines = ["# Simulator vs cost model (predict_tpot, paper variant, with communication)", "",
             "`python experiments/sim_costmodel.py`", "", "| case | simulated ms | cost model ms | ratio | note |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['sim_ms']} | {r['cost_model_ms']} | {r['sim_over_model']} | {r['note']} |" for r in rows]
    atomic_write_text(out / "sim_costmodel.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
