"""A running `primasim run` seen from outside (tests, experiments, tools): its worker processes, the
emulation state it recorded, and what of it is left once it has ended."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from primasim.runtime.emulate import find_leftovers, state_dir

WORKER_ARGV = ["-m", "primasim", "worker"]  # after `emulate enter` has exec'd into the worker


def worker_pids(head: int) -> dict[str, int]:
    """The worker processes that the driver process `head` started, by device name."""
    out: dict[str, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = [a.decode(errors="replace") for a in (d / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if args[1:4] == WORKER_ARGV and "--parent-pid" in args and "--name" in args \
                and args[args.index("--parent-pid") + 1] == str(head):
            out[args[args.index("--name") + 1]] = int(d.name)
    return out


def wait_worker_pids(head: int, n: int, timeout: float = 120.0) -> dict[str, int]:
    """`worker_pids(head)` once all `n` workers run; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        w = worker_pids(head)
        if len(w) == n:
            return w
        time.sleep(0.1)
    raise TimeoutError(f"{n} workers of process {head} did not start within {timeout:.0f} s")


def run_state(head: int) -> dict[str, Any]:
    """The emulation state file the driver `head` wrote (rid, resources), or {} if it has none."""
    for f in state_dir().glob("*.json"):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            st = json.loads(f.read_text())
            if st.get("pid") == head:
                return st
    return {}


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie counts: it runs nothing and holds no memory)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def run_resources(rid: str) -> list[str]:
    """The cgroups, network namespaces and links on this host named for the emulation `rid`."""
    return [x for v in find_leftovers().values() for x in v if f"primasim-e{rid}" in x]


def run_leftovers(head: int, pids: dict[str, int], state: dict[str, Any]) -> list[str]:
    """What a finished run left behind: live workers, its emulation resources, work folders and state file."""
    left = [f"process {n} ({p})" for n, p in pids.items() if not process_gone(p)]
    left += [f"process {n} ({p})" for n, p in worker_pids(head).items() if p not in pids.values()]
    if state:
        left += run_resources(state["rid"])
        left += [d for d in state["resources"].get("dirs", []) if Path(d).exists()]
        if (state_dir() / f"{state['rid']}.json").exists():
            left.append(f"state file {state['rid']}.json")
    return left
