"""`primasim clusters`: list built-in clusters or describe one."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from primasim.core.cluster import builtin_clusters, load_cluster
from primasim.core.units import GB, GFLOPS, MBPS, MS, GiB

from . import HELP
from .output import console


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clusters", help=HELP["clusters"])
    p.add_argument("--cluster", help="describe one cluster: built-in name or TOML path")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.cluster:
        if args.json:
            print(json.dumps(builtin_clusters()))
            return 0
        t = Table(title="built-in clusters")
        t.add_column("name")
        t.add_column("devices")
        t.add_column("description")
        for name in builtin_clusters():
            try:
                c = load_cluster(name)
                t.add_row(name, ", ".join(c.names), c.description)
            except Exception as exc:  # a broken built-in should not hide the others
                t.add_row(name, "?", f"error: {exc}")
        console().print(t)
        return 0
    c = load_cluster(args.cluster)
    if args.json:
        print(json.dumps(c.to_toml(), indent=2))
        return 0
    t = Table(title=f"{c.name}: {c.network.kind}, {c.network.bandwidth / MBPS:.0f} Mbps, "
              f"{c.network.latency / MS:.1f} ms")
    for col in ("device", "os", "cores", "RAM avail GiB", "RAM GB/s", "CPU f32 GFLOPS", "disk GB/s", "GPU", "VRAM avail GiB"):
        t.add_column(col)
    for d in c.devices:
        t.add_row(d.name + (" (head)" if d.name == c.head else ""), d.os, str(d.cores), f"{d.ram_avail / GiB:.1f}",
                  f"{d.ram_bw / GB:.0f}", f"{d.cpu_flops['f32'] / GFLOPS:.0f}", f"{d.disk_speed / GB:.2f}",
                  d.gpu.kind if d.gpu else "-", f"{d.gpu.vram_avail / GiB:.1f}" if d.gpu else "-")
    console().print(t)
    return 0
