"""The distributed runtime: real worker processes talking over zmq, checked against transformers and
the single-process model; schedules (ring with k laps, partial laps with relays, RPP, batched
decode); failure handling (dead worker, junk on the wire, wrong version, bad inputs); and the
file-backed behaviour of a worker whose memory cgroup holds half its window (root)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from conftest import ROOT

from primasim import load_model
from primasim.core.cluster import ClusterSpec, cluster_from_toml
from primasim.core.errors import CheckpointError, PlanError, WireError, WorkerError
from primasim.core.model import ModelSpec
from primasim.core.plan import DevicePlan, Plan
from primasim.core.runtime_facts import anon_reserve
from primasim.runtime import (
    generate,
    load_params,
    load_tokenizer,
    open_checkpoint,
    wire,
    write_random_checkpoint,
)
from primasim.runtime.emulate import find_leftovers
from primasim.runtime.head import Driver, RunOptions, run_plan

PROMPT = "The quick brown fox jumps over the lazy dog; primasim runs models on home clusters."


def cluster(names: list[str], emulate: dict[str, dict[str, Any]] | None = None, *, latency_ms: float = 0.2,
            addresses: dict[str, str] | None = None) -> ClusterSpec:
    devs = []
    for n in names:
        d: dict[str, Any] = {"name": n, "os": "linux", "cores": 1, "ram_total_gib": 4, "ram_avail_gib": 2,
                             "ram_bw_gbs": 10, "cpu_gflops": {"f32": 10}, "disk_seq_gbs": 1}
        if emulate and n in emulate:
            d["emulate"] = emulate[n]
        if addresses and n in addresses:
            d["address"] = addresses[n]
        devs.append(d)
    return cluster_from_toml({"name": "test", "network": {"kind": "switched", "bandwidth_mbps": 1000,
                                                          "latency_ms": latency_ms}, "devices": devs}, "test")


def ring_plan(spec: ModelSpec, windows: dict[str, int], k: int, **kw: Any) -> Plan:
    return Plan(system=kw.pop("system", "prima"), model=spec.name, n_layers=spec.n_layers, k=k,
                devices=tuple(DevicePlan(n, w) for n, w in windows.items()), quant=spec.quant,
                n_ctx=kw.pop("n_ctx", 128), **kw)


def _children() -> set[int]:
    """Live child processes of this test process."""
    out: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            out |= {int(x) for x in (task / "children").read_text().split()}
        except OSError:
            pass
    return {p for p in out if Path(f"/proc/{p}").exists() and "Z" not in _state(p)}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.fixture(scope="module", params=["llama-tiny", "qwen2-tiny"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(load_model(request.param), tmp_path_factory.mktemp(request.param) / request.param,
                                   seed=7)


@pytest.fixture(scope="module")
def llama(llama_tiny: Path) -> Path:
    return llama_tiny


# ------------------------------------------------------------------------------ numerical truth
@pytest.mark.slow
def test_three_workers_k2_match_transformers(tiny: Path) -> None:
    """Split over 3 worker processes with k = 2 laps, activations over zmq: the head's logits
    equal transformers' within 1e-4 for the prefill and 32 decode steps, greedy tokens identical."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    n = 33  # the token from the prefill + 32 decode steps
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    ids = load_tokenizer(tiny).encode(PROMPT)
    inp = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=n, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    ref_tokens = out.sequences[0, len(ids):].tolist()
    ref_logits = np.stack([s[0].numpy() for s in out.logits])

    ckpt = open_checkpoint(tiny)
    plan = ring_plan(ckpt.spec, {"a": 1, "b": 1, "c": 1}, k=2)
    assert {s.lap for s in plan.segments()} == {0, 1}
    res = run_plan(plan, ckpt, cluster(["a", "b", "c"]), [ids],
                   RunOptions(max_new_tokens=n, return_logits=True, emulate=False))
    got = np.asarray(res.logits[0])
    assert got.shape == ref_logits.shape
    assert np.abs(got - ref_logits).max() < 1e-4
    assert res.token_ids[0] == ref_tokens
    assert np.abs(ref_logits).max() > 0.5
    # the measured trace: one token stamp per token, compute spans on every device, all laps
    tr = res.trace
    assert [t.index for t in tr.tokens] == list(range(n))
    for d in "abc":
        names = {s.name for s in tr.spans if s.device == d and s.resource == "cpu"}
        assert any("lap 0" in x for x in names) and any("lap 1" in x for x in names)
    assert all(tr.device_stats[d]["net_tx_bytes"] > 0 for d in "abc")


