"""`primasim profile`: measure this machine and write a one-device cluster file.

The default output is the cache file the `local` cluster reads, so after one `primasim profile`,
`--cluster local` plans and simulates with measured figures instead of nominal ones.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from primasim.core.cluster import local_profile_path
from primasim.core.units import GB, GFLOPS, MS, GiB
from primasim.profile.profiler import (
    Profile,
    add_arguments,
    check_writable,
    config_from_args,
    run_profile,
)

from . import HELP
from .output import console

DESCRIPTION = """Measure every DeviceSpec quantity of this machine (or of the emulated device whose cgroup limits it
runs under) and write a cluster TOML with one device, plus a sidecar JSON with every sample. ~15 s
(--quick: a few seconds)."""  # argparse re-wraps it


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help=HELP["profile"],
                       description=DESCRIPTION)
    add_arguments(p, default_out=local_profile_path())
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = check_writable(args.out)  # fail before measuring, not after
    argv = sys.argv[1:] if sys.argv[1:2] == ["profile"] else ["profile"]
    cfg = config_from_args(args, "primasim " + " ".join(shlex.quote(a) for a in argv))
    err = console(stderr=True)
    with Progress(TextColumn("[bold]profile[/]"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), TextColumn("{task.description}"), console=err, transient=True) as bar:
        task = bar.add_task("starting", total=1.0)

        def progress(msg: str, frac: float) -> None:
            bar.update(task, completed=frac, description=msg or bar.tasks[0].description)

        prof = run_profile(cfg, progress)
    is_local = str(out) == local_profile_path()
    side = prof.save(out, "local" if is_local else None)
    if args.json:
        print(json.dumps({**prof.to_json(), "out": str(out), "sidecar": str(side)}, indent=2))
        return 0
    console().print(summary_table(prof))
    console().print(f"wrote [bold]{out}[/] (how each figure was measured: its \\[devices.sources]; "
                    f"every sample: {side.name})"
                    + ("  ->  `--cluster local` now uses these figures" if is_local else
                       f"  ->  use it with `--cluster {out}`"))
    return 0


def summary_table(prof: object) -> object:
    """A rich Table of every figure with its spread and method."""

    assert isinstance(prof, Profile)
    d = prof.device
    m = prof.measurements
    t = Table(title=f"device profile: {d.name} ({d.hardware})", title_justify="left")
    t.add_column("quantity")
    t.add_column("DeviceSpec key")
    t.add_column("value", justify="right")
    t.add_column("spread: IQR; min-max; n")

    def spread(key: str) -> str:
        if key not in m:
            return "not measured: nominal figure"
        x = m[key]
        lo, hi = x.spread
        s = x.scale
        f = [_num(v / s) for v in (lo, hi, min(x.samples), max(x.samples))]
        return f"{f[0]}-{f[1]}; {f[2]}-{f[3]}; {len(x.samples)}"

    t.add_row("compute threads", "cores", str(d.cores), "-")
    t.add_row("RAM total", "ram_total_gib", f"{d.ram_total / GiB:.2f} GiB", "-")
    t.add_row("RAM available", "ram_avail_gib", f"{d.ram_avail / GiB:.2f} GiB", "-")
    t.add_row("swap total / free", "swap_*_gib", f"{d.swap_total / GiB:.2f} / {d.swap_avail / GiB:.2f} GiB", "-")
    t.add_row("RAM read bandwidth", "ram_bw_gbs", f"{d.ram_bw / GB:.2f} GB/s", spread("ram_bw"))
    t.add_row("CPU f32 (block GEMM)", "cpu_gflops.f32", f"{d.cpu_flops['f32'] / GFLOPS:.1f} GFLOPS", spread("gemm"))
    for key, label in (("gemv_hot", "  GEMV, weights hot"), ("gemv_cold", "  GEMV, weights from DRAM"),
                       ("gemv_cold_bw", "  GEMV weight stream"), ("nxn", "  prima.cpp n x n"),
                       ("gemm_f16_native", "  XLA native f16 GEMM")):
        if key in m:
            t.add_row(label, "(sidecar)", f"{m[key].value / m[key].scale:.3g} {m[key].unit}", spread(key))
    t.add_row("KV append / layer", "kv_copy_ms", f"{d.kv_copy / MS * 1000:.3g} us", spread("kv_copy"))
    t.add_row("disk sequential read", "disk_seq_gbs", f"{d.disk_seq / GB:.3f} GB/s", spread("disk_seq"))
    t.add_row("disk random read", "disk_rnd_gbs", f"{d.disk_rnd / GB:.3f} GB/s", spread("disk_rnd"))
    if prof.link:
        t.add_row("link latency (one-way)", "network.latency_ms", f"{prof.link.latency.value / MS:.3f} ms",
                  spread("net_latency"))
        t.add_row("link bandwidth", "network.bandwidth_mbps",
                  f"{prof.link.bandwidth.value / 1e6:.1f} MB/s ({prof.link.bandwidth.value * 8 / 1e6:.0f} Mbps)",
                  spread("net_bandwidth"))
    return t


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
