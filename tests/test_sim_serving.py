"""Request streams in the simulator (primasim.sim.serve_workload): arrivals, slots, continuous
batching, Bud with arrivals, departures and recovery, and the CLI's --workload."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from primasim import load_model
from primasim.core.cluster import load_cluster
from primasim.core.workload import RequestSpec, Workload, constant, poisson
from primasim.sim import Departure, Recovery, SimConfig, serve_workload, simulate
from primasim.sim._testbeds import bud_xeon, mdi_jetsons

CFG = SimConfig(tokens=8, prompt_tokens=16)


@pytest.fixture(scope="module")
def d1d4():  # type: ignore[no-untyped-def]
    return load_cluster("prima-d1-d4")


def _one(arrival: float = 0.0, p: int = 16, o: int = 8) -> Workload:
    return Workload((RequestSpec(0, arrival, p, o),))


def _check_records(res, wl: Workload) -> None:  # type: ignore[no-untyped-def]
    assert res.feasible, res.reason
    assert len(res.records) == len(wl)
    for r in res.records:
        assert r.status == "ok", r.error
        assert r.n_out == r.max_tokens
        assert all(b >= a for a, b in zip(r.token_times, r.token_times[1:]))
        assert r.queue >= -1e-12 and r.ttft >= r.queue - 1e-12


def test_one_request_matches_simulate(d1d4) -> None:  # type: ignore[no-untyped-def]
    """A lone request is served exactly as `simulate` runs one sequence (same warm-up, same walks)."""
    m = load_model("llama3-70b", "q4k")
    one = simulate("prima", m, d1d4, config=CFG)
    res = serve_workload("prima", m, d1d4, _one(), config=CFG, plan=one.plan)
    _check_records(res, _one())
    r = res.records[0]
    assert r.ttft * 1e3 == pytest.approx(one.metrics.ttft_ms, rel=1e-6)
    assert r.tpot * 1e3 == pytest.approx(one.metrics.tpot_ms, rel=1e-6)
    assert r.queue == 0.0


def test_server_path_delays_arrival_and_tokens(d1d4) -> None:  # type: ignore[no-untyped-def]
    """The server's path (HTTP in, SSE out) adds to a lone request's TTFT and not to its TPOT; with
    two requests close together, the later one's path-in delay lets the earlier one start first."""
    m = load_model("llama3-8b", "q4k")
    plan = simulate("prima", m, d1d4, config=CFG).plan
    base = serve_workload("prima", m, d1d4, _one(), config=CFG, plan=plan).records[0]
    r = serve_workload("prima", m, d1d4, _one(), config=CFG, plan=plan, path=(0.02, 0.005)).records[0]
    assert r.arrival == base.arrival
    assert r.ttft == pytest.approx(base.ttft + 0.025, abs=1e-9)
    assert r.tpot == pytest.approx(base.tpot, rel=1e-9)
    wl = Workload((RequestSpec(0, 0.0, 16, 8), RequestSpec(1, 0.01, 16, 8)))
    two = serve_workload("prima", m, d1d4, wl, config=CFG, plan=plan, slots=1, path=(0.02, 0.005))
    assert two.records[0].token_times[-1] <= two.records[1].token_times[0]


def test_one_slot_is_an_md1_queue(d1d4) -> None:  # type: ignore[no-untyped-def]
    """One device, one slot, fixed lengths, no jitter: every request takes the same service time D,
    so Poisson arrivals make an M/D/1 queue whose mean wait is rho D / (2 (1 - rho)) (Pollaczek-Khinchine)."""
    m = load_model("llama3-8b", "q4k")
    cfg = CFG.replace(jitter=False)
    solo = serve_workload("llama.cpp", m, d1d4, _one(p=16, o=8), config=cfg, slots=1)
    D = solo.records[0].e2e
    lam = 0.5 / D
    res = serve_workload("llama.cpp", m, d1d4, poisson(lam, 3000, prompt=16, output=8, seed=7), config=cfg,
                         plan=solo.plan, slots=1)
    # exactly Lindley's recursion W' = max(0, W + D - gap) on the same arrivals
    w, prev = 0.0, None
    for r in res.records:
        if prev is not None:
            w = max(0.0, w + D - (r.arrival - prev))
        prev = r.arrival
        assert r.queue == pytest.approx(w, abs=1e-6)
    assert max(r.e2e - r.queue for r in res.records) == pytest.approx(D, rel=1e-6)
    # and on average the M/D/1 formula (3000 requests at rho 0.5: within sampling error)
    rho = lam * D
    wait = sum(r.queue for r in res.records) / len(res.records)
    assert wait == pytest.approx(rho * D / (2 * (1 - rho)), rel=0.15)


