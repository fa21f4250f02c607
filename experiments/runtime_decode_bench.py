"""Single-device decode: weight bytes streamed per second against the machine's memory read
bandwidth (measured in the same run), and tokens/s against llama.cpp on the same model file.

    python experiments/runtime_decode_bench.py                 # llama-mini-300m, f32 (~1.24 GB)
    python experiments/runtime_decode_bench.py --rounds 5 --tokens 96

Writes experiments/results/runtime_decode_bench.{json,md} and runtime_decode_rounds.csv.
The machine is shared and noisy, so every round measures the read bandwidth, our decode and
llama.cpp's decode back to back, and the ratios are taken within a round. llama.cpp comes from
the optional extra `bench` (llama-cpp-python, built from source); without it that part is skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from primasim import load_model
from primasim.core.io import atomic_open, atomic_write_json, atomic_write_text
from primasim.runtime import (
    generate,
    load_params,
    open_checkpoint,
    prefetch,
    write_random_checkpoint,
)

GB = 1e9
RESULTS = Path(__file__).resolve().parent / "results"


def timed(f: Any, reps: int) -> list[float]:
    f()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return out


# ---------------------------------------------------------------------------- a shared machine
def _cpu() -> tuple[int, int, int]:
    """(all CPUs' busy jiffies, all jiffies, this process's jiffies incl. llama.cpp's threads)."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    with open("/proc/self/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return sum(v) - v[3] - v[4], sum(v), int(f[11]) + int(f[12])


class Foreign:
    """Share of the machine's CPU time that other processes used during a `with` block: the
    benchmark runs next to other people's tests, and a segment they disturbed is not a measurement."""

    share = 0.0

    def __enter__(self) -> Foreign:
        self._a = _cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        b = _cpu()
        total = max(b[1] - self._a[1], 1)
        self.share = max(0.0, ((b[0] - self._a[0]) - (b[2] - self._a[2])) / total)


def wait_quiet(limit_s: float, threshold: float = 0.05) -> float:
    """Wait (up to limit_s) for a second in which other processes use < threshold of the CPUs."""
    deadline = time.monotonic() + limit_s
    while True:
        with Foreign() as f:
            time.sleep(1.0)
        if f.share < threshold or time.monotonic() > deadline:
            return f.share


# ---------------------------------------------------------------------------- memory bandwidth
def read_bandwidth(nbytes: int = 1 << 30, reps: int = 7) -> dict[str, list[float]]:
    """STREAM-like read bandwidth samples (bytes/s) with all cores, two ways: a jitted XLA sum and
    numpy's reduce in one thread per core (it releases the GIL). 1 GiB arrays, far beyond caches."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    ja = jax.device_put(a)
    s = jax.jit(jnp.sum)
    parts = np.array_split(a, os.cpu_count() or 2)

    def np_threads() -> None:
        ts = [threading.Thread(target=np.add.reduce, args=(h,)) for h in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    return {"xla_sum": [nbytes / t for t in timed(lambda: s(ja).block_until_ready(), reps)],
            "numpy_threads_sum": [nbytes / t for t in timed(np_threads, reps)]}


def _chain_time(op: Any, a: list[jax.Array], b: list[jax.Array], e: int, reps: int) -> float:
    @jax.jit
    def chain(a: list[jax.Array], b: list[jax.Array], x: jax.Array) -> jax.Array:
        for u, d in zip(a, b):
            x = x + op(jax.nn.silu(op(x, u)), d)
        return x

    x = jnp.ones((1, e), jnp.float32)
    return float(np.median(timed(lambda: chain(a, b, x).block_until_ready(), reps)))


def layout_bench(reps: int = 7) -> dict[str, float]:
    """GB/s of a chain of FFN-shaped GEMVs (1024 -> 4096 -> 1024, 256 MiB of weights) per weight
    layout and dtype: why the model contracts W's last axis on (out, in) arrays and computes in f32."""
    rng = np.random.default_rng(0)
    n, e, f = 8, 1024, 4096
    up = [rng.standard_normal((f, e), dtype=np.float32) * 0.03 for _ in range(n)]  # (out, in)
    down = [rng.standard_normal((e, f), dtype=np.float32) * 0.03 for _ in range(n)]
    nbytes32 = sum(w.nbytes for w in up + down)
    last = lambda x, w: lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))  # noqa: E731
    variants: dict[str, tuple[Any, Any, float]] = {
        "x @ W, W stored (in,out)": (lambda x, w: x @ w, "T", 4),
        "W @ x.T, W (out,in)": (lambda x, w: (w @ x.T).T, "", 4),
        "dot_general on W's last axis, W (out,in)  [used]": (last, "", 4),
        "x @ W.T, W (out,in)": (lambda x, w: x @ w.T, "", 4),
        "f16 weights, dot in f16": (lambda x, w: last(x.astype(jnp.float16), w).astype(jnp.float32), "f16", 2),
        "f16 weights, converted to f32 in the jit": (lambda x, w: last(x, w.astype(jnp.float32)), "f16", 2),
        "bf16 weights, dot in bf16 (f32 accumulate)": (
            lambda x, w: lax.dot_general(x.astype(jnp.bfloat16), w, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32), "bf16", 2),
        "int8 weights x scale, converted in the jit": (lambda x, w: last(x, w.astype(jnp.float32)) * 0.01, "i8", 1),
    }
    out = {}
    for name, (op, kind, item) in variants.items():
        def prep(w: np.ndarray, kind: str = kind) -> jax.Array:
            if kind == "T":
                return jax.device_put(np.ascontiguousarray(w.T))
            dt = {"f16": np.float16, "bf16": jnp.bfloat16, "i8": np.int8}.get(kind)
            if dt is np.int8:
                return jax.device_put(np.clip(w * 100, -127, 127).astype(np.int8))
            return jax.device_put(w.astype(dt) if dt is not None else w)

        t = _chain_time(op, [prep(w) for w in up], [prep(w) for w in down], e, reps)
        out[name] = nbytes32 * item / 4 / t
        print(f"  {name:52s} {out[name] / GB:6.1f} GB/s of weights", flush=True)
    return out


