"""The runtime probe (primasim/loop/validate/probes.py): what a call and a layer of the runtime cost;
and the simulator's output layer at several rows."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import simpy
from hypothesis import given, settings, strategies as st

from primasim.core.device import DeviceSpec
from primasim.core.model_sources import load_model
from primasim.core.runtime_facts import runtime_model
from primasim.core.trace import Trace
from primasim.core.units import GB, GiB
from primasim.loop.validate.probes import cpu_time_basis, line_fit, runtime_probe
from primasim.sim._devices import SimDevice
from primasim.sim._engine import Recorder
from primasim.sim._runtime import output_time, timing


@settings(max_examples=50, deadline=None)
@given(a=st.floats(0.0, 5e-3), b=st.floats(1e-4, 5e-2), n=st.integers(2, 8))
def test_line_fit_recovers_a_calls_cost_and_a_layers(a: float, b: float, n: int) -> None:
    xs = [float(w) for w in range(1, n + 1)]
    icpt, slope = line_fit(xs, [a + b * x for x in xs])
    assert icpt == pytest.approx(a, abs=1e-12) and slope == pytest.approx(b)


def test_cpu_time_is_the_basis_on_one_cpu_only() -> None:
    """One CPU: CPU time / the quota's share of it is the time at the quota's average rate;
    several CPUs (a call's threads may run in parallel): the wall clock."""
    assert cpu_time_basis(1, 0.6) == pytest.approx(0.6)
    assert cpu_time_basis(1, None) == 1.0
    assert cpu_time_basis(1, 1.5) == 1.0  # a quota above the one CPU does not limit it
    assert cpu_time_basis(2, 0.6) is None


def test_probe_fits_a_line_over_window_sizes_in_the_chosen_basis(llama_tiny: Path) -> None:
    share = 0.5
    rt = runtime_probe(llama_tiny, tokens=(1,), max_seq=64, pos=4, layers=2, rounds=3, min_seconds=0.01,
                       cpu_share=share)
    assert rt["basis"] == "cpu" and rt["cpu_share"] == share
    t1 = rt["tokens"]["1"]
    sizes = t1["sizes"]
    assert sorted(sizes) == ["1", "2"] and all(len(v["cpu_s"]) == 3 for v in sizes.values())
    # each size's figure is its median CPU time per call / the share (the quota's average rate)
    assert t1["single_s"] == pytest.approx(statistics.median(sizes["1"]["cpu_s"]) / share)
    assert t1["window_s"] == pytest.approx(statistics.median(sizes["2"]["cpu_s"]) / share)
    # two sizes: the line passes through both (a call's cost + one layer = a single-layer call)
    assert t1["layer_s"] == pytest.approx(max(1e-6, t1["window_s"] - t1["single_s"]))
    assert t1["call_s"] == pytest.approx(max(0.0, t1["single_s"] - (t1["window_s"] - t1["single_s"])), abs=1e-9)
    assert rt["head_s"] > 0 and rt["embed_s"] > 0
    wall = runtime_probe(llama_tiny, tokens=(1,), max_seq=64, pos=4, layers=2, rounds=1, min_seconds=0.01)
    assert wall["basis"] == "wall"
    w1 = wall["tokens"]["1"]
    assert w1["single_s"] == pytest.approx(statistics.median(w1["sizes"]["1"]["wall_s"]))



@settings(max_examples=30, deadline=None)
@given(bw1=st.floats(5.0, 30.0), bw2=st.floats(0.3, 3.0), flops=st.floats(10.0, 100.0))
def test_the_output_layer_never_gets_cheaper_with_more_rows(bw1: float, bw2: float, flops: float) -> None:
    """Several rows of the output layer (a speculative verification, a batch) cost what one row
    costs, grown as a block's time grows with the rows -- whatever the block's solved matrix-matrix
    rate (a rate fitted to a block's mix of bytes and FLOPs made 5 rows cost half of one)."""
    mini = runtime_model(load_model("llama-mini-300m", "f32"))
    spec = DeviceSpec(name="d", os="linux", cores=1, ram_total=4 * GiB, ram_avail=3 * GiB, ram_bw=bw1 * GB,
                      cpu_flops={"f32": flops * 1e9}, disk_seq=0.3 * GB,
                      gemm_bw_rows={"2": bw1 * bw2 * GB, "8": bw1 * bw2 * 4 * GB})
    dev = SimDevice(simpy.Environment(), spec, mini, recorder=Recorder(Trace(source="sim", system="test")))
    times = [output_time(dev, r) for r in (1, 2, 3, 5, 8)]
    assert all(b >= a * (1 - 1e-12) for a, b in zip(times, times[1:], strict=False))
    grow = [timing(dev, r).layer("cpu", r, 256, pos=256) / timing(dev, 1).layer("cpu", 1, 256, pos=256)
            for r in range(2, 6)]
    assert times[3] == pytest.approx(times[0] * max(1.0, *grow))