# ------------------------------------------------------------------------------ schedules
@pytest.mark.slow
def test_partial_last_lap_relays_to_the_head(tmp_path: Path) -> None:
    """L = 7 over windows 1/2/2 (W = 5, k = 2): the second lap ends on b, c relays it to the head.
    Tokens equal the single-process model's; also with a head that has no layers."""
    spec = ModelSpec(name="relay7", family="llama", n_layers=7, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16,
                     ffn=128, vocab=256, quant="f32", max_context=128)
    path = write_random_checkpoint(spec, tmp_path / "relay7", seed=3)
    ckpt = open_checkpoint(path)
    plan = ring_plan(ckpt.spec, {"a": 1, "b": 2, "c": 2}, k=2)
    assert plan.segments()[-1].device == "b"
    prompt = [5, 17, 33, 2]
    res = run_plan(plan, ckpt, cluster(["a", "b", "c"]), [prompt], RunOptions(max_new_tokens=8, emulate=False))
    ref = generate(load_params(ckpt, range(7), embed=True, head=True), prompt, 8).tokens
    assert res.token_ids[0] == ref
    # a head without layers only embeds, computes the output layer and samples
    plan = ring_plan(ckpt.spec, {"a": 0, "b": 4, "c": 3}, k=1)
    res = run_plan(plan, ckpt, cluster(["a", "b", "c"]), [prompt], RunOptions(max_new_tokens=8, emulate=False))
    assert res.token_ids[0] == ref
    assert not [s for s in res.trace.spans if s.device == "a" and s.name.startswith("L")]


@pytest.mark.slow
def test_recurrent_pipeline_keeps_s_sequences_in_flight(llama: Path) -> None:
    """MDI-LLM's schedule: 3 sequences circulate at once, each with its own KV cache on every
    device; each gets exactly the tokens it would get alone, and the devices overlap in time."""
    ckpt = open_checkpoint(llama)
    prompts = [[1, 2, 3, 4], [9, 8, 7], [100, 200, 300, 400, 5]]
    plan = ring_plan(ckpt.spec, {"a": 2, "b": 2, "c": 2}, k=1, schedule="rpp", options={"S": 3}, system="mdi-llm")
    res = run_plan(plan, ckpt, cluster(["a", "b", "c"]), prompts, RunOptions(max_new_tokens=6, emulate=False))
    params = load_params(ckpt, range(6), embed=True, head=True)
    assert res.token_ids == [generate(params, p, 6).tokens for p in prompts]
    # while one sequence is on b, another is computed on a: cpu spans of different sequences overlap
    cpu = [s for s in res.trace.spans if s.resource == "cpu" and "L" in s.name]
    overlaps = sum(1 for x in cpu for y in cpu if x.device != y.device and x.seq != y.seq
                   and x.start < y.end and y.start < x.end)
    assert overlaps > 0
    assert len({t.seq for t in res.trace.tokens}) == 3