def gemv_sizes(reps: int = 7) -> dict[str, float]:
    """GB/s of chained f32 GEMVs by matrix shape (~256 MiB per shape): why q/k/v and gate/up are
    fused into one view when the file allows it."""
    rng = np.random.default_rng(1)
    out = {}
    for o, i in ((256, 1024), (1024, 1024), (1536, 1024), (4096, 1024), (8192, 1024), (32000, 1024)):
        n = max(1, (256 << 20) // (o * i * 4))
        ws = [jax.device_put(rng.standard_normal((o, i), dtype=np.float32)) for _ in range(n)]

        @jax.jit
        def chain(ws: list[jax.Array], x: jax.Array) -> jax.Array:
            acc = jnp.zeros((1, ws[0].shape[0]), jnp.float32)
            for w in ws:  # each GEMV waits for the previous one, as in a model
                acc = acc + lax.dot_general(x + acc[:, :1] * 1e-9, w, (((1,), (1,)), ((), ())))
            return acc

        x = jnp.ones((1, i), jnp.float32)
        t = float(np.median(timed(lambda: chain(ws, x).block_until_ready(), reps)))  # noqa: B023
        out[f"{o}x{i} ({o * i * 4 / 2**20:.0f} MiB)"] = n * o * i * 4 / t
        print(f"  GEMV {o}x{i}: {out[f'{o}x{i} ({o * i * 4 / 2**20:.0f} MiB)'] / GB:.1f} GB/s", flush=True)
    return out


def batch_rows(reps: int = 5) -> dict[str, float]:
    """Weight GB/s of the FFN chain with B rows (batched decode): XLA:CPU's small-M GEMMs."""
    rng = np.random.default_rng(2)
    up = [jax.device_put(rng.standard_normal((4096, 1024), dtype=np.float32) * 0.03) for _ in range(8)]
    down = [jax.device_put(rng.standard_normal((1024, 4096), dtype=np.float32) * 0.03) for _ in range(8)]
    nbytes = sum(w.nbytes for w in up + down)
    last = lambda x, w: lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))  # noqa: E731
    out = {}
    for b in (1, 2, 4, 8, 16, 64):
        @jax.jit
        def chain(a: list[jax.Array], c: list[jax.Array], x: jax.Array) -> jax.Array:
            for u, d in zip(a, c):
                x = x + last(jax.nn.silu(last(x, u)), d)
            return x

        x = jnp.ones((b, 1024), jnp.float32)
        t = float(np.median(timed(lambda: chain(up, down, x).block_until_ready(), reps)))  # noqa: B023
        out[str(b)] = nbytes / t
        print(f"  {b:3d} rows: {nbytes / t / GB:5.1f} GB/s of weights, {b * nbytes / t / GB:6.1f} per token", flush=True)
    return out


