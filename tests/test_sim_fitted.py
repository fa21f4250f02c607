"""The fitted constants (primasim/sim/_fitted.py): the data files agree with them, every cell they
were fitted on is a real paper cell, and overriding them changes exactly the figures they bind."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from primasim.core.cluster import load_cluster
from primasim.loop.reproduce.framework import paper_rows
from primasim.sim import _fitted as F

ROOT = Path(__file__).resolve().parents[1]


def test_the_cluster_files_agree_with_the_registry() -> None:
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import calibrate
    finally:
        sys.path.pop(0)
    assert calibrate.check() == []


def test_every_fitted_cell_is_a_paper_cell_and_is_in_sample() -> None:
    t4 = {(r["model"], r["system"]): r for r in paper_rows("prima_table4")}
    for f in F.FITTED.values():
        assert f.cells and f.prior > 0 and f.prior_source
        for c in f.cells:
            target, case, system, metric, device = c
            if target == F.T4:
                assert t4[(case, system)][f"{metric}_ms"], c
            assert F.split_of(*c) == "in-sample"
    assert F.split_of(F.T4, "llama3-70b", "prima", "tpot") == "out-of-sample"


def test_an_override_moves_exactly_the_bound_figures() -> None:
    cl = load_cluster("prima-d1-d4")
    assert F.calibrated(cl) is cl  # the committed values are what the files hold
    with F.override({"x86_dram_eff": 0.5}):
        assert F.value("x86_dram_eff") == 0.5
        c2 = F.calibrated(cl)
    assert c2.device("D3").ram_bw == pytest.approx(89.6e9 * 0.5)
    assert c2.device("D2").ram_bw == pytest.approx(51.2e9 * 0.5)
    assert c2.device("D1").ram_bw == cl.device("D1").ram_bw  # an Apple device: not bound
    assert c2.device("D3").cpu_flops == cl.device("D3").cpu_flops
    assert F.value("x86_dram_eff") == F.FITTED["x86_dram_eff"].value
    with pytest.raises(KeyError, match="unknown fitted constant"), F.override({"nope": 1.0}):
        pass
