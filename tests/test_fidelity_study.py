"""The fidelity study's streaming regime and its spread over runs (experiments/fidelity.py,
experiments/fidelity_spread.py; issue 15 part 6)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
fidelity = importlib.import_module("fidelity")
fidelity_spread = importlib.import_module("fidelity_spread")


def test_streaming_regime_covers_the_issue_s_factors() -> None:
    cfgs = fidelity.stream_configs()
    even = [c for c in cfgs if c.system == "even"]
    assert len(even) >= 30
    assert {len(c.devices) for c in cfgs} == {2, 3, 4}
    assert {c.mode for c in cfgs} == {"planned", "lru"}
    assert {dict(c.options)["k"] for c in even} == {1, 2, 3, 4}
    assert {c.prefetch for c in even} == {True, False}
    assert all(c.split == "held-out" and c.regime == "streaming" for c in cfgs)
    # every group ranks the same candidates: one per (k, prefetch) and Halda's
    groups = {c.group for c in cfgs}
    assert len(groups) == 6 and all(sum(c.group == g for c in cfgs) == 9 for g in groups)
    assert len({c.name for c in cfgs}) == len(cfgs)


@pytest.mark.parametrize("quant", ["f32", "q4k"])
def test_stream_variant_leaves_every_device_short_of_a_quarter_of_the_weights(quant: str,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond the KV caches and activations of a quarter of the layers, each device holds less than
    a quarter of the weight file, whatever the quantisation."""
    from primasim.core.model_sources import load_model
    from primasim.core.runtime_facts import anon_reserve

    monkeypatch.setattr(fidelity, "QUANT", quant)
    m = load_model(fidelity.MODEL, quant)
    reserve = anon_reserve(m.n_layers // 4, fidelity.N_CTX, m.n_kv_heads, m.head_dim)
    cl = fidelity.variant("stream")
    assert all(d.emulate is not None and reserve < d.emulate.memory_limit < reserve + m.total_bytes / 4
               for d in cl.devices)


@pytest.mark.slow
def test_even_streaming_plans_stream_on_every_device_in_the_simulator() -> None:
    """On the variant's nominal figures, every device of the 2-device even plans reads from disk."""
    cl = fidelity.variant("stream")
    for c in fidelity.stream_configs():
        if c.system != "even" or len(c.devices) != 2 or dict(c.options)["k"] not in (1, 4):
            continue
        plan, sub = fidelity.make(c, cl)
        assert fidelity._all_of(fidelity.simulate_config(c, plan, sub)["streaming"]), c.name


def _run(tmp: Path, name: str, pred_scale: float, swap: bool = False) -> None:
    rows = []
    for i, (grp, label) in enumerate([("g", "a"), ("g", "b"), ("g", "c"), ("g", "d")]):
        meas = 100.0 * (i + 1)
        pred = meas * pred_scale
        if swap and label in ("a", "b"):  # predicted order of a and b swapped
            pred = 100.0 * (2 if label == "a" else 1) * pred_scale
        rows.append({"name": f"{grp}/{label}", "group": grp, "regime": "streaming", "split": "held-out",
                     "plan_key": label, "pred_tpot_ms": pred, "meas_tpot_ms": meas, "pred_throughput": 1.0,
                     "meas_throughput": 1.0, "ape_tpot_ms": abs(pred - meas) / meas * 100, "ape_ttft_ms": 1.0,
                     "foreign_cpu": 0.1, "load1": 3.0})
    d = tmp / name
    d.mkdir()
    pd.DataFrame(rows).to_csv(d / "fidelity.csv", index=False)


def test_spread_reports_every_run_and_meets_a_target_only_in_every_run(tmp_path: Path) -> None:
    _run(tmp_path, "run1", 1.02)
    _run(tmp_path, "run2", 1.04)
    _run(tmp_path, "run3", 1.08, swap=True)
    text = fidelity_spread.spread(tmp_path)
    df = pd.read_csv(tmp_path / "fidelity_spread.csv")
    med = df[(df["figure"] == "TPOT median %") & (df["where"] == "held-out, all")].iloc[0]
    assert (round(med["run1"], 1), round(med["run2"], 1)) == (2.0, 4.0) and med["run3"] > 5
    assert med["met"] == "no"  # run3 misses the 5 % median
    tau = df[(df["figure"] == "Kendall tau") & (df["where"] == "g")].iloc[0]
    assert tau["run1"] == pytest.approx(1.0) and tau["run3"] < 0.9 and tau["met"] == "no"
    assert "run1 | run2 | run3" in text and (tmp_path / "fidelity_spread.md").exists()


def test_resolved_pair_tau_ranks_only_pairs_every_run_orders_alike(tmp_path: Path) -> None:
    def frame(meas: dict[str, float], pred: dict[str, float]) -> pd.DataFrame:
        return pd.DataFrame([{"group": "g", "plan_key": k, "pred_tpot_ms": pred[k], "meas_tpot_ms": v,
                              "pred_throughput": 1.0, "meas_throughput": 1.0} for k, v in meas.items()])

    pred = {"a": 100.0, "b": 200.0, "c": 300.0, "d": 400.0}
    # a and b swap places between runs (unresolved); c < d always, predicted alike; b < c always
    runs = [frame({"a": 101, "b": 100, "c": 300, "d": 400}, pred),
            frame({"a": 100, "b": 101, "c": 310, "d": 390}, pred)]
    tau, resolved, total = fidelity_spread.resolved_pair_tau(runs)["g"]
    assert (resolved, total) == (5, 6) and tau == pytest.approx(1.0)
    # a prediction that orders a resolved pair the other way counts against it
    wrong = {**pred, "d": 250.0}  # predicts d < c, measured c < d in both runs; d vs b still right
    runs = [frame(m, wrong) for m in ({"a": 101, "b": 100, "c": 300, "d": 400}, {"a": 100, "b": 101, "c": 310, "d": 390})]
    tau, resolved, _ = fidelity_spread.resolved_pair_tau(runs)["g"]
    assert resolved == 5 and tau == pytest.approx((4 - 1) / 5)


def test_spread_without_runs_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no run"):
        fidelity_spread.spread(tmp_path)