def attention_layout(reps: int = 15) -> dict[str, float]:
    """Seconds for one decode query over 1024 cached positions in 16 layers (llama-mini shapes),
    cache laid out heads-first (B, H_kv, S, D) [used] or positions-first (B, S, H_kv, D)."""
    import math

    from primasim.runtime.model import attention

    rng = np.random.default_rng(3)
    S, Hkv, H, D = 1024, 4, 16, 64
    q = jnp.asarray(rng.standard_normal((1, 1, H, D), dtype=np.float32))
    ks = [jnp.asarray(rng.standard_normal((1, Hkv, S, D), dtype=np.float32)) for _ in range(32)]
    pos = jnp.asarray(np.array([S - 1], np.int32))

    def positions_first(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        qq = q.reshape(1, 1, Hkv, H // Hkv, D)
        s = jnp.einsum("btkgd,bskd->bkgts", qq, k) / math.sqrt(D)
        return jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, axis=-1), v).reshape(1, 1, H * D)

    heads = jax.jit(lambda q, ks: sum(attention(q, ks[2 * i], ks[2 * i + 1], pos) for i in range(16)))
    kt = [k.swapaxes(1, 2) for k in ks]
    posf = jax.jit(lambda q, ks: sum(positions_first(q, ks[2 * i], ks[2 * i + 1]) for i in range(16)))
    out = {"heads_first_s": float(np.median(timed(lambda: heads(q, ks).block_until_ready(), reps))),
           "positions_first_s": float(np.median(timed(lambda: posf(q, kt).block_until_ready(), reps)))}
    print(f"  attention over 1024 positions x 16 layers: heads first {out['heads_first_s'] * 1e3:.2f} ms, "
          f"positions first {out['positions_first_s'] * 1e3:.2f} ms", flush=True)
    return out


# ---------------------------------------------------------------------------- decode
def ours(path: Path, prompt: list[int], n: int, windows: int = 1) -> dict[str, Any]:
    ckpt = open_checkpoint(path)
    spec = ckpt.spec
    params = load_params(ckpt, range(spec.n_layers), embed=True, head=True)
    per = -(-spec.n_layers // windows)
    wins = [list(range(i, min(i + per, spec.n_layers))) for i in range(0, spec.n_layers, per)]
    gen = generate(params, prompt, n, windows=wins, max_seq=len(prompt) + n)
    # the first steps still compile / fault in; the first one's excess is the compilation
    return {"tokens": gen.tokens, "steps": gen.step_s[4:], "first_step_s": gen.step_s[0]}


def llama_cpp_decode(path: Path, prompt: list[int], tokens: list[int], threads: int) -> dict[str, Any] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=len(prompt) + len(tokens) + 8, n_threads=threads,
                n_threads_batch=threads, n_batch=len(prompt), verbose=False)
    n_vocab = llm.n_vocab()
    # the last token's logits (llama-cpp-python keeps scores only with logits_all, which costs time)
    last = lambda: int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))  # noqa: E731
    llm.eval(prompt)
    own, steps = [], []
    nxt = last()
    for tok in tokens[:-1]:  # feed our greedy tokens so both engines do the same work
        own.append(nxt)
        t = time.perf_counter()
        llm.eval([tok])
        steps.append(time.perf_counter() - t)
        nxt = last()
    own.append(nxt)
    import llama_cpp

    return {"steps": steps[4:], "greedy_tokens": own, "version": llama_cpp.__version__}