@pytest.mark.slow
def test_kv_caches_allocated_at_setup_are_reused_by_the_next_generation(llama: Path) -> None:
    """Workers allocate their KV caches at set-up (not inside the first token) and reuse them: a
    second generation on the same workers, with a shorter prompt over a cache the first one
    filled further, gets exactly the tokens it gets alone."""
    ckpt = open_checkpoint(llama)
    plan = ring_plan(ckpt.spec, {"a": 3, "b": 3}, k=1)
    params = load_params(ckpt, range(6), embed=True, head=True)
    long, short = [7, 3, 9, 11, 40, 2, 5, 6], [13, 1]
    with Driver(plan, ckpt, cluster(["a", "b"]), RunOptions(max_new_tokens=6, emulate=False)) as d:
        d.start()
        d.setup([1, len(long), len(short)], 64)
        got = []
        for prompt in (long, short):
            tr = d.generate([prompt])
            got.append([int(t["token_id"]) for t in sorted(d.tokens, key=lambda t: t["index"])])
            assert not [s for s in tr.spans if "kv alloc" in s.name]
    assert got == [generate(params, long, 6).tokens, generate(params, short, 6).tokens]


@pytest.mark.slow
def test_a_single_device_runs_a_token_as_one_call_and_prefetches_nothing_resident(llama: Path) -> None:
    """Per-token overhead (issue 14): on one device whose weights fit, a token is one call for the
    whole model (no embed/window/output dispatches and host copies in between) and prefetch hints
    nothing (madvise of a resident window only burns CPU); the run reports its threads' CPU."""
    ckpt = open_checkpoint(llama)
    plan = ring_plan(ckpt.spec, {"a": ckpt.spec.n_layers}, k=1, prefetch=True)
    res = run_plan(plan, ckpt, cluster(["a"]), [[1, 5, 9]], RunOptions(max_new_tokens=6, emulate=False))
    params = load_params(ckpt, range(ckpt.spec.n_layers), embed=True, head=True)
    assert res.token_ids[0] == generate(params, [1, 5, 9], 6).tokens
    assert res.loads["a"]["fused"] and res.loads["a"]["residency"] == "fits"
    cpu = [s for s in res.trace.spans if s.resource == "cpu"]
    assert len(cpu) == 6 and {s.name for s in cpu} == {f"L0-{ckpt.spec.n_layers - 1}+head"}
    assert not [s for s in res.trace.spans if s.resource == "prefetch"]
    st = res.trace.device_stats["a"]
    assert st["thread_cpu_s.primasim-contro"] >= 0 and res.trace.meta["driver_cpu_s"] > 0
    dev = res.to_json()["devices"]["a"]
    assert dev["residency"] == "fits" and dev["disk_read_mb_per_token"] == 0.0
    assert dev["file_mb"] * 1e6 >= 0.9 * sum(n for _, _, n in ckpt.layer_ranges(range(ckpt.spec.n_layers)))


