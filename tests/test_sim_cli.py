"""`primasim simulate`: the contract's flags and --json keys, traces, determinism, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from primasim.cli import main


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["simulate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, "--cluster", "prima-d1-d4", "--model", "llama3-8b", "--quant", "q4k", "--system", "llama.cpp",
                "--prompt-tokens", "8", "--tokens", "6")
    for key in ("system", "feasible", "tpot_ms", "ttft_ms", "throughput_tok_s", "memory_pressure", "plan"):
        assert key in out
    assert out["system"] == "llama.cpp" and out["feasible"] is True
    assert out["tpot_ms"] > 0 and out["ttft_ms"] > out["tpot_ms"] * 0.5
    assert {"k", "devices"} <= set(out["plan"])
    assert all({"name", "layers", "gpu_layers"} <= set(d) for d in out["plan"]["devices"])
    assert set(out["memory_pressure"]) >= {"D3"} and 0 <= out["memory_pressure"]["D3"] < 0.5
    assert out["tpot_p90_ms"] >= out["tpot_p50_ms"]


def test_infeasible_is_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, "--cluster", "prima-d1-d4", "--model", "llama3-70b", "--quant", "q4k", "--system", "exo",
                "--tokens", "2")
    assert out["feasible"] is False and "OOM" in out["reason"] and out["tpot_ms"] is None


def test_same_seed_same_result_other_seed_other_jitter(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--cluster", "prima-d1-d4", "--model", "llama3-8b", "--system", "prima-no-halda", "--tokens", "12")
    a = _json(capsys, *args, "--seed", "3")
    b = _json(capsys, *args, "--seed", "3")
    c = _json(capsys, *args, "--seed", "4")
    assert a == b
    assert a["tpot_ms"] != c["tpot_ms"]  # the Wi-Fi latency draws differ
    assert a["tpot_p90_ms"] > a["tpot_p50_ms"]  # jitter spreads the inter-token gaps
    n = _json(capsys, *args, "--no-jitter")
    assert n["tpot_p90_ms"] == pytest.approx(n["tpot_p50_ms"], rel=1e-6)


def test_trace_file_and_plan_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = tmp_path / "plan.json"
    out = _json(capsys, "--cluster", "prima-d1-d4", "--model", "llama3-8b", "--system", "prima-no-halda", "--tokens", "3")
    plan_file.write_text(json.dumps(out))  # the whole --json output is accepted as a plan
    trace = tmp_path / "t.json"
    again = _json(capsys, "--cluster", "prima-d1-d4", "--model", "llama3-8b", "--plan", str(plan_file), "--tokens", "3",
                  "--trace", str(trace))
    assert again["plan"]["devices"] == out["plan"]["devices"]
    ev = json.loads(trace.read_text())["traceEvents"]
    names = {e["args"]["name"] for e in ev if e.get("name") == "process_name"}
    assert {"D1", "D2", "D3", "D4"} <= names
    assert any(e["ph"] == "X" and e["cat"] == "cpu" for e in ev)
    assert any(e["ph"] == "i" and e["name"].startswith("token") for e in ev)


def test_prefetch_flag_and_planner_options(capsys: pytest.CaptureFixture[str]) -> None:
    base = ("--cluster", "prima-d1-d4", "--model", "llama3-8b", "--tokens", "3")
    on = _json(capsys, *base, "--system", "prima", "--prefetch")
    off = _json(capsys, *base, "--system", "prima", "--no-prefetch")
    assert on["plan"]["prefetch"] is True and off["plan"]["prefetch"] is False  # the plan as simulated
    k2 = _json(capsys, *base, "--system", "even", "--k", "2")
    assert k2["plan"]["k"] == 2
    b = _json(capsys, "--cluster", "prima-d1-d4", "--model", "tinyllama-1.1b", "--system", "bud", "--tokens", "4",
              "--requests", "5", "--batch", "5", "--option", "kv=prealloc")
    assert b["plan"]["options"]["kv"] == "prealloc" and b["feasible"]


@pytest.mark.parametrize("argv,needle", [
    (["--system", "nosuch"], "unknown system"),
    (["--tokens", "0"], "--tokens"),
    (["--plan", "/nonexistent/plan.json"], "file not found"),
    (["--option", "novalue"], "KEY=VALUE"),
    (["--system", "llama.cpp", "--k", "2"], "no option"),
])
def test_bad_input_is_one_clear_error(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--cluster", "prima-d1-d4", "--model", "llama3-8b", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_console_script_and_list_systems() -> None:
    out = subprocess.run([sys.executable, "-m", "primasim", "simulate", "--cluster", "x", "--model", "y",
                          "--list-systems"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for s in ("prima", "prima-no-prefetch", "prima-no-halda", "llama.cpp", "exo", "dllama", "mdi-llm", "pipo",
              "flexgen", "bud"):
        assert s in out.stdout