_QUANT_PROBE = r"""
import json, sys, time
from primasim.runtime import open_checkpoint, load_params
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024
ckpt = open_checkpoint(sys.argv[1]); a0 = anon(); t = time.perf_counter()
params = load_params(ckpt, range(ckpt.spec.n_layers), embed=True, head=True)
print(json.dumps({"file_bytes": ckpt.nbytes, "anon_bytes": anon() - a0, "load_s": time.perf_counter() - t}))
"""


def quant_memory(spec: Any, cache: Path) -> dict[str, Any]:
    """Anonymous memory a Q8_0 / F16 GGUF costs once dequantised to f32 (a child process each)."""
    out = {}
    for q in ("f16", "q8_0"):
        p = cache / f"{spec.name}-{q}.gguf"
        if not p.exists():
            write_random_checkpoint(spec.with_quant(q), p, fmt="gguf", seed=0)
        r = subprocess.run([sys.executable, "-c", _QUANT_PROBE, str(p)], capture_output=True, text=True, check=True)
        out[q] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"  {q}: file {out[q]['file_bytes'] / GB:.2f} GB -> {out[q]['anon_bytes'] / GB:.2f} GB anonymous f32 "
              f"({out[q]['anon_bytes'] / out[q]['file_bytes']:.2f}x), load {out[q]['load_s']:.1f} s", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-mini-300m")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per engine per round")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp threads (XLA uses all cores)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("PRIMASIM_CACHE", "/tmp/primasim-bench")))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--skip-quant", action="store_true", help="skip the F16/Q8_0 memory probe")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="seconds to wait before each round for other processes to go quiet")
    ap.add_argument("--max-foreign", type=float, default=0.10,
                    help="a segment counts if other processes used less than this share of the CPUs")
    args = ap.parse_args()

    spec = load_model(args.model).with_quant("f32")
    args.cache.mkdir(parents=True, exist_ok=True)
    st, gg = args.cache / f"{spec.name}-f32", args.cache / f"{spec.name}-f32.gguf"
    for path, fmt in ((st, "safetensors"), (gg, "gguf")):
        if not path.exists():
            print(f"writing random {spec.name} ({fmt}) to {path} ...", flush=True)
            write_random_checkpoint(spec, path, fmt=fmt, seed=0)
    ckpt = open_checkpoint(st)
    # Bytes one decode step reads: every block, the output norm and matrix; the embedding contributes
    # one row (left out, as gpt-fast and prima.cpp count).
    streamed = ckpt.nbytes - (0 if spec.tie_embeddings else ckpt.infos["token_embd.weight"].nbytes)
    for c in (ckpt, open_checkpoint(gg)):  # warm the page cache: both engines decode from memory
        rs = [r for i in range(spec.n_layers) for r in c.layer_ranges([i])] + c.io_ranges()
        prefetch(rs)
        for f, off, n in rs:
            np.frombuffer(c._map(Path(f)), np.uint8, n, off)[::4096].sum()
    prompt = list(np.random.default_rng(0).integers(3, spec.vocab, args.prompt_tokens))
    print(f"{spec.name}: {ckpt.nbytes / GB:.2f} GB f32, {streamed / GB:.3f} GB streamed per token; "
          f"{os.cpu_count()} cores; jax {jax.__version__}", flush=True)

    foreign: dict[str, float] = {}

    def undisturbed(key: str, what: str, run: Any) -> Any:
        """Run a kernel measurement again (up to 4 times) until other processes leave it alone;
        keep the least disturbed attempt and record how disturbed it was."""
        best: tuple[float, Any] | None = None
        for _ in range(4):
            wait_quiet(args.quiet_wait)
            print(f"{what}:", flush=True)
            with Foreign() as f:
                res = run()
            if best is None or f.share < best[0]:
                best = (f.share, res)
            if f.share < args.max_foreign:
                break
            print(f"  (disturbed: others used {f.share:.0%} of the CPUs; again)", flush=True)
        assert best is not None
        foreign[key] = best[0]
        return best[1]

    layouts = undisturbed("layouts", "weight layouts and dtypes (XLA:CPU GEMV chain)", layout_bench)
    kernels = {"gemv_by_shape": undisturbed("gemv_by_shape", "GEMV by matrix shape", gemv_sizes),
               "ffn_by_rows": undisturbed("ffn_by_rows", "FFN chain by batch rows", batch_rows),
               "attention": undisturbed("attention", "attention cache layout", attention_layout)}
    kernels["foreign"] = foreign

    load_before = os.getloadavg()
    engines = ("ours", "llama_cpp", "ours_gguf", "ours_4win")
    segs: list[dict[str, Any]] = []  # one per measured block: kind, foreign CPU share, samples
    lc_info = None
    for r in range(args.rounds):
        quiet = wait_quiet(args.quiet_wait)
        with Foreign() as f:
            bw = read_bandwidth()
        for k, v in bw.items():
            segs.append({"round": r, "kind": k, "foreign": f.share, "samples": v})
        o: dict[str, Any] = {}
        for k in engines:
            with Foreign() as f:
                if k == "ours":
                    res = o = ours(st, prompt, args.tokens)
                elif k == "llama_cpp":
                    res = lc_info = llama_cpp_decode(gg, prompt, o["tokens"], args.threads) or lc_info
                elif k == "ours_gguf":
                    res = ours(gg, prompt, args.tokens)
                else:
                    res = ours(st, prompt, args.tokens, windows=4)
            if res is None:
                continue
            seg = {"round": r, "kind": k, "foreign": f.share, "samples": res["steps"]}
            if "first_step_s" in res:
                seg["first_step_s"] = res["first_step_s"]
            if k == "ours_gguf":
                seg["same_tokens_as_safetensors"] = res["tokens"] == o["tokens"]
            if k == "llama_cpp":
                seg["greedy_agrees_with_ours"] = res["greedy_tokens"] == o["tokens"]
            segs.append(seg)
        med = {g["kind"]: float(np.median(g["samples"])) for g in segs if g["round"] == r}
        fr = {g["kind"]: g["foreign"] for g in segs if g["round"] == r}
        lc_txt = (f"llama.cpp {1 / med['llama_cpp']:.1f} tok/s [{fr['llama_cpp']:.0%}]" if "llama_cpp" in med
                  else "llama.cpp not installed (pip install -e '.[bench]')")
        print(f"round {r} (others' CPU share before {quiet:.0%}): read {max(med['xla_sum'], med['numpy_threads_sum']) / GB:.1f}"
              f" GB/s [{fr['xla_sum']:.0%}] | ours {1 / med['ours']:.1f} tok/s = {streamed / med['ours'] / GB:.1f} GB/s "
              f"[{fr['ours']:.0%}] | GGUF {1 / med['ours_gguf']:.1f} | 4 windows {1 / med['ours_4win']:.1f} | {lc_txt}"
              "   (medians; [share of the CPUs other processes used meanwhile])", flush=True)

    # A segment counts when other processes used < 10% of the CPUs meanwhile; if an engine has no
    # such segment, all of its segments count and the summary says so.
    def pooled(kind: str) -> tuple[list[float], bool]:
        mine = [g for g in segs if g["kind"] == kind]
        clean = [g for g in mine if g["foreign"] < args.max_foreign]
        return [x for g in (clean or mine) for x in g["samples"]], bool(clean)

    bw_kind = max(("xla_sum", "numpy_threads_sum"), key=lambda k: np.median(pooled(k)[0]))
    bw_samples, bw_clean = pooled(bw_kind)
    stat: dict[str, Any] = {"read_bw": float(np.median(bw_samples)), "read_bw_method": bw_kind,
                            "read_bw_clean": bw_clean}
    for k in engines:
        xs, clean = pooled(k)
        if xs:
            stat[f"{k}_step_s"], stat[f"{k}_clean"] = float(np.median(xs)), clean
            stat[f"{k}_segments"] = sum(g["foreign"] < args.max_foreign for g in segs if g["kind"] == k)
    summary: dict[str, Any] = {
        "command": "python experiments/runtime_decode_bench.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "jax": jax.__version__, "model": spec.name, "weights_bytes": ckpt.nbytes,
        "streamed_bytes_per_token": streamed, "prompt_tokens": args.prompt_tokens, "decode_tokens": args.tokens,
        "rounds": args.rounds, "max_foreign": args.max_foreign,
        "llama_cpp": lc_info["version"] if lc_info else None, "llama_cpp_threads": args.threads,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), **stat,
        "ours_bw": streamed / stat["ours_step_s"], "fraction": streamed / stat["ours_step_s"] / stat["read_bw"],
        "ratio_vs_llama_cpp": stat["llama_cpp_step_s"] / stat["ours_step_s"] if lc_info else None,
        "layouts_bw": layouts, "kernels": kernels, "segments": segs,
    }
    summary["quantised_memory"] = {} if args.skip_quant else quant_memory(spec, args.cache)
    print(f"\nBandwidth achieved: {summary['ours_bw'] / GB:.2f} GB/s = {summary['fraction']:.0%} of the measured "
          f"{summary['read_bw'] / GB:.1f} GB/s read bandwidth; {1 / summary['ours_step_s']:.1f} tok/s"
          + (f"; llama.cpp {1 / summary['llama_cpp_step_s']:.1f} tok/s (ratio {summary['ratio_vs_llama_cpp']:.2f})"
             if lc_info else ""))
    write_results(summary, args.out)
    return 0


