"""validate's outputs: the comparison CSV, both Chrome traces, the JSON summary and the figure."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.patches
import matplotlib.pyplot as plt  # headless, matplotlib picks Agg
import numpy as np

from primasim.core.errors import SpecError
from primasim.core.io import atomic_open, atomic_savefig, atomic_write_text
from primasim.core.units import MB

if TYPE_CHECKING:  # the driver imports this module: its result type, for annotations only
    from .driver import ValidateResult


def check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SpecError(f"cannot write there ({exc.strerror})", where=str(out), fix="give a writable --out DIR") from None


def write_outputs(res: ValidateResult) -> None:
    """CSV, figure, both timelines, the profiled cluster and the plan."""

    f = res.files()
    with atomic_open(f["comparison"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["metric", "device", "unit", "predicted", "measured", "error_pct", "error_pp"])
        for r in res.rows:
            j = r.to_json()
            w.writerow([j["metric"], j["device"], j["unit"], f"{j['predicted']:.6g}", f"{j['measured']:.6g}",
                        f"{j['error_pct']:.2f}", f"{j['error_pp']:.2f}"])
    res.predicted.trace.save_chrome(f["predicted_trace"])
    res.measured.trace.save_chrome(f["measured_trace"])
    res.profile.cluster.save(f["cluster"])
    atomic_write_text(f["probes"], json.dumps(res.profile.probes, indent=1) + "\n")
    res.plan.save(f["plan"])
    plot(res, f["figure"])


def plot(res: ValidateResult, path: Path) -> None:
    """Four panels: headline metrics, per-token latency, per-device disk bytes and memory, and the
    timelines of one decode token, predicted above measured."""
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    # (a) headline metrics, normalised to the measurement
    heads = [r for r in res.rows if r.device == "" and math.isfinite(r.reference) and r.reference > 0]
    x = np.arange(len(heads))
    a = ax[0, 0]
    a.bar(x - 0.2, [r.predicted / r.reference for r in heads], 0.4, label="predicted / measured")
    a.axhline(1.0, color="k", lw=1)
    a.axhspan(0.95, 1.05, color="green", alpha=0.15, label="+/-5 %")
    for i, r in enumerate(heads):
        a.text(i - 0.2, r.predicted / r.reference + 0.02, f"{r.predicted / r.scale:.3g}\n{r.reference / r.scale:.3g}",
               ha="center", fontsize=7)
    a.set_xticks(x, [f"{r.metric}\n({r.unit})" for r in heads], fontsize=8)
    a.set_ylabel("predicted / measured")
    a.set_ylim(0, max(1.3, max((r.predicted / r.reference for r in heads), default=1) + 0.2))
    a.legend(fontsize=8)
    a.set_title("headline (labels: predicted over measured)")
    # (b) token times
    a = ax[0, 1]
    for tr, lab, st in ((res.predicted.trace, "predicted", "-"), (res.measured.trace, "measured", "--")):
        toks = sorted((t for t in tr.tokens if t.seq == 0), key=lambda t: t.index)
        if len(toks) > 1:
            gaps = np.diff([t.time for t in toks]) * 1e3
            a.plot(range(1, len(toks)), gaps, st, marker=".", label=f"{lab} (mean {gaps.mean():.1f} ms)")
    a.set_xlabel("token index")
    a.set_ylabel("time between tokens (ms)")
    a.legend(fontsize=8)
    a.set_title("per-token latency")
    # (c) per-device disk bytes per token and peak memory
    a = ax[1, 0]
    devs = [r.device for r in res.rows if r.metric == "disk read per token"]
    x = np.arange(len(devs))
    disk = {r.device: r for r in res.rows if r.metric == "disk read per token"}
    peak = {r.device: r for r in res.rows if r.metric == "peak memory"}
    a.bar(x - 0.3, [disk[d].predicted / MB for d in devs], 0.2, label="disk/token predicted", color="C0")
    a.bar(x - 0.1, [disk[d].reference / MB for d in devs], 0.2, label="disk/token measured", color="C0", alpha=0.5)
    if peak:
        a.bar(x + 0.1, [peak[d].predicted / MB if d in peak else 0 for d in devs], 0.2, label="peak mem predicted",
              color="C1")
        a.bar(x + 0.3, [peak[d].reference / MB if d in peak else 0 for d in devs], 0.2, label="peak mem measured",
              color="C1", alpha=0.5)
    a.set_xticks(x, devs)
    a.set_ylabel("MB")
    a.legend(fontsize=7)
    a.set_title("per device: disk read per token, peak memory above the footprint")
    # (d) timelines of the middle decode token
    a = ax[1, 1]
    names = [d.name for d in res.plan.devices if d.layers > 0 or d.name == res.plan.devices[0].name]
    colors = {"cpu": "C0", "disk": "C3", "prefetch": "C1", "send": "C2", "net": "C2", "wait": "0.85"}
    for k, tr in enumerate((res.predicted.trace, res.measured.trace)):
        toks = sorted((t for t in tr.tokens if t.seq == 0), key=lambda t: t.index)
        if len(toks) < 4:
            continue
        mid = len(toks) // 2
        t0, t1 = toks[mid - 1].time, toks[mid + 1].time
        for i, n in enumerate(names):
            y = i * 2.5 + k
            for sp in tr.spans:
                if sp.device == n and sp.end > t0 and sp.start < t1 and sp.resource in colors and sp.resource != "wait":
                    a.barh(y, (min(sp.end, t1) - max(sp.start, t0)) * 1e3, left=(max(sp.start, t0) - t0) * 1e3,
                           height=0.8, color=colors[sp.resource], alpha=0.9 if k == 0 else 0.55)
    a.set_yticks([i * 2.5 + k for i in range(len(names)) for k in (0, 1)],
                 [f"{n} {lab}" for n in names for lab in ("pred", "meas")], fontsize=7)
    a.set_xlabel("ms (two decode tokens)")
    handles = [matplotlib.patches.Patch(color=c, label=r) for r, c in colors.items() if r not in ("wait", "net")]
    a.legend(handles=handles, fontsize=7, loc="lower right")
    a.set_title("timeline: two decode tokens (Chrome traces have all)")
    cl = res.profile.cluster
    fig.suptitle(f"primasim validate: {res.config.model} on {cl.name}, {res.plan.describe()}"
                 + (" (degraded: no limits)" if res.degraded else ""), fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
