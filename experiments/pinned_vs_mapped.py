"""How much CPU a decode window costs on pinned weights (anonymous memory, `runtime.model.pin_params`,
as MDI-LLM and Bud plans run) against mapped ones (the file's pages, `load_params`, as the rings
and the profile's probe run).

One process pinned to one host CPU, no quota: windows of 4 f32 blocks of llama-mini-300m (one
token, `run_layers`), blocks 0-3 and 4-7 each mapped and pinned, interleaved (2 ms apart, the
order reversed every round), 400 rounds; median process CPU time per call.

    sudo flock /work/coord/measure.lock nice -n -5 .venv/bin/python experiments/pinned_vs_mapped.py

Results: experiments/results/pinned_vs_mapped.md.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from primasim.core.model_sources import load_model
from primasim.runtime import model as md
from primasim.runtime.checkpoint import open_checkpoint
from primasim.runtime.head import cached_random_weights


def main() -> None:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    ck = open_checkpoint(cached_random_weights(load_model("llama-mini-300m", "f32"), fmt="safetensors"))
    wins = {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    params = {}
    for w, layers in wins.items():
        params[("mapped", w)] = md.load_params(ck, layers, embed=False, head=False)
        params[("pinned", w)] = md.pin_params(md.load_params(ck, layers, embed=False, head=False))
    kv = md.init_kv(ck.spec, list(range(8)), 1024)
    x = np.zeros((1, 1, ck.spec.hidden), np.float32)

    def call(key: tuple[str, int]) -> None:
        nonlocal kv
        y, kv = md.run_layers(params[key], kv, x, 20, wins[key[1]])
        np.asarray(y)

    for _ in range(5):  # compile, fault in
        for k in params:
            call(k)
    cpu: dict[tuple[str, int], list[float]] = {k: [] for k in params}
    for r in range(400):
        for k in list(params) if r % 2 else list(params)[::-1]:
            time.sleep(0.002)
            c0 = time.process_time()
            call(k)
            cpu[k].append(time.process_time() - c0)
    print(f"load {os.getloadavg()}")
    for (mode, w), v in cpu.items():
        q1, q3 = np.percentile(v, [25, 75])
        print(f"{mode} blocks {wins[w]}: median CPU per 4-block window {1e3 * statistics.median(v):.3f} ms "
              f"(IQR {1e3 * q1:.2f}-{1e3 * q3:.2f})")


if __name__ == "__main__":
    main()
