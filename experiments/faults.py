"""Faults injected once each into a running `primasim run`: time to detection, exit code, leftovers.

The cluster: three devices (a, b, c; a ring, 20 ms links), emulated as root (cgroups with a 1-core
quota, network namespaces, veth + tbf), plain local processes otherwise; the random 6-layer
llama-tiny, 200 tokens asked for, the fault injected after the 5th token on device b:

- worker SIGKILL: `kill -9` of b's worker;
- worker SIGSTOP: b's worker stopped (a hung device that keeps its sockets open), --heartbeat-timeout 5;
- link stall (root): every link out of b re-shaped to 8 bit/s with tc (heartbeats to the head are not
  shaped, so only the ring stalls), --link-timeout 5;
- compute starved (root): b's CPU quota cut to 1 ms a second (its windows run ~1000x slower while it
  still answers heartbeats, as a hung compute thread would), --compute-timeout 1;
- head SIGKILL: the `primasim run` process killed; the workers should die with it, and the next run
  must remove what is left (state file, work folder, cgroups, namespaces) and succeed.

Detection = fault -> the head's exit (its message printed), or for the head kill, fault -> every worker
gone. Leftovers are checked after each: worker processes, the run's cgroups/namespaces/links, state
file and work folder.

    python experiments/faults.py     # writes experiments/results/faults.{csv,md} (~2 min)
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from primasim import load_model
from primasim.core.io import atomic_csv_rows, atomic_write_text
from primasim.runtime import write_random_checkpoint
from primasim.runtime.emulate import is_root, set_cpu_quota, set_egress_rate
from primasim.runtime.running import process_gone, run_leftovers, run_state, wait_worker_pids

OUT = Path(__file__).parent / "results"
DEV = """
[[devices]]
name = "{n}"
os = "linux"
cores = 1
ram_total_gib = 2
ram_avail_gib = 1
ram_bw_gbs = 10
cpu_gflops = {{ f32 = 20 }}
disk_seq_gbs = 1
emulate = {{ cpu_cores = 1.0 }}
"""
CLUSTER = ('name = "three"\n[network]\nkind = "switched"\nbandwidth_mbps = 1000\nlatency_ms = 20\n'
           + "".join(DEV.format(n=n) for n in "abc"))


def run(model: Path, cf: Path, *extra: str, tokens: int = 200) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "primasim", "run", "--cluster", str(cf), "--model", str(model),
                             "--prompt-ids", "1,2,3", "--tokens", str(tokens), "--system", "even", "--n-ctx", "256",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_tokens(p: subprocess.Popen[bytes], n: int) -> None:
    assert p.stdout is not None
    got = b""
    deadline = time.monotonic() + 180
    while len(got.split()) < n:
        if time.monotonic() > deadline or p.poll() is not None:
            raise RuntimeError("the run produced no tokens")
        if select.select([p.stdout], [], [], 0.5)[0]:
            got += os.read(p.stdout.fileno(), 4096)


def fault(model: Path, cf: Path, name: str, inject: Any, *extra: str) -> dict[str, Any]:
    p = run(model, cf, *extra)
    pids: dict[str, int] = {}
    try:
        pids = wait_worker_pids(p.pid, 3)
        wait_tokens(p, 5)
        st = run_state(p.pid)
        t0 = time.monotonic()
        inject(pids)
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:  # not detected: say so in the table instead of losing the others
            p.kill()
            p.wait()
            return {"fault": name, "detected_s": "> 300 (not detected)", "exit_code": "", "message": "",
                    "leftovers": "", "options": " ".join(extra)}
        dt = time.monotonic() - t0
        time.sleep(0.5)
        msg = [ln for ln in err.decode().splitlines() if "error:" in ln]
        return {"fault": name, "detected_s": round(dt, 2), "exit_code": p.returncode,
                "message": (msg[0] if msg else err.decode().strip().splitlines()[-1])[:300],
                "leftovers": "; ".join(run_leftovers(p.pid, pids, st)) or "none", "options": " ".join(extra)}
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        if p.poll() is None:
            p.kill()
            p.wait()


def summary(items: list[str]) -> str:
    kinds = {"cgroup": sum("/sys/fs/cgroup/" in x for x in items),
             "network namespace": sum(x.startswith("primasim-e") and x.count("-") == 2 for x in items),
             "link (bridge, veth)": sum(x.startswith("primasim-e") and x.count("-") == 1 for x in items),
             "work folder": sum("primasim-run-" in x for x in items), "state file": sum("state file" in x for x in items)}
    return ", ".join(f"{n} {k}" for k, n in kinds.items() if n) or "nothing"


def head_kill(model: Path, cf: Path) -> dict[str, Any]:
    p = run(model, cf)
    pids = wait_worker_pids(p.pid, 3)
    wait_tokens(p, 5)
    st = run_state(p.pid)
    t0 = time.monotonic()
    p.kill()
    p.wait()
    while not all(process_gone(x) for x in pids.values()) and time.monotonic() - t0 < 30:
        time.sleep(0.01)
    dt = time.monotonic() - t0
    before = run_leftovers(p.pid, pids, st)
    nxt = run(model, cf, "--json", tokens=3)
    out, err = nxt.communicate(timeout=300)
    lim = json.loads(out)["emulation"]["limitations"] if nxt.returncode == 0 else [err.decode()[-200:]]
    after = run_leftovers(p.pid, pids, st)
    return {"fault": "head SIGKILL", "detected_s": round(dt, 2), "exit_code": nxt.returncode,
            "message": "workers gone (PDEATHSIG); left until the next run: " + summary(before) + "; next run: " +
            "; ".join(x for x in lim if "removed" in x), "leftovers": "; ".join(after) or "none", "options": ""}


def main() -> int:
    root = is_root()
    with tempfile.TemporaryDirectory(prefix="faults-") as d:
        model = write_random_checkpoint(load_model("llama-tiny"), Path(d) / "llama-tiny", seed=7)
        (model / "tokenizer.json").unlink()
        cf = Path(d) / "three.toml"
        cf.write_text(CLUSTER)

        def stall(pids: dict[str, int]) -> None:
            ns = subprocess.run(["ip", "netns", "identify", str(pids["b"])], capture_output=True,
                                text=True).stdout.strip()
            set_egress_rate(ns, 8)


        rows = [fault(model, cf, "worker SIGKILL", lambda p: os.kill(p["b"], signal.SIGKILL)),
                fault(model, cf, "worker SIGSTOP", lambda p: os.kill(p["b"], signal.SIGSTOP),
                      "--heartbeat-timeout", "5")]
        if root:
            rows.append(fault(model, cf, "link stall (tc 8 bit/s out of b)", stall, "--link-timeout", "5"))
            rows.append(fault(model, cf, "compute starved (b: 1 ms CPU a second)",
                              lambda p: set_cpu_quota(p["b"], 1000), "--compute-timeout", "1"))
        rows.append(head_kill(model, cf))
    cols = ["fault", "detected_s", "exit_code", "leftovers", "options", "message"]
    atomic_csv_rows(OUT / "faults.csv", rows, cols)
    md = ["# Faults injected mid-generation (`python experiments/faults.py`)", "",
          f"Three devices ({'emulated: cgroups, network namespaces, tbf' if root else 'plain processes (not root)'}),"
          " llama-tiny, fault on device b after the 5th of 200 tokens. Detection: fault -> the head's exit (its"
          " clean-up included); for the head kill, fault -> all workers gone (exit code: the next run's). Leftovers:"
          " worker processes, the run's cgroups, namespaces, links, work folder and state file after the exit.", "",
          "| fault | detected (s) | exit code | leftovers | options | message |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append("| " + " | ".join(str(r[c]).replace("|", "/") for c in cols) + " |")
    md += ["", f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d')}"]
    atomic_write_text(OUT / "faults.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
