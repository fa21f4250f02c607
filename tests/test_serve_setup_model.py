"""The serve validation's start-up model for a device that leaves (experiments/serve_validation.py
`setup_model`): fitted on the server's own start, applied to the survivors' restart.

A worker's set-up is SETUP's compile + LOAD; LOAD's `load_s` already spans its warm-up (`warm_s`),
so the fit must not add `warm_s` again (`primasim.serve.engine.worker_setup_s`). Counting it twice
predicted the emulated desktop's 15-layer restart at 33.2 s where it took 20.7 s (2026-12-07)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import assume, given, settings, strategies as st

from primasim.core.cluster import load_cluster
from primasim.serve.engine import worker_setup_s
from primasim.sim._serving import _read_time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import serve_validation as sv  # noqa: E402

CLUSTER = load_cluster(ROOT / "experiments" / "results" / "serve_cluster.toml")


def _quota(name: str) -> float:
    em = CLUSTER.device(name).emulate
    assert em is not None
    return float(em.cpu_quota)


def _start(phases: dict[str, tuple[float, float, float, float]], connect: float) -> dict:
    """A server start: per device (compile s, LOAD s, of which warm-up s, resident bytes)."""
    return {"connect_s": connect, "loads": {n: {"setup_warmup_s": c, "load_s": ld, "warm_s": w, "resident_bytes": r}
                                            for n, (c, ld, w, r) in phases.items()}}


def test_worker_setup_s_is_compile_plus_load() -> None:
    assert worker_setup_s({"setup_warmup_s": 0.6, "load_s": 12.4, "warm_s": 8.8}) == pytest.approx(13.0)
    assert worker_setup_s({"warmup_s": 0.5, "load_s": 2.0}) == pytest.approx(2.5)  # a READY's own name
    assert worker_setup_s({}) == 0.0


@settings(max_examples=40, deadline=None)
@given(compile_d=st.floats(0.1, 2.0), compile_l=st.floats(0.1, 2.0), extra_d=st.floats(0.5, 10.0),
       extra_l=st.floats(0.5, 10.0), warm_d=st.floats(0.0, 8.0), warm_l=st.floats(0.0, 8.0),
       res_d=st.floats(0.1e9, 0.5e9), res_l=st.floats(0.55e9, 1.0e9), connect=st.floats(1.0, 5.0))
def test_the_fit_reproduces_the_start_from_compile_and_load_whatever_the_warm_up(
        compile_d: float, compile_l: float, extra_d: float, extra_l: float, warm_d: float, warm_l: float,
        res_d: float, res_l: float, connect: float) -> None:
    """Two devices: the line through their set-up CPU-seconds is exact, so each device's predicted
    start-up (reading its own window again) is spawn + its compile + LOAD -- the warm-up inside LOAD
    changes nothing, and is never counted on top."""
    dev = {n: CLUSTER.device(n) for n in ("desktop", "laptop")}
    # LOAD = its warm-up + the disk reads + the rest (extra): at least the warm-up and the reads
    load_d = warm_d + _read_time(dev["desktop"], res_d) + extra_d
    load_l = warm_l + _read_time(dev["laptop"], res_l) + extra_l
    y_d = (compile_d + load_d - _read_time(dev["desktop"], res_d)) * _quota("desktop")  # what the fit sees
    y_l = (compile_l + load_l - _read_time(dev["laptop"], res_l)) * _quota("laptop")
    assume(y_l >= y_d)  # a non-negative slope (the model clamps a negative one)
    start = _start({"desktop": (compile_d, load_d, warm_d, res_d), "laptop": (compile_l, load_l, warm_l, res_l)},
                   connect)
    setup_fn, fitted = sv.setup_model(start, CLUSTER)
    plan = SimpleNamespace(active=[SimpleNamespace(name="desktop"), SimpleNamespace(name="laptop")])
    spawn = fitted["spawn_cpu_s"] / min(_quota("desktop"), _quota("laptop"))
    assert spawn == pytest.approx(connect)
    for n, (c, ld, res) in {"desktop": (compile_d, load_d, res_d), "laptop": (compile_l, load_l, res_l)}.items():
        busy = setup_fn(n, res, plan) - spawn + _read_time(dev[n], res)  # + the disk: the simulator's own share
        assert busy == pytest.approx(c + ld, rel=1e-6, abs=1e-6)
        assert busy == pytest.approx(worker_setup_s(start["loads"][n]), rel=1e-6, abs=1e-6)