def test_load_raises_latency_monotonically(d1d4) -> None:  # type: ignore[no-untyped-def]
    m = load_model("llama3-8b", "q4k")
    plan = simulate("prima", m, d1d4, config=CFG).plan
    base = poisson(1.0, 40, prompt=32, output=16, seed=4)
    p90 = []
    for scale in (4.0, 1.0, 0.25, 0.05):  # offered load rises 80x
        res = serve_workload("prima", m, d1d4, base.scaled(scale), config=CFG, plan=plan, slots=2)
        _check_records(res, base)
        p90.append(res.summary["e2e_ms"]["p90"])
    assert p90 == sorted(p90)
    assert p90[-1] > 3 * p90[0]  # queueing shows up at saturation


def test_slots_share_a_ring_and_continuous_batches_it() -> None:
    """MDI-LLM's testbed: S sequences in flight keep the devices busy; continuous batching carries
    every active request in one pass, so its throughput at saturation is higher still."""
    m = load_model("nanollama-304m")
    cl = mdi_jetsons(3)
    wl = constant(1000.0, 24, prompt=16, output=16)  # everything at once: saturation
    one = serve_workload("mdi-llm", m, cl, wl, config=CFG, slots=1)
    three = serve_workload("mdi-llm", m, cl, wl, config=CFG, slots=3)
    cont = serve_workload("mdi-llm", m, cl, wl, config=CFG, mode="continuous", slots=8)
    for r in (one, three, cont):
        _check_records(r, wl)
    t1, t3, tc = (r.summary["throughput_tok_s"] for r in (one, three, cont))
    assert t3 > 1.8 * t1
    assert tc > t3


def test_bud_serves_a_stream_and_idles_between_arrivals() -> None:
    m = load_model("codellama-7b")
    cl = bud_xeon()
    wl = constant(0.05, 3, prompt=64, output=8)  # a request every 20 s: each served alone
    res = serve_workload("bud", m, cl, wl, config=CFG)
    _check_records(res, wl)
    assert res.mode == "batch"
    ttfts = [r.ttft for r in res.records]
    assert max(ttfts) == pytest.approx(min(ttfts), rel=1e-6)  # nobody queued behind anybody
    assert res.records[2].token_times[0] > 40.0
    burst = serve_workload("bud", m, cl, constant(1000.0, 16, prompt=64, output=8), config=CFG)
    _check_records(burst, constant(1000.0, 16, prompt=64, output=8))
    # batched decode: 16 requests at once take far less than 16x one request's time
    assert burst.summary["duration_s"] < 4 * res.records[0].e2e


def test_a_device_leaves_and_every_request_completes(d1d4) -> None:  # type: ignore[no-untyped-def]
    m = load_model("llama3-45b", "q4k")
    plan = simulate("prima", m, d1d4, config=CFG).plan
    assert len(plan.active) > 1
    victim = plan.active[1].name
    wl = poisson(0.5, 12, prompt=16, output=8, seed=2)
    base = serve_workload("prima", m, d1d4, wl, config=CFG, plan=plan, slots=2)
    res = serve_workload("prima", m, d1d4, wl, config=CFG, plan=plan, slots=2,
                         departure=Departure(6.0, victim), recovery=Recovery(setup_s=2.0))
    _check_records(res, wl)
    rc = res.recovery
    assert rc is not None and rc["feasible"], rc
    assert victim not in rc["plan"]
    assert rc["in_flight"] >= 1 and res.summary["restarted"] >= rc["in_flight"]
    # recovery: detection + re-plan + set-up (+ reading moved layers) + re-prefill
    assert rc["recovery_s"] >= rc["detect_s"] + rc["replan_s"] + 2.0
    assert res.summary["e2e_ms"]["p90"] > base.summary["e2e_ms"]["p90"]
    # restarted requests keep the tokens produced before the departure
    early = [r for r in res.records if r.restarts and r.token_times and r.token_times[0] < 6.0]
    assert early and all(r.n_out == r.max_tokens for r in early)


