"""Measure named configurations of the fidelity study on the profiled cluster of a committed run
(experiments/fidelity.py), outside a study: for checks of bytes and residency that the host's load
does not distort (run niced, outside the measurement lock; its times are not comparable).

    sudo .venv/bin/python experiments/fidelity_one.py --run experiments/results/fidelity_stream_q4k/run1 \\
        --journal experiments/results/fidelity_stream_q4k/checks/lru.jsonl stream-2-lru/even-k2-noprefetch

Appends one journal line per configuration (the study's format) and prints the disk bytes each
device read per generated token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import fidelity as F

from primasim.core.cluster import load_cluster
from primasim.core.model_sources import load_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run directory with fidelity_cluster_stream.toml")
    ap.add_argument("--journal", required=True, help="journal to append to")
    ap.add_argument("--quant", default="q4k")
    ap.add_argument("names", nargs="+")
    a = ap.parse_args(argv)
    from primasim.runtime.head import cached_random_weights

    F.QUANT, F.FOREIGN_RETRY = a.quant, 1.0
    prof = load_cluster(Path(a.run) / "fidelity_cluster_stream.toml")
    weights = cached_random_weights(load_model(F.MODEL, a.quant), fmt="gguf")
    with open(a.journal, "a") as out:
        for n in a.names:
            if n not in F.CONFIGS:
                print(f"fidelity_one: no configuration {n!r} (see experiments/fidelity.py)", file=sys.stderr)
                return 2
            c = F.CONFIGS[n]
            plan, _ = F.make(c, prof)
            t0 = time.time()
            try:
                m = F.measure_config(c, plan, F.variant("stream"), weights)
            except Exception as e:  # noqa: BLE001 (a failed run is a finding: journal it)
                out.write(json.dumps({"name": n, "plan": plan.to_json(), "failed": str(e)[:400]}) + "\n")
                print(f"{n}: FAILED {e}")
                continue
            out.write(json.dumps({"name": n, "plan": plan.to_json(), "measured": m}) + "\n")
            out.flush()
            per = " ".join(f"{d}:{st['disk_read_bytes'] / c.n_tokens / 1e6:.1f}" for d, st in m["device_stats"].items())
            print(f"{n}: TPOT {m['tpot_ms']:.0f} ms, MB/token {per} ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
