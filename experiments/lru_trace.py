"""Summarise a runtime page-cache trace (PRIMASIM_PAGE_TRACE, runtime/worker/pagetrace.py): per lru
device, per window computed, the bytes the worker read and its major faults while computing and
between windows (its prefetch, the readahead in flight), its cgroup's active / inactive file
lists, and which file bytes were in memory when the window started and ended -- its own layers
and the others' (the kernel's read-around). Compared with experiments/lru_readaround.py's replay
of the same windows and with the simulator (experiments/lru_mechanisms.py).

    sudo env PRIMASIM_PAGE_TRACE=/tmp/trace .venv/bin/python experiments/fidelity_one.py \\
        --run experiments/results/fidelity_stream_q4k_cold/run1 --journal /tmp/one.jsonl stream-4-lru/even-k4-noprefetch
    python experiments/lru_trace.py /tmp/trace [--out experiments/results/lru_trace.md] [--title TEXT]

Bytes, not times (a traced run samples ~1-3 ms a window): run it niced, outside the measurement lock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from lru_readaround import layer_spans

from primasim.core.model_sources import load_model


def _per_layer(res: list[int], spans: dict[int, tuple[int, int]]) -> dict[int, float]:
    """MB of each layer in memory from the trace's pages per MiB (a bin straddling two layers counts
    for both: the per-layer figures are within ~1 MB)."""
    out = {}
    for i, (a, b) in spans.items():
        lo, hi = a >> 20, (b - 1) >> 20
        out[i] = sum(res[lo:hi + 1]) * 4096 / 1e6
    return out


def summarise(d: Path, spans: dict[int, tuple[int, int]]) -> list[str]:
    lines = ["| device | windows (steady) | read MB / window while computing | read between windows | major faults / window "
             "| active file MB | inactive file MB | own layers in memory at start / end MB | others' at end MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(d.glob("*.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        pairs = [(a, b) for a, b in zip(rows, rows[1:]) if a["tag"] == "before" and b["tag"] == "after"
                 and a["window"] == b["window"]]
        own = sorted({i for a, _ in pairs for i in range(*a["window"])})
        steady = [(k, a, b) for k, (a, b) in enumerate(pairs) if a.get("pos", 0) > 0]  # after the prompt's pass
        if not steady or not own:
            continue
        comp = [(b["read"] - a["read"]) / 1e6 for _, a, b in steady]
        between = [(a["read"] - pairs[k - 1][1]["read"]) / 1e6 for k, a, _ in steady if k > 0]
        mf = [b["majflt"] - a["majflt"] for _, a, b in steady]
        act = [b["stat"].get("total_active_file", b["stat"].get("active_file", 0)) / 1e6 for _, _, b in steady]
        ina = [b["stat"].get("total_inactive_file", b["stat"].get("inactive_file", 0)) / 1e6 for _, _, b in steady]
        own_s = [sum(v for i, v in _per_layer(a["resident_pages_per_mib"], spans).items() if i in own) for _, a, _ in steady]
        own_e = [sum(v for i, v in _per_layer(b["resident_pages_per_mib"], spans).items() if i in own) for _, _, b in steady]
        tot_e = [sum(b["resident_pages_per_mib"]) * 4096 / 1e6 for _, _, b in steady]
        med = statistics.median
        lines.append(f"| {f.stem} (layers {own[0]}-{own[-1]}, {len(own)}) | {len(steady)} | {med(comp):.1f} | "
                     f"{med(between) if between else 0.0:.1f} | {med(mf):.1f} | {min(act):.1f}-{max(act):.1f} | "
                     f"{med(ina):.1f} | {med(own_s):.1f} / {med(own_e):.1f} | {med(t - o for t, o in zip(tot_e, own_e)):.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", nargs="+", help="trace directories (one per run), each DIR/<device>.jsonl")
    ap.add_argument("--title", action="append", default=[], help="a heading per trace directory")
    ap.add_argument("--out", default="")
    ap.add_argument("--file", default="", help="the GGUF file the devices mapped (default: the study's)")
    a = ap.parse_args(argv)
    path = a.file
    if not path:
        from primasim.runtime.head import cached_random_weights

        path = str(cached_random_weights(load_model("llama-mini-300m", "q4k"), fmt="gguf"))
    spans, _, _ = layer_spans(path)
    lines: list[str] = []
    for k, d in enumerate(a.trace):
        lines += ["", f"### {a.title[k] if k < len(a.title) else d}", ""] + summarise(Path(d), spans)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
