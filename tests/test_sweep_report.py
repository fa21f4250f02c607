"""`primasim sweep-report`: the tables agree with the raw results, crossovers are where the curves
cross, figures are drawn, and bad arguments get one line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from primasim.cli import main
from primasim.loop.sweep import load_results, run_sweep, spec_from_dict
from primasim.loop.sweep.report import Report, crossovers, curves, prepare, sweep_report


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rep") / "sweep"
    spec = spec_from_dict({"name": "rep", "evaluate": "plan",
                           "grid": {"model": ["llama3-8b", "llama3-70b"], "cluster": "prima-d1-d4", "quant": "q4k",
                                    "system": ["prima", "llama.cpp", "exo", "mdi-llm"],
                                    "bandwidth_mbps": [50, 200, 800], "ram_scale": [0.5, 1.0, 1.5]},
                           "when": [{"if": {"system": "mdi-llm"}, "S": [1, 4]}]})
    run = run_sweep(spec, out, workers=1, progress=False)
    assert run.evaluated == 2 * 3 * 3 * 5 and run.errors == 0
    return out


def test_best_system_per_scenario_matches_the_raw_rows(swept: Path) -> None:
    rep = sweep_report(swept)
    raw = load_results(swept)
    raw = raw[raw["feasible"]]
    best = rep.tables["best"].set_index(["model", "bandwidth_mbps", "ram_scale"])
    for (m, bw, rs), g in raw.groupby(["model", "bandwidth_mbps", "ram_scale"]):
        row = best.loc[(m, bw, rs)]
        assert row["best_value"] == pytest.approx(g["tpot_ms"].min())
        winners = set(g.loc[g["tpot_ms"] <= g["tpot_ms"].min() * 1.01, "system"])
        assert row["best"] in winners and set(filter(None, row["tied"].split())) <= winners
    # mdi-llm is credited with its best S per scenario
    per = rep.per_system[rep.per_system["system"] == "mdi-llm"]
    assert set(per["setting"]) <= {"S=1", "S=4", ""}


def test_speedups_limits_and_figures(swept: Path) -> None:
    rep = sweep_report(swept, baseline="llama.cpp")
    sp = rep.tables["speedups"]
    base = sp[sp["system"] == "llama.cpp"]
    assert np.allclose(base["speedup"].dropna(), 1.0)
    summ = rep.tables["speedup_summary"].set_index(["model", "system"])
    assert summ.loc[("llama3-70b", "prima"), "max"] > 5  # prima far ahead of llama.cpp at 70B (the paper: 15x)
    lim = rep.tables["limits"].set_index(["model", "system", "knob"])
    assert lim.loc[("llama3-70b", "exo", "ram_scale"), "verdict"] == "infeasible everywhere"
    assert lim.loc[("llama3-8b", "llama.cpp", "ram_scale"), "verdict"] == "feasible everywhere"
    assert lim.loc[("llama3-8b", "exo", "ram_scale"), "verdict"].startswith("feasible from 1 up")
    for name in ("heatmap_best", "heatmap_speedup", "crossover"):
        assert rep.figures[name].stat().st_size > 5000
    for name in rep.tables:
        assert (swept / "report" / f"{name}.csv").exists()
    text = (swept / "report" / "README.md").read_text()
    assert "## Systems" in text and "heatmap_best.png" in text


def test_higher_is_better_metric_flips_the_winner(swept: Path, tmp_path: Path) -> None:
    rep = sweep_report(swept, metric="throughput_tok_s", report_dir=tmp_path, figures=False)
    raw = load_results(swept)
    raw = raw[raw["feasible"]]
    best = rep.tables["best"].set_index(["model", "bandwidth_mbps", "ram_scale"])
    for key, g in raw.groupby(["model", "bandwidth_mbps", "ram_scale"]):
        assert best.loc[key, "best_value"] == pytest.approx(g["throughput_tok_s"].max())


def test_crossover_is_interpolated_where_the_curves_cross() -> None:
    xs = np.array([10.0, 20, 40, 80, 160])
    a = 100 / xs * 4  # falls with x
    b = np.full_like(xs, 10.0)  # flat: a = b at x = 40
    df = pd.DataFrame({"model": "m", "cluster": "c", "system": ["a"] * 5 + ["b"] * 5, "bw": np.r_[xs, xs],
                       "tpot_ms": np.r_[a, b], "feasible": True})
    rep = Report(out=Path("."), metric="tpot_ms", scenario_keys=["model", "cluster", "bw"], numeric_keys=["bw"],
                 per_system=df.assign(setting=""))
    cur = curves(rep, "bw", [])
    x = crossovers(cur, "bw", [], log_x=True)
    assert len(x) == 1
    assert x.iloc[0]["at"] == pytest.approx(40.0)
    assert x.iloc[0]["faster_below"] == "b" and x.iloc[0]["faster_above"] == "a"


def test_prepare_averages_replicates_and_drops_errors() -> None:
    df = pd.DataFrame({"model": "m", "system": ["a", "a", "b", "b", "b"], "seed": [0, 1, 0, 1, 2],
                       "tpot_ms": [10.0, 20.0, 12.0, 14.0, np.nan], "feasible": [True, True, True, True, False],
                       "error": ["", "", "", "", "boom"]})
    rep = prepare(df)
    got = rep.per_system.set_index("system")["tpot_ms"]
    assert got["a"] == 15.0 and got["b"] == 13.0
    assert "1 of 5 cells failed" in rep.notes[0]


def test_cli_report_and_its_errors(swept: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["sweep-report", str(swept), "--json", "--no-figures", "--report-dir", str(tmp_path / "r")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["system"] for r in out["systems"]} == {"prima", "llama.cpp", "exo", "mdi-llm"}
    for argv, word in (([str(swept), "--metric", "speed"], "--metric"), ([str(swept), "--x", "colour"], "--x"),
                       ([str(swept), "--baseline", "nope"], "--baseline"), ([str(tmp_path / "none")], "no sweep")):
        assert main(["sweep-report", *argv, "--report-dir", str(tmp_path / "r2")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and word in err, err


def test_a_sampled_sweep_reports_its_scenarios_not_the_product_of_their_values(tmp_path: Path) -> None:
    """Sampled knobs take a new value in every scenario: the tables hold the scenarios that exist (a
    pivot over the product of the knobs' values had 40^3 x 2 rows here, and at 100,000 cells asked
    for 19 GiB)."""
    spec = spec_from_dict({"name": "lhs", "evaluate": "plan",
                           "grid": {"model": ["llama3-8b", "llama3-70b"], "cluster": "prima-d1-d4", "quant": "q4k",
                                    "system": ["llama.cpp", "exo"]},
                           "sample": {"method": "lhs", "n": 40,
                                      "ranges": {"bandwidth_mbps": {"low": 10, "high": 1000, "log": True},
                                                 "latency_ms": {"low": 1, "high": 20},
                                                 "ram_scale": {"low": 0.3, "high": 1.5}}}})
    run_sweep(spec, tmp_path, workers=1, progress=False)
    rep = sweep_report(tmp_path, figures=False)
    best = rep.tables["best"]
    assert len(best) == 2 * 40  # models x sampled points
    assert not best.duplicated(["model", "bandwidth_mbps", "latency_ms", "ram_scale"]).any()
