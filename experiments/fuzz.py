"""Fuzz every input parser for many examples and tabulate what happened (issue 7, "Bad input, fuzzed").

The targets are tests/test_fuzz.py's TARGETS (cluster and catalogue TOML, config.json, GGUF metadata,
plan JSON, safetensors and GGUF checkpoints, wire messages). Each example ends as `accepted`, a clear
error (PrimasimError subclass, by class name) or a crash (anything else, or an error without where/fix).
Also recorded per target: seconds, and the growth of the process's peak RSS while it ran.

    python experiments/fuzz.py                 # 5000 examples per target (~10 min on 1 core)
    python experiments/fuzz.py --examples 300 --only wire gguf

Writes experiments/results/fuzz.md and fuzz.csv; exits 1 if any example crashed.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings

from primasim.core.io import atomic_open, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"


def _load_targets() -> Any:
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("test_fuzz", ROOT / "tests" / "test_fuzz.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def fuzz_target(mod: Any, name: str, examples: int, seed: int) -> dict[str, Any]:
    strategy, _ = mod.TARGETS[name]
    counts: Counter[str] = Counter()
    crashes: list[str] = []

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(inp: Any) -> None:
        o = mod.outcome(name, inp)
        counts[o] += 1
        if o.startswith("crash") and len(crashes) < 5:
            crashes.append(f"{o}: {repr(inp)[:300]}")

    run._hypothesis_internal_use_seed = seed  # reproducible runs
    rss0, t0 = _peak_rss_mib(), time.perf_counter()
    run()
    return {"target": name, "examples": sum(counts.values()), "counts": counts, "crashes": crashes,
            "seconds": time.perf_counter() - t0, "peak_rss_growth_mib": _peak_rss_mib() - rss0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=5000, help="examples per target (default 5000)")
    ap.add_argument("--only", nargs="*", help="targets to run (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for fuzz.md and fuzz.csv")
    args = ap.parse_args()
    mod = _load_targets()
    names = args.only or list(mod.TARGETS)
    rows = []
    for name in names:
        r = fuzz_target(mod, name, args.examples, args.seed)
        rows.append(r)
        print(f"{name:22s} {r['examples']:6d} examples {r['seconds']:7.1f} s  peak RSS +{r['peak_rss_growth_mib']:.1f} MiB  "
              + ", ".join(f"{k} {v}" for k, v in r["counts"].most_common()), flush=True)
        for c in r["crashes"]:
            print("   ", c)
    classes = sorted({k for r in rows for k in r["counts"]})
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.out / "fuzz.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["target", "examples", *classes, "crashes", "seconds", "peak_rss_growth_mib"])
        for r in rows:
            n_crash = sum(v for k, v in r["counts"].items() if k.startswith("crash"))
            w.writerow([r["target"], r["examples"], *(r["counts"].get(k, 0) for k in classes), n_crash,
                        f"{r['seconds']:.1f}", f"{r['peak_rss_growth_mib']:.1f}"])
    total_crash = sum(v for r in rows for k, v in r["counts"].items() if k.startswith("crash"))
    lines = ["# Fuzzing the input parsers", "",
             f"`python experiments/fuzz.py --examples {args.examples} --seed {args.seed}`"
             f"{' --only ' + ' '.join(names) if args.only else ''}: hypothesis-generated inputs per parser "
             "(targets and mutations: tests/test_fuzz.py). An outcome is `accepted`, a clear error (a "
             "PrimasimError subclass with where and fix, by class name) or a crash (anything else). Peak RSS "
             "growth: how much the process's peak resident memory rose while the target ran (the first "
             "target also pays for imports and the seed files).", "",
             "| target | examples | " + " | ".join(classes) + " | crashes | seconds | peak RSS growth (MiB) |",
             "|---|---:|" + "---:|" * len(classes) + "---:|---:|---:|"]
    for r in rows:
        n_crash = sum(v for k, v in r["counts"].items() if k.startswith("crash"))
        lines.append(f"| {r['target']} | {r['examples']} | " + " | ".join(str(r["counts"].get(k, 0)) for k in classes)
                     + f" | {n_crash} | {r['seconds']:.1f} | {r['peak_rss_growth_mib']:.1f} |")
    lines += ["", f"Total: {sum(r['examples'] for r in rows)} examples, {total_crash} crashes."]
    for r in rows:
        for c in r["crashes"]:
            lines.append(f"- {r['target']}: `{c}`")
    atomic_write_text(args.out / "fuzz.md", "\n".join(lines) + "\n")
    return 1 if total_crash else 0


if __name__ == "__main__":
    sys.exit(main())