def test_survivors_that_cannot_hold_the_model_fail_clearly(d1d4) -> None:  # type: ignore[no-untyped-def]
    m = load_model("llama3-70b", "q4k")
    plan = simulate("prima", m, d1d4, config=CFG).plan
    wl = poisson(0.2, 4, prompt=16, output=4, seed=1)
    res = serve_workload("prima", m, d1d4, wl, config=CFG, plan=plan,
                         departure=Departure(1.0, plan.active[0].name),
                         replan=lambda surv: None)  # a planner that finds nothing
    assert res.recovery is not None and not res.recovery["feasible"]
    failed = [r for r in res.records if r.status == "error"]
    assert failed and all("cannot hold the model" in r.error for r in failed)


def test_runtime_model_serves_slots_and_recovers() -> None:
    """What `primasim serve` runs: the runtime model (residency, per-call costs), S slots."""
    from primasim import runtime_model

    m = runtime_model(load_model("llama-mini-300m"))
    cl = load_cluster("home-emu")
    cfg = SimConfig(runtime=True, warmup=False, tokens=8, prompt_tokens=16)
    wl = poisson(2.0, 10, prompt=16, output=8, seed=3)
    res = serve_workload("prima", m, cl, wl, config=cfg, slots=3)
    _check_records(res, wl)
    dev = res.plan.active[-1].name
    rec = serve_workload("prima", m, cl, wl, config=cfg, slots=3, departure=Departure(2.0, dev))
    _check_records(rec, wl)
    assert rec.recovery["feasible"] and rec.recovery["moved_bytes"]
    # a cold restart (what `primasim serve` does): every survivor reads its whole window, set-up given as a
    # function of what it reads; prompts padded to the server's compiled lengths; warm-up requests first
    seen: list[tuple[str, float]] = []

    def setup(name: str, nbytes: float, new_plan) -> float:  # type: ignore[no-untyped-def]
        seen.append((name, nbytes))
        assert name in {d.name for d in new_plan.active}
        return 1.0 + nbytes / 1e9

    cold = serve_workload("prima", m, cl, wl, config=cfg, slots=3, departure=Departure(2.0, dev), buckets=(16, 64),
                          recovery=Recovery(setup_s=setup, reload="all", warmup=3))
    _check_records(cold, wl)
    rc = cold.recovery
    assert {n for n, _ in seen} == set(rc["setup_by_device"]) and all(b > 0 for _, b in seen)
    assert sum(b for _, b in seen) >= sum(rec.recovery["moved_bytes"].values())  # all >= what moved
    assert all(s >= 1.0 + b / 1e9 for (n, b), s in zip(seen, rc["setup_by_device"].values()))
    assert rc["recovery_s"] >= rc["detect_s"] + rc["replan_s"] + rc["setup_s"]
    assert rc["recovery_s"] > rec.recovery["recovery_s"]


def test_cli_workload_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tr = tmp_path / "w.csv"
    tr.write_text("arrival_s,prompt_tokens,output_tokens\n0,16,4\n0.5,32,4\n1.0,8,4\n")
    for wl in (str(tr), "poisson:2,6"):
        out = subprocess.run([sys.executable, "-m", "primasim", "simulate", "--cluster", "prima-d1-d4", "--model",
                              "llama3-8b", "--workload", wl, "--tokens", "4", "--slo", "ttft:5000", "--json",
                              "--per-request"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        j = json.loads(out.stdout)
        for k in ("system", "feasible", "tpot_ms", "ttft_ms", "throughput_tok_s", "memory_pressure", "plan"):
            assert k in j
        s = j["serving"]
        assert s["completed"] == len(j["requests"])
        for metric in ("ttft_ms", "tpot_ms", "e2e_ms", "queue_ms"):
            assert s[metric]["p50"] is not None and s[metric]["p90"] >= s[metric]["p50"]
        assert j["ttft_p90_ms"] == s["ttft_ms"]["p90"]
    bad = subprocess.run([sys.executable, "-m", "primasim", "simulate", "--cluster", "prima-d1-d4", "--model",
                          "llama3-8b", "--workload", "poisson:2,6", "--depart", "x:D1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--depart" in bad.stderr and "Traceback" not in bad.stderr
