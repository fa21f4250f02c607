"""A short long run (experiments/long_run.py): 200 greedy tokens over 4 local worker processes
(home-emu's plan, no limits), worker memory sampled from outside; anonymous memory must stay flat
apart from the KV cache (resident from set-up) and the workers' own trace recording, and tokens and
logits must equal a single-device run of the same model."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from primasim.runtime.running import worker_pids

ROOT = Path(__file__).resolve().parent.parent


def _long_run():
    spec = importlib.util.spec_from_file_location("long_run", ROOT / "experiments" / "long_run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["long_run"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_long_run_memory_flat_and_tokens_match_single_device(tmp_path: Path) -> None:
    from primasim.core.model import ModelSpec
    from primasim.runtime import generate, load_params, open_checkpoint, write_random_checkpoint

    lr = _long_run()
    spec = ModelSpec(name="lr-test", family="llama", n_layers=8, hidden=256, n_heads=4, n_kv_heads=4, head_dim=64,
                     ffn=768, vocab=1024, rope_theta=500000.0, max_context=512, quant="f32")
    path = write_random_checkpoint(spec, tmp_path / "lr-test", seed=3)
    n = 200
    prompt = [1, 17, 301, 1000, 42]
    res = lr.run_cluster(path, "home-emu", n, 2, 0.1, False, prompt=prompt)
    assert len(res["tokens"]) == n

    # same tokens and logits as one device running the whole model
    params = load_params(open_checkpoint(path), range(spec.n_layers), embed=True, head=True)
    gen = generate(params, prompt, n, keep_logits=True, max_seq=len(prompt) + n)
    agree = lr.compare(res["tokens"], gen.tokens, res["logits"], np.stack(gen.logits))
    assert agree["identical"], agree
    assert agree["logit_max_abs_diff"] < 1e-4, agree

    # worker memory: anonymous growth per token well below what a per-token copy of the KV cache
    # or of a layer's activations would leave, and the page cache (file RSS) constant
    lr.attach_tokens(res["rows"], res["arrivals"])
    devices = [d for d in res["layers"] if res["layers"][d] > 0]
    assert len(devices) == 4
    for d in devices:
        rows = [r for r in res["rows"] if r["device"] == d]
        kv = lr.kv_bytes_per_token(spec, res["layers"][d])
        v = lr.analyse_device(rows, kv, n)
        assert v["samples"] >= 20, (d, v["samples"])
        assert v["RssAnon"]["slope"] < 16 * 1024, (d, v["RssAnon"])  # the trace recorder adds ~4 KiB/token
        assert v["RssAnon"]["growth"] < 4 * 2**20, (d, v["RssAnon"])
        assert abs(v["RssFile"]["growth"]) < 2 * 2**20, (d, v["RssFile"])
    assert not worker_pids(os.getpid()), "workers left running"
