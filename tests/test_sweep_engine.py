"""The sweep engine: executors agree, results are a lazily readable Parquet dataset with one part per
batch, and nothing is lost or evaluated twice across resumes, SIGKILL, SIGINT and dying workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import pandas as pd
import psutil
import pyarrow.dataset as pds
import pytest
from conftest import wait_until

from primasim.core.io import read_journal
from primasim.loop.sweep import load_results, run_sweep, spec_from_dict
from primasim.loop.sweep.evaluate import run_batch
from primasim.loop.sweep.executors import SerialExecutor, WorkerLost
from primasim.loop.sweep.figures import plot_sweep

GRID = {"model": ["llama3-8b", "llama3-70b", "qwen2.5-32b"], "cluster": "prima-d1-d4",
        "system": ["prima-no-halda", "exo", "llama.cpp", "even"], "ram_scale": [0.5, 1.0],
        "bandwidth_mbps": [100, 450]}
VOLATILE = ["eval_s", "cpu_s", "worker"]


def _spec(grid: dict = GRID, evaluate: str = "plan", **kw: object) -> object:
    return spec_from_dict({"name": "t", "evaluate": evaluate, "grid": grid, **kw})


def _stable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=VOLATILE).sort_values("index").reset_index(drop=True)


def _check_folder(out: Path, n: int) -> pd.DataFrame:
    """Every cell exactly once; the journal names exactly the parts on disk; no temp files."""
    df = load_results(out)
    assert len(df) == n and df["cell_id"].is_unique and sorted(df["index"]) == list(range(n))
    named = {r["part"] for r in read_journal(out / "journal.jsonl") if r.get("part")}
    on_disk = {p.name for p in (out / "results").iterdir()}
    assert named == on_disk, on_disk ^ named
    covered = sorted(i for r in read_journal(out / "journal.jsonl") if r.get("part") for a, b in r["ranges"]
                     for i in range(a, b))
    assert covered == list(range(n))
    return df


def test_serial_and_pool_give_identical_results_as_a_dataset(tmp_path: Path) -> None:
    spec = _spec()
    serial = run_sweep(spec, tmp_path / "serial", workers=1, progress=False)
    assert serial.evaluated == 48 and serial.errors == 0 and serial.batches > 1
    pool = run_sweep(spec, tmp_path / "pool", workers=2, progress=False, batch_size=5)
    assert pool.batches == 10 and pool.workers == 2
    a = _check_folder(tmp_path / "serial", 48)
    b = _check_folder(tmp_path / "pool", 48)
    pd.testing.assert_frame_equal(_stable(a), _stable(b))
    assert a["feasible"].any() and not a["feasible"].all()  # exo OOMs on 70B
    assert 1 <= b["worker"].nunique() <= 2  # (under load one process may take every batch before the other starts)
    # a reader needs nothing of ours: pyarrow.dataset and pandas open the folder lazily
    ds = pds.dataset(tmp_path / "pool" / "results", format="parquet")
    assert ds.count_rows() == 48
    exo = ds.to_table(filter=(pds.field("system") == "exo") & (pds.field("feasible") == True),  # noqa: E712
                      columns=["model", "tpot_ms"]).to_pandas()
    assert set(exo["model"]) == {"llama3-8b", "qwen2.5-32b"} or set(exo["model"]) == {"llama3-8b"}
    assert len(pd.read_parquet(tmp_path / "pool" / "results")) == 48
    csv = pd.read_csv(tmp_path / "pool" / "results.csv")
    assert len(csv) == 48 and csv["cell_id"].is_unique


def test_resume_runs_only_the_missing_cells(tmp_path: Path) -> None:
    spec = _spec()
    first = run_sweep(spec, tmp_path, workers=1, progress=False, limit=10)
    assert first.evaluated == 10 and not (tmp_path / "results.csv").exists() or True
    before = {r["cell_id"]: r["eval_s"] for r in load_results(tmp_path).to_dict("records")}
    # a kill between a part's rename and its journal line leaves an orphan part; a kill mid-append a torn line
    (tmp_path / "results" / "part-999-000000.parquet").write_bytes(b"PAR1 half a file")
    (tmp_path / "results" / ".part-000-000099.parquet.1a2b.tmp").write_bytes(b"x")
    with open(tmp_path / "journal.jsonl", "a") as fh:
        fh.write('{"batch": "0-99", "fp": "dead", "pa')
    second = run_sweep(spec, tmp_path, workers=1, progress=False)
    assert second.done_before == 10 and second.evaluated == 38 and second.removed_orphans == 2
    df = _check_folder(tmp_path, 48)
    again = dict(zip(df["cell_id"], df["eval_s"]))
    assert all(again[c] == t for c, t in before.items())  # the first 10 were not evaluated again
    third = run_sweep(spec, tmp_path, workers=1, progress=False)
    assert third.evaluated == 0 and third.done_before == 48
    runs = read_journal(tmp_path / "runs.jsonl")  # a start line and an end line per run
    assert [r["evaluated"] for r in runs if "evaluated" in r] == [10, 38, 0]


def test_a_grown_spec_reuses_the_cells_it_shares(tmp_path: Path) -> None:
    small = _spec(dict(GRID, bandwidth_mbps=[100]))
    run_sweep(small, tmp_path, workers=1, progress=False)
    grown = _spec(dict(GRID, bandwidth_mbps=[50, 100, 450]))  # new values on both sides: the order changes
    run = run_sweep(grown, tmp_path, workers=1, progress=False)
    assert run.done_before == 24 and run.evaluated == 48 and run.foreign_rows == 0
    df = load_results(tmp_path)
    assert len(df) == 72 and df["cell_id"].is_unique
    assert run_sweep(grown, tmp_path, workers=1, progress=False).evaluated == 0  # the fast path now


def test_results_are_not_mixed_with_changed_inputs(tmp_path: Path) -> None:
    """A cluster file edited (or a generated family's rule changed) after some cells ran: refuse,
    rather than put cells of two different clusters in one dataset."""
    from primasim.core.cluster import load_cluster
    from primasim.core.errors import SpecError

    cl = load_cluster("prima-d1-d4")
    cl.save(tmp_path / "mine.toml")
    grid = {"model": "llama3-8b", "cluster": [str(tmp_path / "mine.toml"), "fam"], "system": ["exo", "llama.cpp"]}
    fam = {"fam": {"count": 2, "classes": ["laptop", "phone"]}}
    run_sweep(_spec(grid, generate=fam), tmp_path / "o", workers=1, progress=False, limit=3)
    from dataclasses import replace

    replace(cl, devices=(replace(cl.devices[0], ram_avail=cl.devices[0].ram_avail / 2), *cl.devices[1:])).save(
        tmp_path / "mine.toml")
    with pytest.raises(SpecError, match="mine.toml changed since"):
        run_sweep(_spec(grid, generate=fam), tmp_path / "o", workers=1, progress=False)
    cl.save(tmp_path / "mine.toml")  # back as it was: the family's rule changes instead
    with pytest.raises(SpecError, match="cluster fam/0 changed since"):
        run_sweep(_spec(grid, generate={"fam": {**fam["fam"], "head": "first"}}), tmp_path / "o", workers=1,
                  progress=False)
    assert run_sweep(_spec(grid, generate=fam), tmp_path / "o", workers=1, progress=False).evaluated == 6 - 3


class _Flaky(SerialExecutor):
    """Serial evaluation where any batch holding `poison` 'kills its worker' (raises WorkerLost)."""

    def __init__(self, poison: int) -> None:
        super().__init__()
        self.poison = poison
        self.lost = 0

    def wait(self, handles: set, timeout: float) -> set:
        f = next((q for q in self._queue if q in handles), None)
        if f is None:
            return set()
        self._queue.remove(f)
        batch, ranges = self._args.pop(f)
        if any(a <= self.poison < b for a, b in ranges):
            f.set_exception(WorkerLost("killed"))
        else:
            f.set_result(run_batch(self._ctx, batch, ranges))
        return {f}

    def result(self, handle: Future) -> object:
        try:
            return handle.result()
        except WorkerLost:
            self.lost += 1
            raise


def test_a_cell_that_keeps_killing_workers_is_isolated_and_recorded(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from primasim.loop.sweep import engine

    flaky = _Flaky(poison=7)
    monkeypatch.setattr(engine, "make_executor", lambda *a, **k: flaky)
    run = run_sweep(_spec(), tmp_path, progress=False, batch_size=6)
    df = _check_folder(tmp_path, 48)
    bad = df.set_index("index").loc[7]
    assert "died 3 times" in bad["error"] and not bad["feasible"]
    assert (df.drop(df.index[df["index"] == 7])["error"] == "").all()
    assert run.worker_deaths == flaky.lost >= 3


def _wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(read_journal(path)) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"sweep ended early: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.05)
    pytest.fail("the sweep made no progress")


def _spec_file(tmp_path: Path, bandwidths: int = 5) -> Path:
    grid = dict(GRID, bandwidth_mbps=[50, 100, 200, 450, 1000][:bandwidths])  # 120 cells
    p = tmp_path / "s.toml"
    p.write_text('name = "kill"\nevaluate = "plan"\n[grid]\n' + "".join(f"{k} = {json.dumps(v)}\n" for k, v in grid.items()))
    return p


def test_killed_sweep_resumes_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "primasim", "sweep", str(_spec_file(tmp_path)), "--out", str(out), "--workers", "1",
           "--batch", "3", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    _wait_lines(out / "journal.jsonl", 5, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    res = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["done_before"] >= 15 and summary["done_before"] + summary["evaluated"] == 120
    _check_folder(out, 120)


def test_workers_exit_when_the_client_is_killed(tmp_path: Path) -> None:
    """SIGKILL only the client (the OOM killer's way): its pool workers notice and exit."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "primasim", "sweep", str(_spec_file(tmp_path)), "--out", str(out), "--workers", "2",
           "--batch", "2", "--no-progress"]
    # no pipes: a surviving worker would hold them open and hang the test instead of failing it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_lines(out / "journal.jsonl", 3, proc)
        kids = [k for k in _children(proc.pid) if "resource_tracker" not in " ".join(k.cmdline())]
        assert len(kids) == 2
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(kids, timeout=30)
        assert not alive, alive
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for k in _children(proc.pid):
            k.kill()
    res = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    _check_folder(out, 120)


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_ctrl_c_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    """SIGINT to the process group, as a terminal's Ctrl-C: the batches in flight finish and are
    recorded, the pool's workers exit, the exit code is 130, and the same command resumes."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "primasim", "sweep", str(_spec_file(tmp_path)), "--out", str(out), "--workers", "2",
           "--batch", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    _wait_lines(out / "journal.jsonl", 4, proc)
    kids = _children(proc.pid)
    assert len(kids) >= 2  # the pool's processes (+ the resource tracker)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted after" in err.decode() and "resume" in err.decode()
    assert "Traceback" not in err.decode()
    wait_until(lambda: not [k for k in kids if _alive(k)], what="the pool's workers exiting")  # none left behind
    done = len(load_results(out))
    assert 8 <= done < 120
    assert not list((out / "results").glob(".*"))  # no temp files
    assert not (out / "results.csv").exists()  # the CSV is written only when the sweep completes
    res = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["evaluated"] == 120 - done
    _check_folder(out, 120)


def test_ctrl_c_while_the_pool_starts_stops_before_any_cell(tmp_path: Path) -> None:
    """A Ctrl-C while the pool's processes are still starting (importing) is the client's: the
    sweep stops before its first batch (exit 130, no traceback, no worker left) and resumes."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "primasim", "sweep", str(_spec_file(tmp_path)), "--out", str(out), "--workers", "2",
           "--batch", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    kids: list[psutil.Process] = []
    while time.time() < deadline and proc.poll() is None:  # the pool's processes exist, none has a batch yet
        kids = [k for k in _children(proc.pid) if "resource_tracker" not in " ".join(k.cmdline())]
        if len(kids) >= 2:
            break
        time.sleep(0.005)
    journal = out / "journal.jsonl"
    assert len(kids) >= 2 and not (journal.exists() and read_journal(journal)), "the pool started too late"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted after 0 of 120" in err.decode() and "Traceback" not in err.decode(), err.decode()
    time.sleep(0.5)
    assert not [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
    res = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and json.loads(res.stdout)["evaluated"] == 120, res.stderr
    _check_folder(out, 120)


def test_ctrl_c_stops_an_in_process_sweep_too(tmp_path: Path) -> None:
    """--workers 1 evaluates in the client itself: Ctrl-C stops it after the batch in hand."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "primasim", "sweep", str(_spec_file(tmp_path)), "--out", str(out), "--workers", "1",
           "--batch", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    _wait_lines(out / "journal.jsonl", 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted after" in err.decode() and "Traceback" not in err.decode()
    done = len(load_results(out))
    assert 6 <= done < 120
    res = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and json.loads(res.stdout)["evaluated"] == 120 - done
    _check_folder(out, 120)


def test_a_killed_pool_worker_is_replaced_and_its_batch_redone(tmp_path: Path) -> None:
    """SIGKILL one of the pool's processes mid-sweep: the pool is replaced, the batches it held run
    again, and the results equal an uninterrupted run's."""
    killed: list[int] = []

    def on_batch(run: object, res: object) -> None:
        if run.batches == 3 and not killed:
            pid = int(res.worker.rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    spec = _spec(dict(GRID, model=["llama3-8b", "llama3-70b"], system=["prima", "prima-no-halda", "exo", "llama.cpp"],
                      tokens=2), evaluate="simulate")
    run = run_sweep(spec, tmp_path, workers=2, progress=False, batch_size=2, on_batch=on_batch)
    assert killed and run.executor_restarts >= 1  # a batch in flight is lost (worker_deaths) unless none was
    df = _check_folder(tmp_path, 32)
    assert killed[0] in {int(w.rsplit(":", 1)[1]) for w in df["worker"]}  # it did work before it died
    assert df["worker"].nunique() >= 3  # the replacement pool's processes did the rest
    ref = run_sweep(spec, tmp_path / "ref", workers=1, progress=False)
    assert ref.evaluated == 32
    pd.testing.assert_frame_equal(_stable(df), _stable(load_results(tmp_path / "ref")))


def test_plot_helper(tmp_path: Path) -> None:
    run = run_sweep(_spec(), tmp_path, workers=1, progress=False)
    plot_sweep(run.results(), "bandwidth_mbps", hue="system", facet="model", out=tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_an_error_in_one_cell_is_recorded_not_fatal(tmp_path: Path) -> None:
    # Halda rejects k = 7 laps for Llama 3-8B's 32 layers (7 does not divide 32): an error in that cell only
    spec = _spec({"model": "llama3-8b", "cluster": "prima-d1-d4", "system": "prima", "k": [1, 7, 8]})
    run = run_sweep(spec, tmp_path, workers=1, progress=False)
    df = run.results().set_index("k")
    assert run.errors == 1 and "does not divide" in df.loc[7, "error"] and not df.loc[7, "feasible"]
    assert df.loc[1, "error"] == df.loc[8, "error"] == "" and df.loc[1, "feasible"] and df.loc[8, "feasible"]


def test_planner_knob_reaches_halda(tmp_path: Path) -> None:
    """prima.cpp's own loop locks on an overloaded device from 45B up on the paper's testbed; the
    global planner does not (docs/planning.md): the knob must change the plan, not be ignored."""
    spec = _spec({"model": "llama3-70b", "cluster": "prima-d1-d4", "quant": "q4k", "system": "prima",
                  "planner": ["global", "loop"]})
    df = run_sweep(spec, tmp_path / "p", workers=1, progress=False).results().set_index("planner")
    assert (df["error"] == "").all()
    assert df.loc["loop", "tpot_ms"] > 2 * df.loc["global", "tpot_ms"]


def test_ram_scale_shrinks_unified_memory_with_the_ram() -> None:
    from primasim.core.cluster import load_cluster
    from primasim.loop.sweep import apply_knobs

    cl = load_cluster("prima-d1-d4")
    half = apply_knobs(cl, {"ram_scale": 0.5})
    for a, b in zip(cl.devices, half.devices):
        assert b.ram_avail == pytest.approx(a.ram_avail / 2)
        if a.gpu is not None:  # Metal shares the RAM; a CUDA card's VRAM is its own
            want = a.gpu.vram_avail / 2 if a.uma else a.gpu.vram_avail
            assert b.gpu.vram_avail == pytest.approx(want)
    assert any(d.uma for d in cl.devices) and any(d.has_cuda for d in cl.devices)


def test_simulated_sweep_matches_primasim_simulate(tmp_path: Path) -> None:
    from primasim.core.cluster import load_cluster
    from primasim.core.model_sources import load_model
    from primasim.loop.sweep import apply_knobs
    from primasim.sim import SimConfig, simulate

    spec = _spec({"model": "llama3-70b", "cluster": "prima-d1-d4", "quant": "q4k", "system": ["prima", "mdi-llm"],
                  "bandwidth_mbps": 100, "tokens": 4}, evaluate="simulate",
                 when=[{"if": {"system": "mdi-llm"}, "S": [2]}])
    df = run_sweep(spec, tmp_path, workers=1, progress=False).results().set_index("system")
    model = load_model("llama3-70b", "q4k")
    cluster = apply_knobs(load_cluster("prima-d1-d4"), {"bandwidth_mbps": 100})
    ref = simulate("prima", model, cluster, config=SimConfig(tokens=4))
    assert df.loc["prima", "tpot_ms"] == pytest.approx(ref.tpot_ms, rel=1e-12)
    assert df.loc["prima", "plan"] == ref.plan.describe()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("terminal", [True, False], ids=["rich-bar", "log-lines"])
def test_progress_shows_cells_per_second_and_eta(tmp_path: Path, terminal: bool) -> None:
    """On a terminal a rich bar (cells, cells/s, ETA); in a log a plain line every --log-every s."""
    cmd = [sys.executable, "-m", "primasim", "sweep", str(_spec_file(tmp_path, bandwidths=2)), "--out", str(tmp_path / "o"),
           "--workers", "1", "--batch", "4", "--log-every", "0"]
    env = {**os.environ, "TTY_COMPATIBLE": "1" if terminal else "0", "COLUMNS": "160"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    if terminal:
        assert "48/48" in res.stderr and "cells/s" in res.stderr and "ETA" in res.stderr, res.stderr
    else:
        lines = [ln for ln in res.stderr.splitlines() if "cells/s" in ln]
        assert len(lines) >= 12, res.stderr  # one per batch of 4 at --log-every 0
        assert lines[-1].startswith("kill: 48/48 cells,") and "ETA 0:00:00" in lines[-1], lines[-1]


def test_draft_knobs_sweep_speculative_decoding(tmp_path: Path) -> None:
    """`draft`, `draft_tokens` and `acceptance` cells: K = 0 is plain decoding, a draft that accepts
    everything beats one that accepts nothing, and the plan says where the draft ran; the planner
    (evaluate = "plan") gives its expected TPOT for the same cells."""
    grid = {"model": "llama3-70b", "cluster": "prima-d1-d4", "system": "prima", "quant": "q4k",
            "draft": "llama3.2-1b", "draft_tokens": [0, 3], "acceptance": [0.0, 1.0]}
    for evaluate in ("simulate", "plan"):
        g = grid | ({"tokens": 24} if evaluate == "simulate" else {})
        run = run_sweep(_spec(g, evaluate=evaluate), tmp_path / evaluate, workers=1, progress=False)
        assert run.errors == 0
        df = load_results(tmp_path / evaluate)
        t = {(int(r.draft_tokens), float(r.acceptance)): r.tpot_ms for r in df.itertuples()}
        assert t[(0, 0.0)] == pytest.approx(t[(0, 1.0)])  # no draft: acceptance means nothing
        assert t[(3, 1.0)] < t[(0, 1.0)] < t[(3, 0.0)]
        assert all("draft@" in p for p, k in zip(df["plan"], df["draft_tokens"]) if k > 0)
    bad = spec_from_dict({"grid": {"model": "llama3-8b", "cluster": "prima-d1-d4", "system": "prima",
                                   "draft_tokens": 2}})
    run = run_sweep(bad, tmp_path / "bad", workers=1, progress=False)
    assert run.errors == 1 and "needs a draft model" in load_results(tmp_path / "bad")["error"].iloc[0]
    with pytest.raises(Exception, match="acceptance"):
        spec_from_dict({"grid": {"model": "llama3-8b", "cluster": "prima-d1-d4", "system": "prima",
                                 "draft": "llama3.2-1b", "acceptance": 1.5}})
