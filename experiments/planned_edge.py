"""How smooth is a streaming prediction in each device's memory? One configuration of the Q4_K_M
streaming study (its plan on its profiled cluster, the committed fit), predicted with one device's
memory scaled by 0.97-1.03 at a time. A prediction that jumps across that range sits on a knife
edge (issue 15 part 2): a device's spec sheet cannot pin its free memory to 3 %.

    python experiments/planned_edge.py                      # stream-3-planned/even-k2-noprefetch
    python experiments/planned_edge.py --config stream-3-planned/even-k3 --out /tmp/edge.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import fidelity as F  # noqa: E402  (the study's configurations, plans and fit)

from primasim import load_cluster, load_model  # noqa: E402
from primasim.core.io import atomic_write_text  # noqa: E402
from primasim.loop.validate import predict  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SCALES = (0.97, 0.98, 0.99, 1.0, 1.01, 1.02, 1.03)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="stream-3-planned/even-k2-noprefetch,stream-3-planned/even-k2,"
                    "stream-3-planned/even-k3-noprefetch,stream-2-planned/even-k2-noprefetch",
                    help="configurations of the study (comma list)")
    ap.add_argument("--study", type=Path, default=RESULTS / "fidelity_stream_q4k_room" / "planned",
                    help="the study's results directory (its profiled cluster and journal)")
    ap.add_argument("--out", type=Path, default=RESULTS / "planned_edge.md")
    a = ap.parse_args(argv)
    F.QUANT = "q4k"
    cfgs = {c.name: c for c in F.configs() + F.stream_configs()}
    bad = [n for n in a.config.split(",") if n not in cfgs]
    if bad:
        print(f"planned_edge: error: no configuration {bad[0]!r} (fix: one of {', '.join(sorted(cfgs))})",
              file=sys.stderr)
        return 2
    md = ["# Streaming predictions against each device's memory", "",
          f"`python experiments/planned_edge.py` ({time.strftime('%Y-%m-%d %H:%M')}): each configuration's plan "
          f"on the study's profiled cluster (`{a.study.name}/`) with the committed fit; predicted TPOT (ms) with one "
          "device's memory scaled at a time.", ""]
    for name in a.config.split(","):
        md += section(cfgs[name], a.study)
    atomic_write_text(a.out, "\n".join(md))
    print("\n".join(md))
    return 0


def section(c: F.Config, study: Path) -> list[str]:
    prof = load_cluster(study / f"fidelity_cluster_{c.variant}.toml")
    plan, cl = F.make(c, prof)
    model = load_model(F.MODEL, F.QUANT)
    base = F._calibrated(cl, F.COMMITTED_FIT)
    measured = next((j for j in F.read_journal(study / "fidelity_runs.jsonl") if j["name"] == c.name), {})
    rows = []
    for dev in [d.name for d in plan.active]:
        tp = []
        for f in SCALES:
            d = base.device(dev)
            sim = predict(plan, model, base.replace_device(d.replace(ram_avail=d.ram_avail * f)), tokens=c.n_tokens,
                          prompt_tokens=F.PROMPT, residency=c.mode, host_cpus=F.HOST["cpus"])
            tp.append(sim.metrics.tpot_ms)
        rows.append(f"| {dev} | " + " | ".join(f"{t:.0f}" for t in tp) + f" | {max(tp) / min(tp):.2f} |")
    meas = measured.get("measured", {}).get("tpot_ms")
    return [f"## {c.name}: {', '.join(f'{d.name}:{d.layers}' for d in plan.active)}, k={plan.k}, prefetch "
            f"{'on' if plan.prefetch else 'off'}" + (f"; measured {meas:.0f} ms" if meas else ""), "",
            "| device | " + " | ".join(f"x{f}" for f in SCALES) + " | max / min |",
            "|---|" + "---|" * (len(SCALES) + 1), *rows, ""]


if __name__ == "__main__":
    raise SystemExit(main())
