"""Faults injected mid-generation, end to end through `primasim run`: a SIGKILLed worker, a stopped
(SIGSTOP) worker, a stalled ring link (tc rate ~0, root), a SIGKILLed head (the next run starts
clean); and who may join: strangers without the cluster key, or with another key, are refused
during a keyed run, which is unaffected."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import ROOT, wait_until
from zmq.utils.monitor import recv_monitor_message

from primasim import load_model
from primasim.runtime import write_random_checkpoint
from primasim.runtime.emulate import set_cpu_quota, set_egress_rate, state_dir
from primasim.runtime.running import (
    process_gone,
    run_leftovers,
    run_resources,
    run_state,
    wait_worker_pids,
)

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


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("faults")
    model = write_random_checkpoint(load_model("llama-tiny"), d / "llama-tiny", seed=7)
    (model / "tokenizer.json").unlink()  # tokens print as ids: easy to count
    cf = d / "three.toml"
    cf.write_text(CLUSTER)
    return model, cf


# a model whose two layers on b cost ~5-10 ms of CPU a token: starved to 1 ms of CPU a second, b then
# computes a token for seconds (llama-tiny's fused block costs well under 1 ms: it kept decoding)
HEAVY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 768,
               "intermediate_size": 3072, "num_hidden_layers": 6, "num_attention_heads": 12,
               "num_key_value_heads": 4, "vocab_size": 512, "max_position_embeddings": 512,
               "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def heavy(setup: tuple[Path, Path]) -> tuple[Path, Path]:
    model, cf = setup
    cfg = model.parent / "heavy-config"
    cfg.mkdir(exist_ok=True)
    (cfg / "config.json").write_text(json.dumps(HEAVY_LLAMA))
    out = write_random_checkpoint(load_model(cfg / "config.json"), model.parent / "llama-heavy", seed=7)
    (out / "tokenizer.json").unlink(missing_ok=True)
    return out, cf


def _run(setup: tuple[Path, Path], *extra: str, tokens: int = 200) -> subprocess.Popen[bytes]:
    model, cf = setup
    return subprocess.Popen([sys.executable, "-m", "primasim", "run", "--cluster", str(cf), "--model", str(model),
                             "--prompt-ids", "1,2,3", "--tokens", str(tokens), "--system", "even", "--n-ctx", "256",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_tokens(p: subprocess.Popen[bytes], n: int, timeout: float = 180) -> None:
    assert p.stdout is not None
    got = b""
    deadline = time.monotonic() + timeout
    while len(got.split()) < n:
        assert time.monotonic() < deadline, "no tokens"
        assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
        if select.select([p.stdout], [], [], 0.5)[0]:
            got += os.read(p.stdout.fileno(), 4096)


def _assert_clean(head: int, pids: dict[str, int], st: dict[str, Any]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(process_gone(p) for p in pids.values()):
        time.sleep(0.05)
    assert run_leftovers(head, pids, st) == []


def _fault(setup: tuple[Path, Path], inject: Any, *extra: str) -> tuple[int, str, float]:
    """Start a run, inject a fault after 5 tokens; (exit code, stderr, s from fault to exit)."""
    p = _run(setup, *extra)
    pids: dict[str, int] = {}
    try:
        pids = wait_worker_pids(p.pid, 3)
        _wait_tokens(p, 5)
        st = run_state(p.pid)
        t0 = time.monotonic()
        inject(pids)
        _, err = p.communicate(timeout=120)
        dt = time.monotonic() - t0
        _assert_clean(p.pid, pids, st)
        return p.returncode, err.decode(), dt
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_sigkilled_worker_mid_generation_is_named_and_the_head_exits(setup: tuple[Path, Path]) -> None:
    rc, err, dt = _fault(setup, lambda pids: os.kill(pids["b"], signal.SIGKILL))
    assert rc == 2, err
    assert "device b" in err and "SIGKILL" in err
    assert dt < 60, dt  # not after a heartbeat timeout: the driver sees its child die (SIGKILL named)


@pytest.mark.slow
def test_stopped_worker_mid_generation_times_out_naming_it(setup: tuple[Path, Path]) -> None:
    # 10 s: long enough that a loaded host never delays a live device's heartbeats that long
    rc, err, dt = _fault(setup, lambda pids: os.kill(pids["b"], signal.SIGSTOP), "--heartbeat-timeout", "10")
    assert rc == 2, err
    assert "device b" in err and "heartbeats" in err and "stopped" in err
    assert 10 <= dt < 120, dt


@pytest.mark.root
@pytest.mark.slow
def test_stalled_link_mid_generation_times_out_naming_the_link(setup: tuple[Path, Path]) -> None:
    def stall(pids: dict[str, int]) -> None:
        ns = subprocess.run(["ip", "netns", "identify", str(pids["b"])], capture_output=True, text=True).stdout.strip()
        assert ns.startswith("primasim-e")
        assert set_egress_rate(ns, 8)  # b's links to a and c at 8 bit/s; heartbeats are not shaped

    rc, err, dt = _fault(setup, stall, "--link-timeout", "10")
    assert rc == 2, err
    assert "link b -> c" in err and "stalled" in err
    assert 10 <= dt < 120, dt


@pytest.mark.root
@pytest.mark.slow
def test_hung_compute_mid_generation_is_named(heavy: tuple[Path, Path]) -> None:
    rc, err, dt = _fault(heavy, lambda pids: set_cpu_quota(pids["b"], 1000), "--compute-timeout", "1",
                         "--heartbeat-timeout", "60", "--link-timeout", "60")
    assert rc == 2, err
    assert "device b" in err and "computing for" in err and "median" in err, err
    assert 1 <= dt < 120, dt


@pytest.mark.slow
def test_sigkilled_head_the_next_run_starts_clean(setup: tuple[Path, Path]) -> None:
    p = _run(setup)
    try:
        pids = wait_worker_pids(p.pid, 3)
        _wait_tokens(p, 5)
        st = run_state(p.pid)
        assert st and st["resources"]["dirs"]
        p.kill()
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    deadline = time.monotonic() + 60  # workers die with their parent (PR_SET_PDEATHSIG)
    while time.monotonic() < deadline and not all(process_gone(x) for x in pids.values()):
        time.sleep(0.05)
    assert all(process_gone(x) for x in pids.values())
    # left behind: its state file, work folder (logs, ready files) and, as root, cgroups + namespaces
    assert (state_dir() / f"{st['rid']}.json").exists()
    assert all(Path(d).exists() for d in st["resources"]["dirs"])
    assert bool(run_resources(st["rid"])) == ROOT
    nxt = _run(setup, "--json", tokens=3)
    out, err = nxt.communicate(timeout=300)
    assert nxt.returncode == 0, err.decode()
    res = json.loads(out)
    assert len(res["token_ids"]) == 3
    assert any("removed" in x and "crashed run" in x for x in res["emulation"]["limitations"])
    assert run_resources(st["rid"]) == []
    assert not any(Path(d).exists() for d in st["resources"]["dirs"])
    assert not (state_dir() / f"{st['rid']}.json").exists()


# ------------------------------------------------------------------------------ who may join
@pytest.mark.slow
def test_strangers_are_refused_during_a_keyed_run_which_is_unaffected(setup: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    """Peers without the cluster key, or with another key pair, connect to a keyed worker's
    control and data ports mid-run and send it messages: every handshake fails, nothing reaches
    the worker, and the run gives the same tokens as an unkeyed run."""
    from primasim.core.cluster import load_cluster
    from primasim.core.plan import DevicePlan, Plan
    from primasim.runtime import open_checkpoint, wire
    from primasim.runtime.head import Driver, RunOptions, run_plan

    model, cf = setup
    ckpt = open_checkpoint(model)
    cl = load_cluster(str(cf))
    plan = Plan(system="even", model=ckpt.spec.name, n_layers=6, k=1, quant="f32", n_ctx=128,
                devices=(DevicePlan("a", 2), DevicePlan("b", 2), DevicePlan("c", 2)))
    opts = RunOptions(max_new_tokens=30, emulate=ROOT)
    ref = run_plan(plan, ckpt, cl, [[1, 2, 3]], opts).token_ids[0]
    wire.make_keys(str(tmp_path / "k"))
    wire.make_keys(str(tmp_path / "other"))
    other = wire.load_keys(str(tmp_path / "other"))
    cluster_pub = wire.load_keys(str(tmp_path / "k"))["public"]
    ctx = zmq.Context()
    intruders: list[tuple[str, zmq.Socket, zmq.Socket]] = []

    def intrude(d: Driver) -> None:
        for target in ("a", "b"):
            for kind, ep in (("control", d.peers[target].control), ("data", d.peers[target].data)):
                for key in ("none", "wrong"):
                    s = ctx.socket(zmq.DEALER if kind == "control" else zmq.PUSH)
                    s.setsockopt(zmq.LINGER, 0)
                    if key == "wrong":  # knows the cluster's public key, not its secret
                        s.curve_secretkey, s.curve_publickey = other["secret"], other["public"]
                        s.curve_serverkey = cluster_pub
                    mon = s.get_monitor_socket()
                    s.connect(ep)
                    if kind == "control":
                        wire.send(s, wire.MsgType.HELLO, obj=wire.hello_payload("driver", time=time.time()))
                    else:
                        import numpy as np

                        wire.send(s, wire.MsgType.ACT, array=np.zeros((1, 1, 64), np.float32), segment=1)
                    intruders.append((f"{key} key -> {target} {kind}", s, mon))

    try:
        with Driver(plan, ckpt, cl, RunOptions(max_new_tokens=30, emulate=ROOT, keys=str(tmp_path / "k"))) as d:
            d.start()
            d.setup([3, 1], 128)
            d.generate([[1, 2, 3]], on_token=lambda t: intrude(d) if t["index"] == 2 else None)
            got = [int(t["token_id"]) for t in sorted(d.tokens, key=lambda t: t["index"])]
            wait_until(lambda: "refused a peer presenting another key" in d.emu.log_tail("b", 50),
                       what="worker b logging the refused peer")
            log = d.emu.log_tail("b", 50)
        assert got == ref
        assert len(intruders) == 8
        for what, s, mon in intruders:
            events = []
            deadline = time.monotonic() + 0.5  # it keeps reconnecting (and failing): bounded look
            while time.monotonic() < deadline and mon.poll(100):
                events.append(recv_monitor_message(mon)["event"])
            assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events, what
            assert zmq.EVENT_CONNECTED in events, what  # it reached the port, and was refused
            if what.endswith("control"):
                assert not s.poll(100), what  # no answer to its HELLO
        assert "refused a peer presenting another key" in log
    finally:
        for _, s, mon in intruders:
            s.disable_monitor()
            mon.close(linger=0)
            s.close(linger=0)
        ctx.destroy(linger=0)
