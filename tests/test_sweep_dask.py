"""Sweeps on Dask: the multi-machine recipe (a `dask scheduler` and `dask worker` processes started by
the user, here on this machine), a worker killed mid-sweep (its cells are redone, none lost or
duplicated), and the resume path after the client is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from primasim.core.io import read_journal
from primasim.loop.sweep import load_results, run_sweep, spec_from_dict
from primasim.loop.sweep.executors import stop_process_groups

DASK = str(Path(sys.executable).parent / "dask")
GRID = {"model": ["llama3-8b", "llama3-70b"], "cluster": "prima-d1-d4", "quant": "q4k",
        "system": ["prima", "prima-no-halda", "llama.cpp", "exo"], "bandwidth_mbps": [50, 100, 200, 450, 1000],
        "ram_scale": [0.75, 1.0], "tokens": 2}  # 80 simulated cells
VOLATILE = ["eval_s", "cpu_s", "worker"]


def _stable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=VOLATILE).sort_values("index").reset_index(drop=True)


def _check(out: Path, n: int) -> pd.DataFrame:
    df = load_results(out)
    assert len(df) == n and df["cell_id"].is_unique and sorted(df["index"]) == list(range(n))
    named = {r["part"] for r in read_journal(out / "journal.jsonl") if r.get("part")}
    assert named == {p.name for p in (out / "results").iterdir()}
    return df


def test_local_pool_and_dask_local_cluster_agree(tmp_path: Path) -> None:
    from distributed import LocalCluster

    spec = spec_from_dict({"name": "t", "evaluate": "plan", "grid": {k: v for k, v in GRID.items() if k != "tokens"}})
    serial = run_sweep(spec, tmp_path / "serial", workers=1, progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc:
        dask = run_sweep(spec, tmp_path / "dask", executor=lc.scheduler_address.replace("tcp://", "dask://"),
                         progress=False)
    assert dask.workers == 2 and dask.evaluated == serial.evaluated == 80
    pd.testing.assert_frame_equal(_stable(_check(tmp_path / "serial", 80)), _stable(_check(tmp_path / "dask", 80)))


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A scheduler and two single-threaded workers, each its own process, as a user starts them."""
    from distributed import Client

    sched_file = tmp_path / "scheduler.json"
    procs = [_start([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                     "--scheduler-file", str(sched_file)], tmp_path / "scheduler.log")]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        workers = [_start([DASK, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-nanny",
                           "--no-dashboard", "--name", f"w{i}"], tmp_path / f"worker{i}.log") for i in range(2)]
        procs += workers
        with Client(address, timeout="30s") as c:
            c.wait_for_workers(2, timeout=120)
        yield address, workers
    finally:
        stop_process_groups(procs)


def _spec_file(tmp_path: Path) -> Path:
    p = tmp_path / "s.toml"
    p.write_text('name = "dask-kill"\n[grid]\n' + "".join(f"{k} = {json.dumps(v)}\n" for k, v in GRID.items()))
    return p


