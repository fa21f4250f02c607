"""Sweep specs: grids, conditional axes, sampling designs, generated clusters, and one clear line
(naming the key and the fix, exit code 2) for every kind of mistake."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from primasim.cli import main
from primasim.core.cluster import load_cluster
from primasim.core.errors import SpecError
from primasim.loop.sweep import build_context, cell_id, load_spec, spec_from_dict

BASE = {"model": "llama3-8b", "cluster": "prima-d1-d4"}


def test_grid_is_the_cartesian_product_in_order() -> None:
    grid = {"model": ["llama3-8b", "llama3-70b"], "cluster": "prima-d1-d4", "system": ["prima", "exo", "llama.cpp"],
            "bandwidth_mbps": [10, 100], "ram_scale": [0.5, 1.0]}
    spec = spec_from_dict({"grid": grid})
    assert len(spec) == 2 * 3 * 2 * 2
    axes = {k: v for k, v in grid.items() if isinstance(v, list)}
    want = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    got = list(spec.cells())
    assert [{k: c[k] for k in axes} for c in got] == want
    assert all(c["cluster"] == "prima-d1-d4" for c in got)
    assert len({cell_id(c) for c in got}) == len(got)
    assert cell_id({"a": 1, "b": 2}) == cell_id({"b": 2, "a": 1})


def test_conditional_axis_applies_only_where_it_matches() -> None:
    spec = spec_from_dict({"grid": {**BASE, "system": ["prima", "mdi-llm", "exo"], "bandwidth_mbps": [10, 100]},
                           "when": [{"if": {"system": "mdi-llm"}, "S": [1, 2, 4]}]})
    cells = list(spec.cells())
    assert len(cells) == 2 * 2 + 2 * 3  # prima, exo x 2 bandwidths; mdi-llm x 2 bandwidths x 3 S
    assert all(("S" in c) == (c["system"] == "mdi-llm") for c in cells)
    assert sorted(c["S"] for c in cells if "S" in c) == [1, 1, 2, 2, 4, 4]


def _brute(grid: dict, whens: list[dict]) -> list[dict]:
    """The definition of a spec's cells: every grid combination, then every matching when's axes."""
    axes = {k: v if isinstance(v, list) else [v] for k, v in grid.items()}
    out = []
    for combo in itertools.product(*axes.values()):
        base = dict(zip(axes, combo))
        variants = [base]
        for w in whens:
            cond = w["if"]
            if all(base[k] in (v if isinstance(v, list) else [v]) for k, v in cond.items()):
                body = {k: v if isinstance(v, list) else [v] for k, v in w.items() if k != "if"}
                variants = [dict(c, **dict(zip(body, vals))) for c in variants
                            for vals in itertools.product(*body.values())]
        out += variants
    return out


@given(n_sys=st.integers(1, 4), n_bw=st.integers(1, 3), pick=st.lists(st.integers(0, 3), min_size=1, max_size=3),
       s_vals=st.lists(st.integers(1, 6), min_size=1, max_size=3, unique=True),
       k_vals=st.lists(st.integers(1, 4), min_size=1, max_size=2, unique=True), two=st.booleans())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_blocks_equal_the_brute_force_expansion(n_sys: int, n_bw: int, pick: list[int], s_vals: list[int],
                                                 k_vals: list[int], two: bool) -> None:
    systems = ["mdi-llm", "prima", "exo", "llama.cpp"][:n_sys]
    grid = {**BASE, "system": systems, "bandwidth_mbps": [float(10 * (i + 1)) for i in range(n_bw)],
            "model": ["llama3-8b", "llama3-70b"]}
    whens = []
    if "mdi-llm" in systems:
        whens.append({"if": {"system": "mdi-llm"}, "S": s_vals})
    if two and "prima" in systems:
        whens.append({"if": {"system": "prima", "model": "llama3-70b"}, "k": k_vals})
    spec = spec_from_dict({"grid": grid, "when": whens})
    brute = _brute(grid, whens)
    got = list(spec.cells())
    assert len(spec) == len(brute)
    assert sorted(map(cell_id, got)) == sorted(map(cell_id, brute))
    assert all(spec.cell(i) == c for i, c in enumerate(got))  # random access equals iteration


def test_latin_hypercube_is_stratified_and_seeded() -> None:
    raw = {"grid": {**BASE, "system": ["prima", "exo"]},
           "sample": {"method": "lhs", "n": 20, "ranges": {"bandwidth_mbps": {"low": 10, "high": 1000, "log": True},
                                                          "ram_scale": {"low": 0.25, "high": 1.5},
                                                          "k": {"low": 1, "high": 4}}}}
    with pytest.raises(SpecError, match="k"):  # k is a planner option exo does not take
        spec_from_dict(raw)
    raw["sample"]["ranges"]["latency_ms"] = raw["sample"]["ranges"].pop("k") | {"high": 10}
    spec = spec_from_dict(raw)
    assert len(spec) == 2 * 20
    cells = list(spec.cells())
    prima = [c for c in cells if c["system"] == "prima"]
    exo = [c for c in cells if c["system"] == "exo"]
    assert [c["bandwidth_mbps"] for c in prima] == [c["bandwidth_mbps"] for c in exo]  # paired design
    bw = np.array([c["bandwidth_mbps"] for c in prima])
    assert bw.min() >= 10 and bw.max() <= 1000
    strata = np.floor((np.log(bw) - np.log(10)) / (np.log(1000) - np.log(10)) * 20).astype(int)
    assert sorted(strata) == list(range(20))  # one point per stratum: Latin hypercube
    ram = np.array([c["ram_scale"] for c in prima])
    assert sorted(np.floor((ram - 0.25) / 1.25 * 20).astype(int)) == list(range(20))
    again = spec_from_dict(raw)
    assert list(again.cells()) == cells and again.fingerprint() == spec.fingerprint()
    other = spec_from_dict(dict(raw, seed=1))
    assert list(other.cells()) != cells and other.fingerprint() != spec.fingerprint()


@pytest.mark.parametrize("method", ["random", "sobol", "halton"])
def test_other_designs_stay_in_range(method: str) -> None:
    spec = spec_from_dict({"grid": {**BASE, "system": "prima"}, "sample": {
        "method": method, "n": 16, "ranges": {"k": {"low": 1, "high": 5}, "ram_scale": {"low": 0.5, "high": 2}}}})
    cells = list(spec.cells())
    assert len(cells) == 16
    assert all(isinstance(c["k"], int) and 1 <= c["k"] <= 5 for c in cells)
    assert all(0.5 <= c["ram_scale"] <= 2 for c in cells)


def test_generated_clusters_are_deterministic_and_follow_their_classes(tmp_path: Path) -> None:
    raw = {"seed": 3, "grid": {"model": "llama3-8b", "cluster": "home", "system": "prima"},
           "generate": {"home": {"count": 6, "devices": {"low": 2, "high": 5}, "classes": {"phone": 1, "laptop": 1},
                                 "os": {"linux": 1, "android": 1}, "per_link": True,
                                 "bandwidth_mbps": {"low": 20, "high": 200, "log": True}}}}
    spec = spec_from_dict(raw)
    assert len(spec) == 6 and [c["cluster"] for c in spec.cells()] == [f"home/{i}" for i in range(6)]
    ctx = build_context(spec)
    ctx2 = build_context(spec_from_dict(raw))
    for name, cl in ctx.clusters.items():
        assert cl == ctx2.clusters[name]  # same seed, same clusters
        assert 2 <= len(cl.devices) <= 5
        assert len(cl.network.links) == len(cl.devices) * (len(cl.devices) - 1) // 2
        assert all(20e6 / 8 <= ln.bandwidth <= 200e6 / 8 for ln in cl.network.links)
        for d in cl.devices:
            assert d.os in ("linux", "android")  # no macOS: the OS mix gives it no weight
            assert ("phone" in d.hardware) == (d.os == "android")
        path = tmp_path / f"{name.replace('/', '-')}.toml"
        cl.save(path)
        assert load_cluster(path).devices == cl.devices  # a generated cluster is an ordinary cluster file
    other = build_context(spec_from_dict(dict(raw, seed=4)))
    assert any(other.clusters[n] != c for n, c in ctx.clusters.items())


BAD = [
    ({"grid": {**BASE, "system": "prima", "bandwdith_mbps": [1]}}, "bandwdith_mbps", "did you mean 'bandwidth_mbps'"),
    ({"grid": {**BASE, "system": "prima", "ram_scale": [0.5, -1]}}, "ram_scale", "> 0"),
    ({"grid": {**BASE, "system": "prima", "k": [1.5]}}, "k", "whole number"),
    ({"grid": {**BASE, "system": "no-such"}}, "system", "use one of"),
    ({"grid": {**BASE, "system": ["prima", "exo"], "S": [1, 2]}}, "S", "[[when]]"),
    ({"grid": {**BASE, "system": "prima", "quant": "q3"}}, "quant", "q4k"),
    ({"grid": {"model": "llama3-8b", "system": "prima"}}, "cluster", "set cluster"),
    ({"grid": {**BASE, "system": "prima"}, "sample": {"method": "sobol", "n": 10,
                                                      "ranges": {"ram_scale": {"low": 0.1, "high": 1}}}}, "n", "n = 8"),
    ({"grid": {**BASE, "system": "prima"}, "sample": {"n": 4, "ranges": {"ram_scale": {"low": 2, "high": 1}}}},
     "ram_scale", "swap low and high"),
    ({"grid": {**BASE, "system": "prima"}, "sample": {"n": 4, "ranges": {"bandwidth_mbps": {"low": 0, "high": 1,
                                                                                           "log": True}}}},
     "bandwidth_mbps", "low above 0"),
    ({"grid": {**BASE, "system": ["prima", "mdi-llm"]}, "when": [{"if": {"system": "mdi_llm"}, "S": [1]}]},
     "when", "use values of grid system"),
    ({"grid": {**BASE, "system": "prima"}, "when": [{"if": {"tokens": 4}, "S": [1]}]}, "when", "grid knobs"),
    ({"grid": {**BASE, "system": "prima"}, "colour": 1}, "colour", "top-level keys"),
    ({"evaluate": "guess", "grid": {**BASE, "system": "prima"}}, "evaluate", "simulate"),
    ({"evaluate": "plan", "grid": {**BASE, "system": "prima", "tokens": 4}}, "tokens", "evaluate = \"simulate\""),
    ({"grid": {**BASE, "cluster": "home", "system": "prima"}, "generate": {"home": {"count": 0, "classes": ["phone"]}}},
     "count", "count = 20"),
    ({"grid": {**BASE, "system": "prima"}, "generate": {"h": {"count": 2, "classes": {"toaster": 1}}}}, "classes",
     "phone"),
    ({"grid": {**BASE, "system": "prima"}, "generate": {"h": {"count": 2, "classes": ["mac"], "os": ["linux"]}}},
     "os", "give one of macos a weight"),
    ({"grid": {**BASE, "system": "prima"}}, None, None),  # the control: a good spec
]


@pytest.mark.parametrize(("raw", "key", "fix"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_specs_name_the_key_and_the_fix(raw: dict, key: str | None, fix: str | None) -> None:
    if key is None:
        assert len(spec_from_dict(raw)) == 1
        return
    with pytest.raises(SpecError) as e:
        spec_from_dict(raw, where="s.toml")
    msg = e.value.message
    assert key in msg and fix in msg and "\n" not in msg, msg
    assert msg.startswith("s.toml")


def test_unknown_model_and_cluster_fail_before_anything_runs(tmp_path: Path) -> None:
    for k, v in (("model", "no-such-model"), ("cluster", "no-such-cluster")):
        spec = spec_from_dict({"grid": {**BASE, "system": "prima", k: v}})
        with pytest.raises(SpecError, match=f"{k} 'no-such"):
            build_context(spec)


def test_relative_cluster_paths_resolve_beside_the_spec(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    load_cluster("prima-d1-d4").save(tmp_path / "sub" / "mine.toml")
    (tmp_path / "s.toml").write_text('[grid]\nmodel = "llama3-8b"\ncluster = "sub/mine.toml"\nsystem = "prima"\n')
    ctx = build_context(load_spec(tmp_path / "s.toml"))
    assert ctx.clusters["sub/mine.toml"].devices == load_cluster("prima-d1-d4").devices


def test_cli_bad_spec_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bad.toml"
    p.write_text('[grid]\nmodel = "llama3-8b"\ncluster = "prima-d1-d4"\nsystem = ["prima", "exo"]\nS = [1, 2]\n')
    assert main(["sweep", str(p), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.toml" in err and "S" in err and "fix:" in err
    assert not (tmp_path / "o").exists()  # nothing written
    p.write_text("name = [")
    assert main(["sweep", str(p)]) == 2
    assert "TOML" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2
    assert main(["sweep", str(tmp_path / "bad.toml"), "--workers", "0"]) == 2


@given(st.dictionaries(st.sampled_from(["name", "evaluate", "grid", "sample", "when", "cells", "generate", "seed",
                                        "classes", "replicates", "x"]),
                       st.recursive(st.one_of(st.integers(-3, 5), st.text(max_size=6), st.booleans(),
                                              st.floats(allow_nan=True)),
                                    lambda c: st.one_of(st.lists(c, max_size=3),
                                                        st.dictionaries(st.sampled_from(
                                                            ["model", "system", "cluster", "S", "if", "n", "low",
                                                             "high", "ranges", "count", "classes", "k"]), c,
                                                            max_size=3)),
                                    max_leaves=8), max_size=5))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_junk_specs_raise_spec_error_only(raw: dict) -> None:
    try:
        spec_from_dict(raw)
    except SpecError as exc:
        assert "\n" not in exc.message


def test_dry_run_counts_and_estimates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.toml"
    p.write_text('name = "d"\nevaluate = "plan"\n[grid]\nmodel = ["llama3-8b", "llama3-70b"]\ncluster = "prima-d1-d4"\n'
                 'system = ["exo", "llama.cpp", "prima-no-halda"]\nram_scale = [0.5, 1.0, 1.5]\n')
    assert main(["sweep", str(p), "--dry-run", "--json", "--sample-seconds", "2", "--out", str(tmp_path / "o")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["cells"] == 18 and rep["todo"] == 18 and rep["done"] == 0
    assert 3 <= rep["sampled_cells"] <= 18 and rep["estimate_s"] > 0
    assert rep["estimate_s_low"] <= rep["estimate_s"] <= rep["estimate_s_high"]
    assert not (tmp_path / "o").exists()
    assert main(["sweep", str(p), "--dry-run", "--sample-seconds", "1"]) == 0
    assert "estimate" in capsys.readouterr().out


def test_example_specs_parse() -> None:
    root = Path(__file__).resolve().parents[1]
    specs = sorted((root / "experiments" / "sweeps").glob("*.toml")) + sorted((root / "experiments" / "studies").glob("*/spec.toml"))
    assert len(specs) >= 3
    for p in specs:
        spec = load_spec(p)
        assert len(spec) >= 1, p


def test_replicates_add_a_seed_axis() -> None:
    spec = spec_from_dict({"replicates": 3, "grid": {**BASE, "system": ["prima", "exo"]}})
    assert sorted((c["system"], c["seed"]) for c in spec.cells()) == [(s, i) for s in ("exo", "prima") for i in range(3)]
    with pytest.raises(SpecError, match="replicates"):
        spec_from_dict({"replicates": 2, "grid": {**BASE, "system": "prima", "seed": [0, 1]}})


@given(lo=st.floats(0.01, 100), span=st.floats(0, 1000), log=st.booleans(), integer=st.booleans(),
       u=st.floats(0, 1, exclude_max=True))
def test_a_range_draw_stays_in_its_range(lo: float, span: float, log: bool, integer: bool, u: float) -> None:
    from primasim.loop.sweep.dist import parse_dist

    hi = lo + span
    if integer and int(np.ceil(lo)) > int(np.floor(hi)):
        return
    v = parse_dist({"low": lo, "high": hi, "log": log, "integer": integer}, "t").at(u)
    assert lo - 1e-9 <= v <= hi + 1e-9
    assert isinstance(v, int) == integer
