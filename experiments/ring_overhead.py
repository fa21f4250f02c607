"""Per-hop overhead of the runtime's ring on loopback (issue #4 target: <= 0.5 ms per hop).

A hop is everything between one device finishing its window and the next device starting its own:
hand-off to the sender thread, wire encoding (header + CRC-32), zmq PUSH -> PULL over TCP loopback,
the receiver's poll wake-up, decoding and the copy into the compute thread. It is measured in the
real runtime (`run_plan`: one worker process per device, no emulated latency) from the trace: for
consecutive windows of the same token on different devices, hop = start of the next window's
compute span - end of the previous one (one host, one clock). Configurations: rings of 2, 3 and 6
devices, k = 1 and 2 laps, the 6-layer llama-tiny (hidden 128: 572-byte messages) and a 2-layer
model with hidden 4096 (16 KiB + 60-byte messages, Llama 3-8B's hidden size).

A second table is the floor without the runtime around it: the same wire format over a zmq
PUSH/PULL pair between two processes, one-way (arrival - send, one clock), with the receiver hot
(back to back) or idle for 2 or 7 ms before each message, as a device is while the rest of the
ring computes: on this VM, waking an idle process costs more than the transfer.

    python experiments/ring_overhead.py            # writes experiments/results/ring_overhead.{csv,md}
    python experiments/ring_overhead.py --quick    # fewer tokens, for a smoke test

The host has 2 vCPUs shared with other jobs: rings of more devices than cores measure the
scheduler's wake-up latency as well; the table says how busy the machine was (load average).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from primasim import load_model
from primasim.core.cluster import ClusterSpec, cluster_from_toml
from primasim.core.io import atomic_csv_rows, atomic_write_text
from primasim.core.model import ModelSpec
from primasim.core.plan import DevicePlan, Plan
from primasim.runtime import open_checkpoint, write_random_checkpoint
from primasim.runtime.head import RunOptions, run_plan

OUT = Path(__file__).resolve().parent / "results"


def _cluster(n: int) -> ClusterSpec:
    devs = [{"name": f"d{i}", "os": "linux", "cores": 1, "ram_total_gib": 4, "ram_avail_gib": 2, "ram_bw_gbs": 10,
             "cpu_gflops": {"f32": 10}, "disk_seq_gbs": 1} for i in range(n)]
    return cluster_from_toml({"name": f"loop{n}", "network": {"kind": "switched", "bandwidth_mbps": 100000,
                                                              "latency_ms": 0}, "devices": devs}, f"loop{n}")


def hops(trace: Any, skip_prefill: bool = True) -> list[float]:
    """Gaps between consecutive compute spans of one token on different devices (seconds)."""
    out: list[float] = []
    by_tok: dict[tuple[int, int], list[Any]] = {}
    for s in trace.spans:
        if s.resource == "cpu" and (s.name.startswith("L") or s.name in ("output", "output+sample")):
            by_tok.setdefault((s.seq, s.token), []).append(s)
    for (_, tok), spans in sorted(by_tok.items()):
        if skip_prefill and tok == 0:
            continue
        spans.sort(key=lambda s: s.start)
        for a, b in zip(spans, spans[1:]):
            if a.device != b.device:
                out.append(b.start - a.end)
    return out


def ring_rows(tokens: int, workdir: Path) -> list[dict[str, Any]]:
    tiny = write_random_checkpoint(load_model("llama-tiny"), workdir / "llama-tiny", seed=1)
    wide_spec = ModelSpec(name="wide2", family="llama", n_layers=2, hidden=4096, n_heads=32, n_kv_heads=8,
                          head_dim=128, ffn=64, vocab=256, quant="f32", max_context=512)
    wide = write_random_checkpoint(wide_spec, workdir / "wide2", seed=1)
    configs = [("llama-tiny", tiny, 2, 1), ("llama-tiny", tiny, 3, 1), ("llama-tiny", tiny, 3, 2),
               ("llama-tiny", tiny, 6, 1), ("wide2 (hidden 4096)", wide, 2, 1)]
    rows = []
    for label, path, m, k in configs:
        ckpt = open_checkpoint(path)
        L = ckpt.spec.n_layers
        w = L // (m * k)
        plan = Plan(system="prima", model=ckpt.spec.name, n_layers=L, k=k,
                    devices=tuple(DevicePlan(f"d{i}", w) for i in range(m)), quant="f32", n_ctx=tokens + 16)
        load0 = os.getloadavg()[0]
        res = run_plan(plan, ckpt, _cluster(m), [[1, 2, 3, 4]], RunOptions(max_new_tokens=tokens, emulate=False))
        h = np.array(hops(res.trace)) * 1e3
        idle = np.array([s.end - s.start for s in res.trace.spans if s.resource == "wait" and s.token > 0]) * 1e3
        msg = 4 * ckpt.spec.hidden + 60
        tpot = res.to_json()["tpot_ms"]
        rows.append({"table": "ring", "config": f"{label}: {m} devices, k={k}", "message_bytes": msg,
                     "hops_per_token": m * k, "n_hops": int(h.size), "hop_median_ms": float(np.median(h)),
                     "hop_p90_ms": float(np.percentile(h, 90)), "hop_mean_ms": float(h.mean()),
                     "tpot_ms": tpot, "hop_share_of_tpot": float(np.median(h)) * m * k / tpot,
                     "receiver_idle_ms": float(np.median(idle)),
                     "load_avg_1min": load0})
        print(json.dumps(rows[-1]), flush=True)
    return rows


ECHO = """
import sys, time, zmq
from primasim.runtime import wire
ctx = zmq.Context(); pull = ctx.socket(zmq.PULL); port = pull.bind_to_random_port("tcp://127.0.0.1")
push = ctx.socket(zmq.PUSH); push.connect(sys.argv[1]); print(port, flush=True)
while True:
    got = wire.recv(pull, None, peer="bench")
    t = time.time()  # arrival, on the host's one clock
    m = got[1]
    if m.type == wire.MsgType.SHUTDOWN: break
    wire.send(push, wire.MsgType.ACT, array=m.array, seq=m.seq, pos=int((t % 1000) * 1e6))