def _wait_batches(journal: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if journal.exists() and len([r for r in read_journal(journal) if r.get("part")]) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended early: {proc.communicate()[1]}")
        time.sleep(0.05)
    pytest.fail("the sweep made no progress")


@pytest.mark.slow
def test_worker_killed_mid_sweep_loses_nothing_and_client_resumes(tmp_path: Path, dask_cluster: tuple) -> None:
    address, _ = dask_cluster
    spec_path = _spec_file(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "primasim", "sweep", str(spec_path), "--out", str(out), "--executor",
           "dask://" + address.split("://")[1], "--batch", "3", "--no-progress", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _kill_and_check(proc, address, out, cmd, tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _kill_and_check(proc: subprocess.Popen, address: str, out: Path, cmd: list[str], tmp_path: Path) -> None:
    from distributed import Client

    journal = out / "journal.jsonl"
    deadline = time.time() + 300
    while len({r["worker"] for r in read_journal(journal) if r.get("part")}) < 2:  # both have done some
        _wait_batches(journal, 1, proc)
        assert time.time() < deadline, "one worker did everything"
        time.sleep(0.1)
    with Client(address, timeout="30s") as c:  # which worker is evaluating a batch right now
        pids = c.run(os.getpid)
        busy: dict = {}
        while not busy:  # between two batches nobody is: look again
            busy = {w: keys for w, keys in c.processing().items() if any("primasim-sweep" in str(k) for k in keys)}
            assert time.time() < deadline and proc.poll() is None
        victim = next(iter(busy))
        pid = pids[victim]
        lost = {int(str(k).rsplit("-", 1)[1]) for k in busy[victim]}
        os.kill(pid, signal.SIGKILL)
    t_kill = time.time()
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["evaluated"] == 80
    df = _check(out, 80)
    host_pid = {w for w in df["worker"] if w.endswith(f":{pid}")}
    assert host_pid, "the killed worker had finished batches before it died"
    done = {r["batch"]: r for r in read_journal(out / "journal.jsonl") if r.get("part")}
    for no in lost:  # the batches it held were evaluated again, by the other worker (unless one
        rec = done[f"0-{no}"]  # finished in the instant between the look and the kill)
        assert rec["worker"] not in host_pid or rec["t"] < t_kill + 1, rec
    assert any(done[f"0-{no}"]["worker"] not in host_pid for no in lost)
    ref = run_sweep(_spec_file(tmp_path), tmp_path / "ref", workers=1, progress=False)
    assert ref.evaluated == 80
    pd.testing.assert_frame_equal(_stable(df), _stable(load_results(tmp_path / "ref")))

    # the resume path: re-running the finished sweep evaluates nothing ...
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout)["evaluated"] == 0
    # ... and a client killed mid-sweep (on the one worker left) resumes where it stopped
    out2 = tmp_path / "out2"
    cmd2 = [*cmd[:cmd.index("--out") + 1], str(out2), *cmd[cmd.index("--out") + 2:]]
    proc = subprocess.Popen(cmd2, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_batches(out2 / "journal.jsonl", 4, proc)
    proc.kill()
    proc.communicate()
    before = len(load_results(out2))
    res = subprocess.run(cmd2, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    s2 = json.loads(res.stdout)
    assert s2["done_before"] == before and s2["evaluated"] == 80 - before
    pd.testing.assert_frame_equal(_stable(_check(out2, 80)), _stable(df))


def test_unreachable_scheduler_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from primasim.cli import main

    spec = _spec_file(tmp_path)
    assert main(["sweep", str(spec), "--out", str(tmp_path / "o"), "--executor", "dask://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach the Dask scheduler" in err and "dask worker" in err
    assert main(["sweep", str(spec), "--out", str(tmp_path / "o"), "--executor", "ray://x"]) == 2
    assert "unknown executor" in capsys.readouterr().err


@pytest.mark.slow
def test_documented_recipe_with_nannies_restarted_worker_gets_the_context(tmp_path: Path) -> None:
    """The recipe of docs/sweeps.md as written (`dask worker ADDRESS --nworkers 2 --nthreads 1`, with
    its nannies): both workers SIGKILLed mid-sweep are restarted by their nannies, the new processes
    receive the sweep's context (the worker plugin) and finish the sweep; every cell is there once."""
    from distributed import Client

    sched_file = tmp_path / "scheduler.json"
    procs = [_start([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                     "--scheduler-file", str(sched_file)], tmp_path / "scheduler.log")]
    proc = None
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        procs.append(_start([DASK, "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard"],
                            tmp_path / "workers.log"))
        with Client(address, timeout="30s") as c:
            c.wait_for_workers(2, timeout=120)
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "primasim", "sweep", str(_spec_file(tmp_path)), "--out", str(out), "--executor",
               str(sched_file), "--batch", "2", "--no-progress", "--json"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_batches(out / "journal.jsonl", 4, proc)
        with Client(address, timeout="30s") as c:
            before = set(c.run(os.getpid).values())
        for pid in before:  # only the restarted processes can finish the sweep
            os.kill(pid, signal.SIGKILL)
        done_at_kill = len([r for r in read_journal(out / "journal.jsonl") if r.get("part")])
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        assert json.loads(stdout)["evaluated"] == 80
        df = _check(out, 80)
        pids = {int(w.rsplit(":", 1)[1]) for w in df["worker"]}
        assert done_at_kill < 40 and pids - before, "the sweep ended before the kill"
        with Client(address, timeout="30s") as c:
            now = set(c.run(os.getpid).values())
        assert len(now) == 2 and not now & before, "the nannies did not restart the killed workers"
        assert pids - before <= now  # the cells after the kill were evaluated by the restarted workers
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        stop_process_groups(procs)
