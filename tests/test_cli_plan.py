"""`primasim plan`: JSON contract, table output, --out, and bad input (exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from primasim.cli import main
from primasim.core.paths import data_dir
from primasim.core.plan import Plan


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "--cluster", "prima-d1-d4", "--model", "llama3-70b", "--quant", "q4k", "--json")
    assert rc == 0
    obj = json.loads(out)
    for key in ("system", "feasible", "reason", "tpot_ms", "ttft_ms", "throughput_tok_s", "memory_pressure", "plan"):
        assert key in obj, key
    assert obj["system"] == "prima" and obj["feasible"] is True
    assert obj["tpot_ms"] > 0 and obj["ttft_ms"] >= obj["tpot_ms"]
    assert set(obj["memory_pressure"]) == {"D1", "D2", "D3", "D4"}
    assert obj["plan"]["k"] >= 1
    assert sum(d["total_layers"] for d in obj["plan"]["devices"]) == 80
    assert {"name", "layers", "gpu_layers"} <= set(obj["plan"]["devices"][0])
    assert "halda" in obj and obj["halda"]["objective_ms"] > 0


def test_infeasible_is_not_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "--cluster", "prima-d1-d4", "--model", "llama3-70b", "--system", "exo", "--json")
    obj = json.loads(out)
    assert rc == 0 and obj["feasible"] is False and obj["reason"].startswith("OOM on")
    assert obj["plan"] is None and obj["tpot_ms"] is None
    rc, out, _ = _run(capsys, "--cluster", "prima-d1-d4", "--model", "llama3-70b", "--system", "dllama")
    assert rc == 0 and "cannot run this case" in out and "OOM" in out


def test_table_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "--cluster", "prima-d1-d4", "--model", "llama3-8b", "--head", "D3")
    assert rc == 0 and "predicted TPOT" in out and "D3*" in out
    rc, out, _ = _run(capsys, "--cluster", "prima-d1-d4", "--model", "llama3-70b", "--global", "--comm", "--general",
                      "--solver", "exact", "--k", "3", "--json")
    obj = json.loads(out)
    assert rc == 0 and obj["plan"]["k"] == 3 and obj["plan"]["options"]["general"] is True
    rc, out, _ = _run(capsys, "--cluster", "prima-d1-d4", "--model", "tinyllama-1.1b", "--system", "mdi-llm",
                      "--option", "S=4", "--option", "nodes=3", "--json")
    assert rc == 0 and json.loads(out)["plan"]["options"]["S"] == 4


def test_out_file_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "plan.json"
    rc, _, _ = _run(capsys, "--cluster", "prima-d1-d4", "--model", "llama3-45b", "--out", str(f))
    assert rc == 0
    plan = Plan.from_json(f)
    assert plan.n_layers == 50 and plan.system == "prima" and plan.prefetch
    rc, _, err = _run(capsys, "--cluster", "prima-d1-d4", "--model", "llama3-70b", "--system", "exo", "--out", str(f))
    assert rc == 2 and "no plan to write" in err


def _cluster_file(tmp_path: Path, mutate) -> Path:  # type: ignore[no-untyped-def]
    with open(data_dir() / "clusters" / "prima-d1-d6.toml", "rb") as fh:
        raw = tomllib.load(fh)
    mutate(raw)
    p = tmp_path / "home.toml"
    p.write_text(tomli_w.dumps(raw))
    return p


@pytest.mark.parametrize("case,needles", [
    ("missing_memory", ["home.toml", "ram_avail_gib", "D2", "fix"]),
    ("negative_memory", ["home.toml", "ram_avail_gib", "non-negative"]),
    ("incomplete", ["home.toml", "devices"]),
    ("malformed", ["home.toml", "not valid TOML"]),
])
def test_bad_cluster_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, needles: list[str]) -> None:
    if case == "missing_memory":
        p = _cluster_file(tmp_path, lambda r: r["devices"][1].pop("ram_avail_gib"))
    elif case == "negative_memory":
        p = _cluster_file(tmp_path, lambda r: r["devices"][0].__setitem__("ram_avail_gib", -2.0))
    elif case == "incomplete":
        p = _cluster_file(tmp_path, lambda r: r.pop("devices"))
    else:
        p = tmp_path / "home.toml"
        p.write_text("[[devices]]\nname = 'x'\nos = ")
    rc, out, err = _run(capsys, "--cluster", str(p), "--model", "llama3-8b")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err  # one clear line
    for n in needles:
        assert n in err, (n, err)


def test_bad_models_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "--cluster", "prima-d1-d4", "--model", "llama-9000b")
    assert rc == 2 and "unknown model" in err and "--model" in err
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    rc, _, err = _run(capsys, "--cluster", "prima-d1-d4", "--model", str(cfg))
    assert rc == 2 and str(cfg) in err and "model_type" in err
    for argv in (["--system", "vllm"], ["--head", "D9"], ["--option", "S"], ["--system", "exo", "--comm"],
                 ["--quant", "q3"], ["--system", "exo", "--option", "S=2"], ["--n-ctx", "0"]):
        rc, _, err = _run(capsys, "--cluster", "prima-d1-d4", "--model", "llama3-8b", *argv)
        assert rc == 2 and "error:" in err and "Traceback" not in err, argv


def test_console_script_exit_codes(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "primasim"
    ok = subprocess.run([str(exe), "plan", "--cluster", "prima-d1-d4", "--model", "llama3-8b", "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and json.loads(ok.stdout)["feasible"] is True
    bad = subprocess.run([str(exe), "plan", "--cluster", str(tmp_path / "none.toml"), "--model", "llama3-8b"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "none.toml" in bad.stderr and "Traceback" not in bad.stderr
