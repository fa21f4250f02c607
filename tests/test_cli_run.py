"""`primasim run` and `primasim worker` from the command line: the contract's JSON, plans from
`primasim plan --json`, clear errors, and the emulated 3-device default cluster end to end (root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Lines

from primasim import load_model
from primasim.runtime import write_random_checkpoint
from primasim.runtime.emulate import find_leftovers

CONTRACT = ("system", "feasible", "tpot_ms", "ttft_ms", "throughput_tok_s", "memory_pressure", "plan", "token_ids")
CLUSTER2 = """
name = "two"
[network]
kind = "switched"
bandwidth_mbps = 1000
latency_ms = 0.3
[[devices]]
name = "a"
os = "linux"
cores = 1
ram_total_gib = 2
ram_avail_gib = 1
ram_bw_gbs = 10
cpu_gflops = { f32 = 20 }
disk_seq_gbs = 1
[[devices]]
name = "b"
os = "linux"
cores = 1
ram_total_gib = 2
ram_avail_gib = 1
ram_bw_gbs = 10
cpu_gflops = { f32 = 20 }
disk_seq_gbs = 1
"""


def primasim(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "primasim", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model(llama_tiny: Path) -> Path:
    return llama_tiny


@pytest.fixture(scope="module")
def cluster_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("c") / "two.toml"
    p.write_text(CLUSTER2)
    return p


def test_help_lists_the_contract_flags() -> None:
    out = primasim("run", "--help")
    assert out.returncode == 0
    for flag in ("--cluster", "--model", "--plan", "--prompt", "--prompt-ids", "--tokens", "--temperature", "--seed",
                 "--json", "--trace", "--system", "--top-k", "--top-p", "--S", "--batch", "--no-emulate"):
        assert flag in out.stdout
    out = primasim("worker", "--help")
    assert out.returncode == 0 and "--listen" in out.stdout and "--keys" in out.stdout


def test_plan_json_runs_and_reports_the_contract(model: Path, cluster_file: Path, tmp_path: Path) -> None:
    plan = primasim("plan", "--cluster", str(cluster_file), "--model", str(model), "--system", "even",
                    "--k", "3", "--n-ctx", "64", "--json")
    assert plan.returncode == 0, plan.stderr
    pf = tmp_path / "plan.json"
    pf.write_text(plan.stdout)
    trace = tmp_path / "trace.json"
    saved = tmp_path / "measured.json"
    out = primasim("run", "--cluster", str(cluster_file), "--model", str(model), "--plan", str(pf),
                   "--prompt", "hello home cluster", "--tokens", "5", "--json", "--no-emulate", "--trace", str(trace),
                   "--save-trace", str(saved))
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    for key in CONTRACT:
        assert key in res
    assert res["feasible"] is True and res["measured"] is True
    assert res["plan"]["k"] == 3 and [d["name"] for d in res["plan"]["devices"]] == ["a", "b"]
    assert all({"name", "layers", "gpu_layers"} <= d.keys() for d in res["plan"]["devices"])
    assert len(res["token_ids"]) == 5 and isinstance(res["text"], str)
    assert res["tpot_ms"] > 0 and res["ttft_ms"] > 0 and res["throughput_tok_s"] > 0
    assert set(res["memory_pressure"]) == {"a", "b"}
    chrome = json.loads(trace.read_text())
    assert any(e.get("cat") == "cpu" for e in chrome["traceEvents"])
    from primasim.core.trace import Trace, metrics

    tr = Trace.from_dict(json.loads(saved.read_text()))
    assert tr.source == "run" and metrics(tr).n_tokens == 5
    # the same run, greedy, gives the same tokens
    again = primasim("run", "--cluster", str(cluster_file), "--model", str(model), "--plan", str(pf),
                     "--prompt", "hello home cluster", "--tokens", "5", "--json", "--no-emulate")
    assert json.loads(again.stdout)["token_ids"] == res["token_ids"]


@pytest.mark.slow
def test_sampling_is_seeded(model: Path, cluster_file: Path) -> None:
    args = ("run", "--cluster", str(cluster_file), "--model", str(model), "--prompt-ids", "1,5,9", "--tokens", "6",
            "--temperature", "1.5", "--top-k", "50", "--top-p", "0.9", "--json", "--no-emulate", "--system", "even")
    a, b = primasim(*args, "--seed", "3"), primasim(*args, "--seed", "3")
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


@pytest.mark.parametrize("args, needle", [
    (["--model", "llama-tiny"], "--random-weights"),
    (["--model", "/nonexistent/model"], "no such file"),
    (["--prompt-ids", "1,x"], "comma-separated"),
    (["--prompt-ids", "1,100000"], "outside the vocabulary"),
    (["--tokens", "0"], "--tokens must be >= 1"),
    (["--top-p", "0"], "top-p"),
])
def test_bad_arguments_are_explained(model: Path, cluster_file: Path, args: list[str], needle: str) -> None:
    base = {"--cluster": str(cluster_file), "--model": str(model), "--prompt-ids": "1,2"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    out = primasim("run", *[x for kv in base.items() for x in kv], "--no-emulate", "--json")
    assert out.returncode == 2
    assert needle in out.stderr and "fix:" in out.stderr and "Traceback" not in out.stderr


def test_prompt_text_needs_a_tokenizer(model: Path, cluster_file: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in model.iterdir():
        if f.name != "tokenizer.json":
            (bare / f.name).symlink_to(f)
    out = primasim("run", "--cluster", str(cluster_file), "--model", str(bare), "--prompt", "hi", "--no-emulate")
    assert out.returncode == 2 and "--prompt-ids" in out.stderr


def test_a_plan_for_another_model_is_refused(model: Path, cluster_file: Path, tmp_path: Path) -> None:
    plan = primasim("plan", "--cluster", str(cluster_file), "--model", "qwen2-tiny", "--system", "even", "--json")
    pf = tmp_path / "qwen-plan.json"
    pf.write_text(plan.stdout)
    t0 = time.monotonic()
    out = primasim("run", "--cluster", str(cluster_file), "--model", str(model), "--plan", str(pf), "--no-emulate")
    assert out.returncode == 2 and "qwen2-tiny" in out.stderr and "re-plan" in out.stderr
    assert time.monotonic() - t0 < 300  # refused before any worker starts, not after a timeout


@pytest.mark.slow
def test_a_remote_worker_serves_the_head(model: Path, tmp_path: Path) -> None:
    """A real-cluster device: `primasim worker --listen` started by hand, found through the cluster
    file's address; the head-device is a local worker. After the session the worker keeps serving."""
    worker = subprocess.Popen([sys.executable, "-m", "primasim", "worker", "--listen", "tcp://127.0.0.1:0",
                               "--ready-file", str(tmp_path / "ready"), "--name", "far"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        addr = json.loads((tmp_path / "ready").read_text())["control"]
        cf = tmp_path / "real.toml"
        cf.write_text(CLUSTER2.replace('name = "b"\n', f'name = "b"\naddress = "{addr}"\n'))
        for _ in range(2):  # two sessions on the same worker
            out = primasim("run", "--cluster", str(cf), "--model", str(model), "--prompt-ids", "4,2", "--tokens", "3",
                           "--system", "even", "--json")
            assert out.returncode == 0, out.stderr
            res = json.loads(out.stdout)
            assert len(res["token_ids"]) == 3 and res["net_tx_bytes"]["b"] > 0
        assert worker.poll() is None
    finally:
        worker.terminate()
        worker.wait(timeout=60)


def test_curve_keys_between_head_and_workers(model: Path, cluster_file: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert primasim("worker", "--make-keys", str(keys)).returncode == 0
    out = primasim("run", "--cluster", str(cluster_file), "--model", str(model), "--prompt-ids", "4,2", "--tokens",
                   "3", "--system", "even", "--keys", str(keys), "--json", "--no-emulate")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["token_ids"]) == 3


def test_cleanup_command() -> None:
    out = primasim("run", "--cleanup")
    assert out.returncode == 0


@pytest.mark.root
@pytest.mark.slow
def test_emulated_three_device_cluster_end_to_end() -> None:
    """The emulated default cluster (home-emu: memory-short devices, 30-80 Mbit/s links) runs Halda's
    plan for llama-mini-300m over its four devices from the CLI and returns the contract's JSON,
    measured."""
    # keep all four devices (Halda's device selection may drop the weak phone, as prima.cpp does)
    out = primasim("run", "--cluster", "home-emu", "--model", "llama-mini-300m", "--random-weights",
                   "--option", "select_devices=false", "--prompt-ids", "1,5,9", "--tokens", "6", "--json", timeout=900)
    assert out.returncode == 0, out.stderr
    res: dict[str, Any] = json.loads(out.stdout)
    for key in CONTRACT:
        assert key in res
    assert res["feasible"] and res["measured"] and res["system"] == "prima"
    names = [d["name"] for d in res["plan"]["devices"]]
    assert names[0] == "desktop" and set(names) == {"desktop", "laptop", "tablet", "phone"}
    assert all(d["layers"] > 0 for d in res["plan"]["devices"])
    assert len(res["token_ids"]) == 6 and res["tpot_ms"] > 0 and res["ttft_ms"] > 0
    emu = res["emulation"]
    assert emu["emulated"] is True
    applied = {n: " | ".join(d["applied"]) for n, d in emu["devices"].items()}
    assert "30 Mbit/s" in applied["phone"] and "memory 128 MiB" in applied["phone"]
    assert all("cpu quota" in a and "disk read" in a for a in applied.values())
    # a device whose window does not fit its memory streams the rest from disk every token
    plan_layers = {d["name"]: d["layers"] for d in res["plan"]["devices"]}
    assert any(res["disk_read_bytes"][n] > 5 * 1e6 for n in plan_layers if plan_layers[n] > 0)
    assert set(res["memory_pressure"]) == set(names)
    assert all(0 <= v < 1 for v in res["memory_pressure"].values())
    assert not any(v for v in find_leftovers().values() if any(emu["run_id"] in x for x in v))
    assert os.path.exists(Path(__file__).parents[1] / "data" / "clusters" / "home-emu.toml")


def _start_worker(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    ready = tmp_path / f"ready-{len(list(tmp_path.iterdir()))}"
    w = subprocess.Popen([sys.executable, "-m", "primasim", "worker", "--listen", "tcp://127.0.0.1:0",
                          "--ready-file", str(ready), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return w, json.loads(ready.read_text())["control"]


def test_a_device_with_another_model_file_is_refused(model: Path, tmp_path: Path) -> None:
    """The head checks the model file's fingerprint on every device (here: same architecture,
    other weights, via the worker's --model)."""
    other = write_random_checkpoint(load_model("llama-tiny"), tmp_path / "other" / "llama-tiny", seed=8)
    worker, addr = _start_worker(tmp_path, "--model", str(other))
    try:
        cf = tmp_path / "real.toml"
        cf.write_text(CLUSTER2.replace('name = "b"\n', f'name = "b"\naddress = "{addr}"\n'))
        out = primasim("run", "--cluster", str(cf), "--model", str(model), "--prompt-ids", "4,2", "--tokens", "3",
                       "--system", "even", "--json", "--no-emulate")
        assert out.returncode == 2
        assert "device b" in out.stderr and "fingerprint" in out.stderr and "same checkpoint" in out.stderr
    finally:
        worker.terminate()
        worker.wait(timeout=60)


KILLED_HEAD = """
import sys, time
from primasim.core.cluster import load_cluster
from primasim.core.plan import Plan
from primasim.runtime.head import Driver, RunOptions, open_weights
ckpt = open_weights(sys.argv[2])
plan = Plan(system="even", model=ckpt.spec.name, n_layers=6, k=1, devices=(), quant="f32")
from primasim.core.plan import DevicePlan
plan = plan.replace(devices=(DevicePlan("b", 6),))
d = Driver(plan, ckpt, load_cluster(sys.argv[1]), RunOptions(emulate=False))
d.start()
print("connected", flush=True)
from primasim.runtime import wire
while True:  # alive: heartbeats, however slowly the next head starts on a loaded host
    for p in d.peers.values():
        wire.send(p.sock, wire.MsgType.PING)
    time.sleep(0.5)
"""


def test_a_remote_worker_outlives_a_killed_head(model: Path, tmp_path: Path) -> None:
    """A head that dies (SIGKILL) stops its heartbeat: the worker refuses a second head while the
    first may still be alive, ends the session after --heartbeat-timeout and then serves again."""
    worker, addr = _start_worker(tmp_path, "--heartbeat-timeout", "10")
    assert worker.stderr is not None
    log = Lines(worker.stderr)
    try:
        cf = tmp_path / "one.toml"
        cf.write_text(CLUSTER2.split("[[devices]]")[0] + "[[devices]]" +
                      CLUSTER2.split("[[devices]]")[2].replace('name = "b"\n', f'name = "b"\naddress = "{addr}"\n'))
        head = subprocess.Popen([sys.executable, "-c", KILLED_HEAD, str(cf), str(model)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert head.stdout is not None and head.stdout.readline().strip() == "connected"
        busy = primasim("run", "--cluster", str(cf), "--model", str(model), "--prompt-ids", "4", "--tokens", "2",
                        "--system", "even", "--json")
        assert busy.returncode == 2 and "busy" in busy.stderr
        head.kill()
        head.wait(timeout=60)
        log.wait_for("no heartbeat from the driver")  # the worker ends the dead head's session
        out = primasim("run", "--cluster", str(cf), "--model", str(model), "--prompt-ids", "4", "--tokens", "2",
                       "--system", "even", "--json")
        assert out.returncode == 0, out.stderr
        assert worker.poll() is None
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    assert "no heartbeat from the driver" in log.text


def test_keys_make_show_and_the_worker_alias(tmp_path: Path) -> None:
    made = primasim("keys", "make", str(tmp_path / "k"))
    assert made.returncode == 0, made.stderr
    fp = [ln for ln in made.stdout.splitlines() if ln.startswith("fingerprint: SHA256:")]
    assert fp
    shown = primasim("keys", "show", str(tmp_path / "k"))
    assert shown.returncode == 0 and fp[0] in shown.stdout and "public key:" in shown.stdout
    assert oct((tmp_path / "k" / "cluster.key_secret").stat().st_mode & 0o777) == "0o600"
    again = primasim("keys", "make", str(tmp_path / "k"))  # never overwrites a pair by accident
    assert again.returncode == 2 and "--force" in again.stderr
    alias = primasim("worker", "--make-keys", str(tmp_path / "k2"))
    assert alias.returncode == 0 and "cluster.key_secret" in alias.stdout
    assert primasim("keys", "show", str(tmp_path / "nothing")).returncode == 2


def test_worker_listens_on_loopback_unless_keyed_or_insecure(tmp_path: Path) -> None:
    assert "tcp://127.0.0.1:9000" in primasim("worker", "--help").stdout
    for addr in ("tcp://0.0.0.0:0", "tcp://*:0", "tcp://10.1.2.3:9000"):
        out = primasim("worker", "--listen", addr)
        assert out.returncode == 2, out.stderr
        assert "without --keys" in out.stderr and "primasim keys make" in out.stderr and "--insecure" in out.stderr
    assert primasim("keys", "make", str(tmp_path / "k")).returncode == 0
    for extra in (["--keys", str(tmp_path / "k")], ["--insecure"]):
        w, addr = _start_worker_at(tmp_path, "tcp://0.0.0.0:0", *extra)
        try:
            assert addr.startswith("tcp://0.0.0.0:")
        finally:
            w.terminate()
            _, err = w.communicate(timeout=60)
        assert ("CurveZMQ, cluster key SHA256:" if extra[0] == "--keys" else "open to any peer") in err


def _start_worker_at(tmp_path: Path, listen: str, *extra: str) -> tuple[subprocess.Popen[str], str]:
    ready = tmp_path / f"ready-{len(list(tmp_path.iterdir()))}"
    w = subprocess.Popen([sys.executable, "-m", "primasim", "worker", "--listen", listen, "--ready-file", str(ready),
                          *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        assert w.poll() is None, w.stderr.read() if w.stderr else ""
        time.sleep(0.05)
    return w, json.loads(ready.read_text())["control"]