def test_batched_decode_with_admission_by_memory(llama: Path) -> None:
    """Bud: 5 requests on one worker, paged KV pool sized for two at a time: at most 2 run
    together, all finish, each with the tokens it gets alone."""
    ckpt = open_checkpoint(llama)
    spec = ckpt.spec
    prompts = [[1, 2, 3], [7, 7, 7, 7, 7], [42], [300, 301], [11, 12, 13, 14]]
    new = 5
    block = 4
    per_req = -(-(5 + new) // block)  # blocks for the longest request
    block_bytes = 2 * spec.n_layers * block * spec.n_kv_heads * spec.head_dim * 4
    kv_bytes = (2 * per_req + 1) * block_bytes + block_bytes // 2  # two requests + block 0
    plan = Plan(system="bud", model=spec.name, n_layers=spec.n_layers, k=1, devices=(DevicePlan("a", 6),),
                quant="f32", schedule="batch", weights="pinned", n_ctx=64,
                options={"batch": 5, "tile_tokens": block, "kv_bytes": kv_bytes})
    res = run_plan(plan, ckpt, cluster(["a"]), prompts, RunOptions(max_new_tokens=new, emulate=False))
    params = load_params(ckpt, range(6), embed=True, head=True)
    assert res.token_ids == [generate(params, p, new).tokens for p in prompts]
    sizes = [s.value for s in res.trace.samples if s.name == "batch_size"]
    assert max(sizes) == 2
    assert len(res.trace.tokens) == 5 * new


# ------------------------------------------------------------------------------ failures
def test_bad_inputs_fail_before_any_worker_starts(llama: Path, tmp_path: Path) -> None:
    ckpt = open_checkpoint(llama)
    cl = cluster(["a", "b"])
    before = _children()
    # a plan for a different model
    other = load_model("qwen2-tiny")
    with pytest.raises(PlanError, match="architecture differs"):
        run_plan(ring_plan(other, {"a": 3, "b": 3}, k=1), ckpt, cl, [[1, 2]], RunOptions(emulate=False))
    bigger = ModelSpec(name="bigger", family="llama", n_layers=8, hidden=128, n_heads=8, n_kv_heads=2, head_dim=16,
                       ffn=344, vocab=512, quant="f32")
    with pytest.raises(PlanError, match="8 layers but the weights have 6"):
        run_plan(ring_plan(bigger, {"a": 4, "b": 4}, k=1), ckpt, cl, [[1, 2]], RunOptions(emulate=False))
    # truncated checkpoint
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    for f in Path(llama).iterdir():
        data = f.read_bytes()
        (trunc / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    with pytest.raises(CheckpointError):
        run_plan(ring_plan(ckpt.spec, {"a": 3, "b": 3}, k=1), trunc, cl, [[1, 2]], RunOptions(emulate=False))
    # config / tensor shape mismatch
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(llama).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 400
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="intermediate_size"):
        run_plan(ring_plan(ckpt.spec, {"a": 3, "b": 3}, k=1), bad, cl, [[1, 2]], RunOptions(emulate=False))
    # a catalogue name is not weights
    with pytest.raises(CheckpointError, match="random-weights"):
        run_plan(ring_plan(ckpt.spec, {"a": 3, "b": 3}, k=1), "llama-tiny", cl, [[1, 2]], RunOptions(emulate=False))
    # a device the cluster does not have; a token outside the vocabulary; a simulated-only schedule
    with pytest.raises(PlanError, match="not in the cluster"):
        run_plan(ring_plan(ckpt.spec, {"a": 3, "x": 3}, k=1), ckpt, cl, [[1, 2]], RunOptions(emulate=False))
    with pytest.raises(PlanError, match="outside the vocabulary"):
        run_plan(ring_plan(ckpt.spec, {"a": 3, "b": 3}, k=1), ckpt, cl, [[1, 999]], RunOptions(emulate=False))
    with pytest.raises(PlanError, match="simulated only"):
        run_plan(ring_plan(ckpt.spec, {"a": 3, "b": 3}, k=1, schedule="tp"), ckpt, cl, [[1]], RunOptions(emulate=False))
    assert _children() == before  # nothing was started


@pytest.mark.slow
def test_a_worker_that_dies_mid_run_is_named_and_nothing_leaks(llama: Path) -> None:
    ckpt = open_checkpoint(llama)
    plan = ring_plan(ckpt.spec, {"a": 2, "b": 2, "c": 2}, k=1)
    before = _children()
    pids: list[int] = []
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as ei, Driver(plan, ckpt, cluster(["a", "b", "c"]),
                                                  RunOptions(max_new_tokens=50, emulate=ROOT)) as d:
        d.start()
        d.setup([3, 1], 64)
        pids = [ed.process.pid for ed in d.emu.devices.values()]

        def kill_b(tok: dict[str, Any]) -> None:
            if tok["index"] == 3:
                os.kill(d.emu.devices["b"].process.pid, signal.SIGKILL)

        d.generate([[1, 2, 3]], on_token=kill_b)
    assert time.monotonic() - t0 < 600  # not a hang (set-up included)
    msg = ei.value.message
    assert "device b" in msg and "SIGKILL" in msg
    assert pids and not any(Path(f"/proc/{p}").exists() and _state(p) != "Z" for p in pids)
    assert _children() == before
    assert not any(v for v in find_leftovers().values() if any(d.emu.rid and d.emu.rid in x for x in v))


@pytest.mark.slow
def test_junk_on_the_ring_is_a_wire_error(llama: Path) -> None:
    """A stranger sends junk to a worker's data socket mid-run: the run stops with a WireError
    that names the device, instead of hanging or computing garbage."""
    ckpt = open_checkpoint(llama)
    plan = ring_plan(ckpt.spec, {"a": 3, "b": 3}, k=1)
    ctx = zmq.Context()
    try:
        with pytest.raises(WireError) as ei, Driver(plan, ckpt, cluster(["a", "b"]),
                                                    RunOptions(max_new_tokens=200, emulate=False)) as d:
            d.start()
            d.setup([2, 1], 256)
            rogue = ctx.socket(zmq.PUSH)
            rogue.setsockopt(zmq.LINGER, 0)
            rogue.connect(d.peers["b"].data)

            def junk(tok: dict[str, Any]) -> None:
                if tok["index"] == 2:
                    rogue.send_multipart([b"\x00junk" * 20, b"more junk"])

            d.generate([[1, 2]], on_token=junk)
        assert "device b" in ei.value.message and "expected 60" in ei.value.message
    finally:
        ctx.destroy(linger=0)


def test_a_peer_with_another_protocol_version_is_refused(llama: Path) -> None:
    """The head checks every device's protocol version before sending it anything else."""
    ctx = zmq.Context()
    fake = ctx.socket(zmq.ROUTER)
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    stop = False

    def serve() -> None:
        while not stop:
            if fake.poll(50):
                ident, *_ = fake.recv_multipart()
                frames = wire.encode(wire.MsgType.HELLO_ACK, obj={"time": time.time(), "protocol": 99},
                                     version=wire.PROTOCOL_VERSION + 1)
                fake.send_multipart([ident, *frames])

    import threading

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    ckpt = open_checkpoint(llama)
    plan = ring_plan(ckpt.spec, {"far": 6}, k=1)
    cl = cluster(["far"], addresses={"far": f"tcp://127.0.0.1:{port}"})
    try:
        with pytest.raises(WireError, match="same primasim version"):
            run_plan(plan, ckpt, cl, [[1]], RunOptions(emulate=False))
    finally:
        stop = True
        th.join()
        ctx.destroy(linger=0)


def test_an_unreachable_device_times_out_with_its_name(llama: Path) -> None:
    ckpt = open_checkpoint(llama)
    with zmq.Context() as c, c.socket(zmq.REP) as s:  # a port nobody answers on
        port = s.bind_to_random_port("tcp://127.0.0.1")
        s.close()
        cl = cluster(["far"], addresses={"far": f"tcp://127.0.0.1:{port}"})
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="device far") as ei:
            run_plan(ring_plan(ckpt.spec, {"far": 6}, k=1), ckpt, cl, [[1]], RunOptions(connect_timeout=1.5))
        assert "primasim worker" in ei.value.message
        assert time.monotonic() - t0 < 300  # not a hang


