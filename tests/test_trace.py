"""The shared trace schema: metrics definitions, busy-time merging, round trips, Chrome export."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
from hypothesis import given, settings, strategies as st

from primasim.core.trace import Request, Trace, metrics, result_json


def _trace_with_tokens(times: list[float], arrival: float = 0.0) -> Trace:
    tr = Trace(source="sim", system="test", requests=[Request(0, arrival, 4, len(times))])
    for i, t in enumerate(times):
        tr.token(0, i, t)
    return tr


def test_ttft_tpot_throughput_definitions() -> None:
    tr = _trace_with_tokens([0.5, 0.6, 0.8, 0.9], arrival=0.1)
    m = metrics(tr)
    assert math.isclose(m.ttft_ms, 400.0)
    assert math.isclose(m.tpot_ms, (0.9 - 0.5) / 3 * 1e3)
    assert math.isclose(m.tpot_p50_ms, 100.0)
    assert math.isclose(m.throughput_tok_s, 4 / 0.8)


def test_per_request_tpot_is_averaged_over_requests() -> None:
    tr = Trace(source="run", system="x", requests=[Request(0, 0.0, 1, 3), Request(1, 0.0, 1, 3)])
    for i, t in enumerate([1.0, 2.0, 3.0]):
        tr.token(0, i, t)
    for i, t in enumerate([1.0, 1.5, 2.0]):
        tr.token(1, i, t)
    m = metrics(tr)
    assert math.isclose(m.tpot_ms, 750.0)
    assert math.isclose(m.ttft_ms, 1000.0)


intervals = st.lists(st.tuples(st.floats(0, 100), st.floats(0, 10)), min_size=0, max_size=30)


@given(intervals)
@settings(max_examples=200, deadline=None)
def test_busy_merges_overlaps_like_a_fine_grid(iv: list[tuple[float, float]]) -> None:
    tr = Trace(source="sim", system="x")
    for s, d in iv:
        tr.span("D1", "cpu", s, s + d)
    grid = np.linspace(0, 111, 111_001)
    covered = np.zeros_like(grid, dtype=bool)
    for s, d in iv:
        covered |= (grid >= s) & (grid < s + d)
    approx = covered.sum() * (grid[1] - grid[0])
    assert abs(tr.busy("D1", "cpu") - approx) <= 0.002 * (len(iv) + 1) + 1e-9
    assert tr.busy("D1", "cpu") <= sum(d for _, d in iv) + 1e-9


def test_memory_pressure_from_available_drop() -> None:
    tr = _trace_with_tokens([1.0, 2.0])
    tr.device_stats["D1"] = {"mem_total": 100.0, "mem_avail_before": 60.0, "mem_avail_min": 55.0}
    assert math.isclose(metrics(tr).memory_pressure["D1"], 0.05)


def test_round_trip_and_chrome_export(tmp_path) -> None:
    tr = _trace_with_tokens([0.2, 0.3])
    tr.span("D1", "cpu", 0.0, 0.1, "window 0", nbytes=10)
    tr.span("D2", "net", 0.1, 0.15, "send")
    tr.samples.append(__import__("primasim.core.trace", fromlist=["Sample"]).Sample("D1", "resident_bytes", 0.1, 5.0))
    tr.add_stat("D1", "disk_read_bytes", 123.0)
    again = Trace.from_dict(json.loads(json.dumps(tr.to_dict())))
    assert again == tr
    chrome = tr.to_chrome()
    kinds = {e["ph"] for e in chrome["traceEvents"]}
    assert {"M", "X", "i", "C"} <= kinds
    assert any(e.get("name") == "window 0" and e["dur"] == 0.1 * 1e6 for e in chrome["traceEvents"])
    tr.save_chrome(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]


def test_result_json_has_contract_keys() -> None:
    out = result_json("prima", feasible=True, m=metrics(_trace_with_tokens([0.1, 0.2, 0.3])))
    for key in ("system", "feasible", "tpot_ms", "ttft_ms", "throughput_tok_s", "memory_pressure", "plan"):
        assert key in out
    json.dumps(out)  # serialisable, no NaN objects
    empty = result_json("exo", feasible=False, reason="OOM on D2")
    assert empty["feasible"] is False and empty["tpot_ms"] is None


def test_the_simulator_and_the_worker_record_one_schema() -> None:
    """The same calls on the simulator's recorder (a device's view) and on a worker's give the same
    spans and samples once the head files the worker's under its device, and the same counters."""
    from primasim.core.trace import Recorder, Trace
    from primasim.runtime.worker import Recorder as WorkerRecorder
    from primasim.sim import Recorder as SimRecorder

    calls = [("span", ("cpu", 1.0, 2.0, "L0-1 lap 0", 0, 3, 0.0)), ("span", ("disk", 2.5, 3.0, "stream", 1, 3, 4096.0)),
             ("sample", ("disk_read_bytes", 2.7, 4096.0)), ("add", ("net_tx_bytes", 10.0)),
             ("add", ("net_tx_bytes", 5.0)), ("span", ("send", 3.5, 3.6, "to D2", 0, 4, 512.0))]
    simulated = Trace("sim", "prima")
    sim, worker = SimRecorder(simulated).device("D1"), WorkerRecorder()
    assert isinstance(sim, Recorder) and isinstance(worker, Recorder)
    for kind, args in calls:
        getattr(sim, kind)(*args)
        getattr(worker, kind)(*args)
    measured = Trace("run", "prima")
    spans, samples = worker.stats()
    measured.add_device("D1", spans, samples, offset=0.5)
    shift = [dataclasses.replace(s, start=s.start - 0.5, end=s.end - 0.5) for s in simulated.spans]
    assert measured.spans == shift and len(shift) == 3
    assert [(s.device, s.name, s.value) for s in measured.samples] == [(s.device, s.name, s.value) for s in simulated.samples]
    assert simulated.device_stats["D1"]["net_tx_bytes"] == worker.counters["net_tx_bytes"] == 15.0
    worker.close()