def write_results(s: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "runtime_decode_bench.json", s, indent=2)
    with atomic_open(out / "runtime_decode_segments.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["round", "kind", "foreign_cpu_share", "n", "median", "p10", "p90", "unit"])
        for g in s["segments"]:
            x = np.array(g["samples"])
            unit = "bytes/s" if g["kind"] in ("xla_sum", "numpy_threads_sum") else "s/token"
            w.writerow([g["round"], g["kind"], f"{g['foreign']:.3f}", len(x), f"{np.median(x):.6g}",
                        f"{np.percentile(x, 10):.6g}", f"{np.percentile(x, 90):.6g}", unit])
    g = lambda v: f"{v / GB:.2f}"  # noqa: E731

    def tok(k: str) -> str:
        note = "" if s[f"{k}_clean"] else " (no undisturbed segment: all segments)"
        return f"{1 / s[f'{k}_step_s']:.1f} ({s[f'{k}_segments']}/{s['rounds']} segments){note}"

    lines = [
        "# Runtime single-device decode benchmark", "",
        f"`{s['command']}` — {s['date']}, {s['cores']} cores ({s['machine']}), jax {s['jax']}, "
        f"llama-cpp-python {s['llama_cpp'] or 'not installed'}; load average "
        f"{s['loadavg_before'][0]:.1f} before, {s['loadavg_after'][0]:.1f} after.", "",
        f"Model {s['model']} (f32, random weights): {g(s['weights_bytes'])} GB of weights, "
        f"{g(s['streamed_bytes_per_token'])} GB read per decode step (blocks + output layer; the embedding "
        f"contributes one row). Prompt {s['prompt_tokens']} tokens, {s['decode_tokens']} greedy decode steps "
        f"per engine per round, {s['rounds']} rounds, engines interleaved. The machine is shared with other "
        "people's test runs: each measured segment records the share of the CPUs other processes used "
        f"meanwhile, and only segments under {s['max_foreign']:.0%} count (medians over their steps); "
        "runtime_decode_segments.csv has every segment.", "",
        "| metric | value |", "|---|---|",
        f"| memory read bandwidth, same run ({s['read_bw_method']}) | {g(s['read_bw'])} GB/s |",
        f"| ours: Bandwidth achieved | {g(s['ours_bw'])} GB/s |",
        f"| ours: fraction of read bandwidth (target >= 75%) | {s['fraction']:.0%} |",
        f"| ours: tokens/s, safetensors, one window | {tok('ours')} |",
        f"| ours: tokens/s, GGUF F32 | {tok('ours_gguf')} |",
        f"| ours: tokens/s, 4 windows of 4 layers (as a ring device runs) | {tok('ours_4win')} |",
    ]
    if s["llama_cpp"]:
        lines += [f"| llama.cpp: tokens/s, same GGUF F32, {s['llama_cpp_threads']} threads | {tok('llama_cpp')} |",
                  f"| ratio ours / llama.cpp (target >= 1.0) | {s['ratio_vs_llama_cpp']:.2f} |"]
    fr = s["kernels"]["foreign"]
    note = lambda key: f" (others used {fr[key]:.0%} of the CPUs meanwhile)"  # noqa: E731
    lines += ["", "Weight layout and dtype of an FFN-shaped GEMV chain (XLA:CPU, 256 MiB of f32 weights or the same "
              f"elements in f16/bf16/int8), measured once at the start{note('layouts')}:", "",
              "| variant | GB/s of stored weights |", "|---|---|"]
    lines += [f"| {k} | {g(v)} |" for k, v in s["layouts_bw"].items()]
    k = s["kernels"]
    lines += ["", f"GEMV by matrix shape (chained, ~256 MiB each){note('gemv_by_shape')}:", "", "| shape (out x in) | GB/s |", "|---|---|"]
    lines += [f"| {name} | {g(v)} |" for name, v in k["gemv_by_shape"].items()]
    lines += ["", f"FFN chain with B rows (batched decode; XLA:CPU's small-M GEMM){note('ffn_by_rows')}:", "",
              "| rows | GB/s of weights | token-GB/s (rows x weights) |", "|---|---|---|"]
    lines += [f"| {b} | {g(v)} | {g(int(b) * v)} |" for b, v in k["ffn_by_rows"].items()]
    a = k["attention"]
    lines += ["", f"Attention, one query over 1024 cached positions in 16 layers: heads-first cache "
              f"{a['heads_first_s'] * 1e3:.2f} ms [used], positions-first {a['positions_first_s'] * 1e3:.2f} ms "
              f"({a['positions_first_s'] / a['heads_first_s']:.1f}x){note('attention')}."]
    first = [g_["first_step_s"] for g_ in s["segments"] if g_["kind"] == "ours" and "first_step_s" in g_]
    if first:
        lines += ["", f"First decode step of the first round (includes compiling the 16-block decode step): "
                  f"{first[0]:.2f} s; later rounds reuse it ({np.median(first[1:] or first):.3f} s)."]
    if s["quantised_memory"]:
        lines += ["", "Quantised GGUF loaded by the runtime (dequantised to f32 once, in anonymous memory):", "",
                  "| file type | file GB | anonymous f32 GB | x file | load s |", "|---|---|---|---|---|"]
        for q, m in s["quantised_memory"].items():
            lines.append(f"| {q} | {g(m['file_bytes'])} | {g(m['anon_bytes'])} | "
                         f"{m['anon_bytes'] / m['file_bytes']:.2f} | {m['load_s']:.1f} |")
    atomic_write_text(out / "runtime_decode_bench.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
