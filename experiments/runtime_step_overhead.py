"""Where a decode token's time goes besides streaming the weights, in-process, one GGUF file:

    python experiments/runtime_step_overhead.py /tmp/models/llama-mini-300m-q4_k_m.gguf

Interleaved in one process (medians over --reps, ms per token): (1) the token's matrix products
alone, all in one jitted call, each from the same activations (independent calls, so XLA may run
two at once), (2) the whole decode step (`model.forward`: embedding, 16 blocks with their norms,
attention and residuals, the head; every call waits for the one before), (3) the same step with
its operands unpacked as before 2026-12-08 (per layer: 4 descriptor tables, 2 norm weights, the
k and v caches: 133 pytree leaves instead of 10; the same kernels, equal logits checked), (4) a
jitted function with the decode step's arguments and an empty body: the host's cost of the
arguments alone; then the machine's read bandwidth (runtime_decode_bench.read_bandwidth).
Run it under the measurement lock.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_decode_bench import read_bandwidth  # noqa: E402

from primasim.runtime import (  # noqa: E402
    kernels as K,  # noqa: E402
    load_params,
    model as md,  # noqa: E402
    open_checkpoint,
)


@partial(jax.jit, static_argnames=("spec", "interleaved", "span", "layout"), donate_argnums=(4,))
def _empty(files, table, norms, extras, kvs, kv_rows, ids, pos, inv_freq, emb, *, spec, interleaved, span, layout):  # noqa: ANN001, ANN202, ARG001
    return ids + 1, kvs


@partial(jax.jit, static_argnames=("spec", "interleaved", "span"), donate_argnums=(2,))
def _unpacked(files, ws, kvs, ids, pos, inv_freq, emb, norm, out, *, spec, interleaved, span):  # noqa: ANN001, ANN202
    x = K.embed(files, emb, ids)
    new = []
    for w, kv in zip(ws, kvs):
        x, kv = md.block(spec, interleaved, files, w, kv, x, pos, inv_freq, None, span)
        new.append(kv)
    lg = K.matmul(files, x[:, -1], out, norm=norm, eps=spec.norm_eps)[0]
    return lg, tuple(new)


@jax.jit
def _products(files, ws, xs):  # noqa: ANN001, ANN202
    acc = 0.0
    for w in ws:
        acc = acc + K.matmul(files, xs[w.cols], w)[0][0, 0]
    return acc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args()
    p = load_params(open_checkpoint(args.model), range(16), embed=True, head=True)
    L = p.spec.n_layers
    ws = [p.layers[i][k] for i in range(L) for k in ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down")]
    ws.append(p.output)
    nbytes = sum(int(r[4]) * K.row_bytes(K.TYPE_NAMES[int(r[2])], int(r[5])) for w in ws for r in np.asarray(w.desc))
    rng = np.random.default_rng(0)
    xs = {c: jax.numpy.asarray(rng.standard_normal((1, c)), jax.numpy.float32) for c in {w.cols for w in ws}}
    _products(p.files, ws, xs).block_until_ready()
    kv = md.init_kv(p.spec, range(L), 1024)
    _, tok, kv = md.forward(p, kv, [list(range(1, 65))], 0)
    kv_e, kv_rows = md.init_kv(p.spec, range(L), 1024).caches(range(L))
    pk = md._pack(p, tuple(range(L)))
    kw = {"spec": p.spec, "interleaved": p.qk_interleaved, "span": 128, "layout": pk.layout}
    n_args = len(jax.tree_util.tree_leaves((p.files, pk.table, pk.norms, pk.extras, kv_e, kv_rows, 0, 0, p.inv_freq,
                                            p.embed)))
    kv_u = tuple((jax.numpy.array(a), jax.numpy.array(b)) for a, b in kv.layers.values())  # per layer, as before
    kw_u = {"spec": p.spec, "interleaved": p.qk_interleaved}
    prods, steps, unpacked, empty, pos = [], [], [], [], 64
    for rep in range(args.reps):
        t = time.perf_counter()
        _products(p.files, ws, xs).block_until_ready()
        prods.append(time.perf_counter() - t)
        t = time.perf_counter()
        lg, tok, kv = md.forward(p, kv, [[rep % 50 + 1]], pos)
        np.asarray(lg)
        steps.append(time.perf_counter() - t)
        t = time.perf_counter()
        lg_u, kv_u = _unpacked(p.files, tuple(p.layers[i] for i in range(L)), kv_u, np.full((1, 1), rep % 50 + 1, np.int32),
                               np.full((1,), pos, np.int32), p.inv_freq, p.embed, p.norm, p.output,
                               span=md.attention_span(pos + 1, 1024), **kw_u)
        lg_u = np.asarray(lg_u)
        unpacked.append(time.perf_counter() - t)
        if not np.array_equal(lg_u, np.asarray(lg)):
            raise SystemExit("the unpacked step's logits differ from model.forward's")
        t = time.perf_counter()
        ids, kv_e = _empty(p.files, pk.table, pk.norms, pk.extras, kv_e, kv_rows, np.ones((1, 1), np.int32),
                           np.full((1,), pos, np.int32), p.inv_freq, p.embed, **kw)
        np.asarray(ids)
        empty.append(time.perf_counter() - t)
        pos = 64 if pos >= 120 else pos + 1
    bw = read_bandwidth(1 << 29, 5)
    a, b, u, e = (float(np.median(v)) for v in (prods, steps, unpacked, empty))
    print(f"{args.model.name}: kernels {K.isa()}; {nbytes / 1e6:.1f} MB of weights per token; read bw {bw / 1e9:.1f} GB/s")
    print(f"  products alone {a * 1e3:.3f} ms ({nbytes / a / bw:.0%} of the read bw)")
    print(f"  decode step    {b * 1e3:.3f} ms ({nbytes / b / bw:.0%}); beyond the products {(b - a) * 1e3:.3f} ms")
    print(f"  unpacked step  {u * 1e3:.3f} ms (133 arguments); packed saves {(u - b) * 1e3:.3f} ms")
    print(f"  empty body, the step's {n_args} arguments: {e * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