for s in (pull, push): s.close(linger=0)
ctx.term()
"""


def pingpong_rows(n: int) -> list[dict[str, Any]]:
    """One-way latency of the wire format over zmq between two processes: the receiver either
    hot (back-to-back messages) or idle for `gap` (like a device waiting while the ring computes:
    waking an idle process costs more than the transfer itself on this VM)."""
    import zmq

    from primasim.runtime import wire

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    echo = subprocess.Popen([sys.executable, "-c", ECHO, f"tcp://127.0.0.1:{port}"], stdout=subprocess.PIPE, text=True)
    assert echo.stdout is not None
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{echo.stdout.readline().strip()}")
    rows = []
    try:
        for nbytes, gap in ((512, 0.0), (16384, 0.0), (65536, 0.0), (512, 0.002), (16384, 0.002),
                            (512, 0.007), (16384, 0.007)):
            x = np.zeros(nbytes // 4, np.float32)
            for _ in range(20):  # warm the connection and the allocator
                wire.send(push, wire.MsgType.ACT, array=x)
                wire.recv(pull, 10, peer="echo")
            one_way = []
            for i in range(n if gap == 0 else max(100, n // 10)):
                t_gap = time.perf_counter()
                while time.perf_counter() - t_gap < gap:
                    pass  # the sender computes; the receiver sleeps
                t0 = time.time()
                wire.send(push, wire.MsgType.ACT, array=x, seq=i)
                got = wire.recv(pull, 10, peer="echo")
                assert got is not None and got[1].seq == i
                arrived = got[1].pos / 1e6
                one_way.append(((arrived - t0 % 1000) % 1000) * 1e3)
            ow = np.array(one_way)
            rows.append({"table": "wire one-way", "config": f"receiver idle {gap * 1e3:.0f} ms before each message",
                         "message_bytes": nbytes + 60, "idle_ms": gap * 1e3, "n_hops": int(ow.size),
                         "hop_median_ms": float(np.median(ow)), "hop_p90_ms": float(np.percentile(ow, 90)),
                         "hop_mean_ms": float(ow.mean()), "load_avg_1min": os.getloadavg()[0]})
            print(json.dumps(rows[-1]), flush=True)
        wire.send(push, wire.MsgType.SHUTDOWN)
    finally:
        echo.wait(timeout=10)
        for sock in (pull, push):
            sock.close(linger=0)
        ctx.term()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and round trips")
    ap.add_argument("--out", default=str(OUT / "ring_overhead"), help="output prefix (.csv, .md)")
    args = ap.parse_args()
    tokens, n = (10, 200) if args.quick else (60, 2000)
    with tempfile.TemporaryDirectory(prefix="primasim-ring-") as d:
        rows = ring_rows(tokens, Path(d))
    rows += pingpong_rows(n)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))  # first appearance: the same header every run
    atomic_csv_rows(out.with_suffix(".csv"), rows, keys)
    ring = [r for r in rows if r["table"] == "ring"]
    pp = [r for r in rows if r["table"] != "ring"]
    lines = ["# Per-hop overhead of the runtime's ring on loopback", "",
             f"`python experiments/ring_overhead.py{' --quick' if args.quick else ''}` on "
             f"{time.strftime('%Y-%m-%d %H:%M')} ({os.cpu_count()} CPUs; {tokens} tokens per ring run, "
             f"{n} round trips per ping-pong size). Target (issue #4): <= 0.5 ms per hop.", "",
             "## In the runtime (one worker process per device, `run_plan`, decode tokens only)", "",
             "| configuration | message | hops/token | hops | median ms | P90 ms | receiver idle ms | TPOT ms | "
             "hops' share of TPOT | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ring:
        lines.append(f"| {r['config']} | {r['message_bytes']} B | {r['hops_per_token']} | {r['n_hops']} | "
                     f"{r['hop_median_ms']:.3f} | {r['hop_p90_ms']:.3f} | {r['receiver_idle_ms']:.1f} | "
                     f"{r['tpot_ms']:.2f} | {100 * r['hop_share_of_tpot']:.0f} % | {r['load_avg_1min']:.1f} |")
    lines += ["", "## Floor: the wire format over zmq alone (2 processes, one-way, arrival - send on one clock)", "",
              "| message | receiver idle before | messages | median ms | P90 ms | load |", "|---|---|---|---|---|---|"]
    for r in pp:
        lines.append(f"| {r['message_bytes']} B | {r['idle_ms']:.0f} ms | {r['n_hops']} | {r['hop_median_ms']:.3f} | "
                     f"{r['hop_p90_ms']:.3f} | {r['load_avg_1min']:.1f} |")
    worst = max(r["hop_median_ms"] for r in ring)
    small = max(r["hop_median_ms"] for r in ring if r["message_bytes"] < 1000)
    lines += ["", f"Largest median per-hop overhead in the runtime: {worst:.3f} ms over all configurations, "
              f"{small:.3f} ms with small messages ({'meets' if worst <= 0.5 else 'misses'} the 0.5 ms target "
              f"{'everywhere' if worst <= 0.5 else 'in the worst configuration'}).",
              "'receiver idle' is how long the receiving device waited before the hop (median): compare the "
              "runtime's hops with the floor at a similar idle time; what is left (hop - floor) is the runtime's "
              "own work (encode + CRC, zmq send, poll wake-up, decode, copy, dispatch)."]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