# ------------------------------------------------------------------------------ file-backed weights
@pytest.mark.root
@pytest.mark.slow
def test_worker_with_half_its_window_in_memory_rereads_the_missing_bytes(tmp_path: Path) -> None:
    """A worker whose memory cgroup allows half of its window's weights completes generation; its
    disk reads per token (/proc/<pid>/io) are about the bytes that do not fit."""
    spec = ModelSpec(name="fb14", family="llama", n_layers=14, hidden=512, n_heads=8, n_kv_heads=2, head_dim=64,
                     ffn=2048, vocab=4096, quant="f32", max_context=256)
    ckpt = open_checkpoint(write_random_checkpoint(spec, tmp_path / "fb14", seed=1))
    window = sum(n for _, _, n in ckpt.layer_ranges(range(2, 14)))
    limit = window / 2
    cl = cluster(["h", "w"], {"h": {"cpu_cores": 1.0}, "w": {"cpu_cores": 1.0, "memory_mib": limit / 2**20}})
    plan = ring_plan(spec, {"h": 2, "w": 12}, k=1, n_ctx=64)
    res = run_plan(plan, ckpt, cl, [[1, 5, 9, 3]], RunOptions(max_new_tokens=8))
    assert len(res.token_ids[0]) == 8
    reads = np.diff([s.value for s in res.trace.samples if s.device == "w" and s.name == "disk_read_bytes"])
    per_token = float(np.median(reads))
    load = res.loads["w"]
    # the worker sets aside its KV caches and the activation reserve; the rest of the limit is room for
    # weights, less what the runtime's footprint grew by between the limit and LOAD (a few MB at most)
    room = limit - anon_reserve(12, 64, spec.n_kv_heads, spec.head_dim)
    assert room - 8 * 2**20 < load["budget"] <= room + 2**20, load["budget_how"]
    missing = window - room
    assert load["streamed_bytes"] > 0 and load["resident_bytes"] > 0.3 * window
    # a token re-reads what was planned to stream (the kernel does not thrash the kept part; the page
    # cache's slack may keep a few MB of the streamed part: 0.93-0.96 x measured at 16 MiB reserve) ...
    assert 0.9 * load["streamed_bytes"] < per_token < 1.05 * load["streamed_bytes"]
    # ... which is the missing bytes plus the room one streamed layer part needs (1/(n-1) = 9 % for 12
    # layers; measured 1.09x, 116.2 of 108.8 MB): with the reserve left out of `missing` the ratio sat at
    # 1.27-1.30 and a CI run failed a 1.3 bound by 0.1 MB
    assert 0.95 * missing < per_token < 1.2 * missing
    # the cgroup's view agrees: block reads happened, the limit held
    st = res.trace.device_stats["w"]
    assert st["cg_blkio_read_bytes"] >= 7 * per_token
    assert st["cg_mem_max_usage"] <= st["cg_mem_limit"]
    assert res.to_json()["memory_pressure"]["w"] >= 0.0


def test_an_unreachable_ring_successor_is_an_error_at_setup(llama: Path) -> None:
    """A device whose successor's data port cannot be reached fails SETUP with a WorkerError naming
    both devices (instead of waiting forever for the first token)."""
    ctx = zmq.Context()
    fake = ctx.socket(zmq.ROUTER)
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    with ctx.socket(zmq.REP) as s:  # a data port nobody listens on
        dead = s.bind_to_random_port("tcp://127.0.0.1")
    stop = False

    def serve() -> None:  # a 'worker' that answers the handshake and heartbeats, nothing more
        while not stop:
            if fake.poll(50):
                ident, *frames = fake.recv_multipart()
                msg = wire.decode(frames, peer="head")
                if msg.type == wire.MsgType.HELLO:
                    ack = wire.hello_payload("worker", name="far", data=f"tcp://127.0.0.1:{dead}")
                    fake.send_multipart([ident, *wire.encode(wire.MsgType.HELLO_ACK, obj=ack)])
                elif msg.type == wire.MsgType.PING:
                    fake.send_multipart([ident, *wire.encode(wire.MsgType.PONG, obj={})])

    import threading

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    ckpt = open_checkpoint(llama)
    cl = cluster(["a", "far"], addresses={"far": f"tcp://127.0.0.1:{port}"})
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="cannot reach the ring successor far") as ei:
            run_plan(ring_plan(ckpt.spec, {"a": 3, "far": 3}, k=1), ckpt, cl, [[1]],
                     RunOptions(ring_timeout=3))  # the dead port is the test; starting workers may take long
        assert "device a" in ei.value.message
        assert time.monotonic() - t0 < 600  # not a hang
    finally:
        stop = True
        th.join()
        ctx.destroy(linger=0)
