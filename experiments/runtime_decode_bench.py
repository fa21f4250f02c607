"""Single-device decode and prefill against llama.cpp on the same GGUF files and cores, per weight
format, with the memory read bandwidth measured in the same run.

    python experiments/runtime_decode_bench.py                       # llama-mini-300m: F32, F16, Q8_0, Q4_K_M
    python experiments/runtime_decode_bench.py --rounds 5 --tokens 96 --formats q4_k_m

Files: F32, F16 and Q8_0 GGUF written by `write_random_checkpoint`; Q4_K_M written by llama.cpp's
own quantiser (llama_model_quantize) from the F32 file. Engines, interleaved in every round:
`ours` (in-process `generate`: one jitted call per token), `cluster` (`primasim run --cluster
local --json` as a user runs it: head and one worker process, tpot/ttft from its JSON) and
`llama.cpp` (llama-cpp-python, the same file, --threads cores). Ratios are taken within a round
(the machine is shared); every segment records the share of the CPUs other processes used
meanwhile and `uptime` load is recorded. Bandwidth counts file bytes read per token: every
tensor but the embedding (one row of it is read).

Numerics in the same run: ours vs llama.cpp greedy tokens (how many agree from the start) and the
correlation of the first step's logits. llama.cpp comes from the optional extra `bench`.
Writes experiments/results/runtime_decode_bench.{json,md} and runtime_decode_segments.csv.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import numpy as np

from primasim.core.io import atomic_open, atomic_write_json, atomic_write_text
from primasim.core.model_sources import load_model
from primasim.runtime import (
    generate,
    kernels as K,
    load_params,
    open_checkpoint,
    write_random_checkpoint,
)
from primasim.runtime.kernels import llamacpp
from primasim.runtime.quantize import quantize

GB = 1e9
RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ("f32", "f16", "q8_0", "q4_k_m")


# ---------------------------------------------------------------------------- a shared machine
def _cpu() -> tuple[int, int, int]:
    """(all CPUs' busy jiffies, all jiffies, jiffies of this process and its children)."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    with open("/proc/self/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return sum(v) - v[3] - v[4], sum(v), sum(int(x) for x in f[11:15])


class Foreign:
    """Share of the machine's CPU time other processes used during a `with` block."""

    share = 0.0

    def __enter__(self) -> Foreign:
        self._a = _cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        b = _cpu()
        self.share = max(0.0, ((b[0] - self._a[0]) - (b[2] - self._a[2])) / max(b[1] - self._a[1], 1))


def wait_quiet(limit_s: float, threshold: float = 0.05) -> float:
    deadline = time.monotonic() + limit_s
    while True:
        with Foreign() as f:
            time.sleep(1.0)
        if f.share < threshold or time.monotonic() > deadline:
            return f.share


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 7) -> float:
    """STREAM-like read bandwidth (bytes/s) on all cores: numpy's reduce, one thread per core
    over its half of a 1 GiB array (far beyond the caches); the best of `reps`."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    parts = np.array_split(a, os.cpu_count() or 2)
    best = 0.0
    for _ in range(reps):
        ts = [threading.Thread(target=np.add.reduce, args=(h,)) for h in parts]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        best = max(best, nbytes / (time.perf_counter() - t))
    return best


# ---------------------------------------------------------------------------- files
def make_files(spec: Any, cache: Path, formats: list[str]) -> dict[str, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    f32 = cache / f"{spec.name}-f32.gguf"
    if not f32.exists():
        print(f"writing {f32} ...", flush=True)
        write_random_checkpoint(spec.with_quant("f32"), f32, fmt="gguf", seed=0)
    for f in formats:
        p = cache / f"{spec.name}-{f}.gguf"
        if f == "f32":
            p = f32
        elif not p.exists() and f in ("f16", "q8_0"):
            print(f"writing {p} ...", flush=True)
            write_random_checkpoint(spec.with_quant(f), p, fmt="gguf", seed=0)
        elif not p.exists() and f == "q4_k_m":
            import llama_cpp

            print(f"quantising {p} with llama.cpp ...", flush=True)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
            params.nthread = os.cpu_count() or 2
            if llama_cpp.llama_model_quantize(str(f32).encode(), str(p).encode(), params) != 0:
                raise SystemExit("llama_model_quantize failed")
        out[f] = p
    return out


def streamed_bytes(path: Path) -> int:
    ckpt = open_checkpoint(path)
    return ckpt.nbytes - (0 if ckpt.spec.tie_embeddings else ckpt.infos["token_embd.weight"].nbytes)


def warm(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


# ---------------------------------------------------------------------------- engines
class Ours:
    """The in-process engine: weights loaded once (file-backed, nothing read), compiled on first use."""

    def __init__(self, path: Path, max_seq: int | None = None) -> None:
        self.max_seq = max_seq  # one KV shape for every run: no run compiles (its prefill would carry it)
        self.ckpt = open_checkpoint(path)
        self.params = load_params(self.ckpt, range(self.ckpt.spec.n_layers), embed=True, head=True)

    def run(self, prompt: list[int], n: int) -> dict[str, Any]:
        g = generate(self.params, prompt, n, max_seq=self.max_seq or len(prompt) + n, keep_logits=True)
        return {"tokens": g.tokens, "steps": g.step_s[2:], "prefill_s": g.prefill_s, "logits0": g.logits[0]}


class LlamaCpp:
    def __init__(self, path: Path, n_ctx: int, n_batch: int, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_batch=n_batch, n_ubatch=n_batch, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,)).copy()

    def run(self, prompt: list[int], follow: list[int]) -> dict[str, Any]:
        """Prefill, then decode feeding `follow` (our greedy tokens: both engines do the same work);
        records llama.cpp's own greedy choice at every step."""
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(prompt)
        prefill = time.perf_counter() - t
        lg0 = self.logits()
        own, steps = [int(np.argmax(lg0))], []
        for tok in follow[:-1]:
            t = time.perf_counter()
            self.llm.eval([tok])
            steps.append(time.perf_counter() - t)
            own.append(int(np.argmax(self.logits())))
        return {"tokens": own, "steps": steps[2:], "prefill_s": prefill, "logits0": lg0}

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """llama.cpp's own greedy continuation (each step fed its own choice)."""
        self.llm.reset()
        self.llm.eval(prompt)
        out = [int(np.argmax(self.logits()))]
        while len(out) < n:
            self.llm.eval([out[-1]])
            out.append(int(np.argmax(self.logits())))
        return out


def cluster_run(path: Path, prompt: list[int], n: int) -> dict[str, Any]:
    """`primasim run --cluster local` in a subprocess, as a user runs it."""
    cmd = [sys.executable, "-m", "primasim", "run", "--cluster", "local", "--model", str(path),
           "--prompt-ids", ",".join(map(str, prompt)), "--tokens", str(n), "--ignore-eos", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"primasim run failed: {r.stderr[-2000:]}")
    js = json.loads(r.stdout)
    # the median TPOT, as the other engines' step times are medians (the mean is kept beside it)
    return {"tokens": js.get("token_ids"), "tpot_s": js["tpot_p50_ms"] / 1e3, "tpot_mean_s": js["tpot_ms"] / 1e3,
            "ttft_s": js["ttft_ms"] / 1e3}


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------- kernels alone
def kernel_rates(isa: str, cols: int = 1 << 20) -> dict[str, dict[str, float]]:
    """One core, one long weight row (2**20 elements, L2/L3-resident): bytes/s of our kernel set `isa`
    (B=1, 4, 8 tokens); activations prepared once. (llama.cpp's ggml_vec_dot through ctypes cannot be
    timed alike: llamacpp.vec_dot quantises the activations in NumPy on every call.)"""
    with K.use_isa(isa):
        return _kernel_rates(cols)


@contextmanager
def variant(engine: str) -> Iterator[None]:
    """The in-process engine `engine` runs as: ours (defaults), ours_pool-<name> (another thread
    pool), ours_<isa> (another kernel set)."""
    if engine == "ours":
        yield
        return
    name = engine[5:]
    with K.use_pool(name[5:]) if name.startswith("pool-") else K.use_isa(name):
        yield


def _kernel_rates(cols: int) -> dict[str, dict[str, float]]:
    lib = K.library()
    lib.primasim_qk_rowdot.restype = ctypes.c_double
    lib.primasim_qk_rowdot.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                       ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, cols)).astype(np.float32)
    out: dict[str, dict[str, float]] = {}
    for t in ("F32", "F16", "Q8_0", "Q4_K", "Q6_K", "Q5_K", "Q4_0", "Q5_0"):
        w = quantize(rng.standard_normal((1, cols)).astype(np.float32), t)[0]
        res = np.zeros(8, np.float32)
        r: dict[str, float] = {}
        for nt in (1, 4, 8):
            per = lib.primasim_qk_rowdot(K.TYPE_IDS[t], w.ctypes.data, cols, x.ctypes.data, nt, 40, res.ctypes.data)
            r[f"ours_B{nt}"] = nt * w.nbytes / per
        out[t] = r
        print(f"  {t:5s} ours {r['ours_B1'] / GB:5.1f} GB/s (B=4 {r['ours_B4'] / GB:5.1f}, B=8 {r['ours_B8'] / GB:5.1f} "
              f"token-GB/s)", flush=True)
    return out


def _timed(f: Any) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


# ---------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-mini-300m")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per engine per round")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--agree-tokens", type=int, default=64, help="greedy tokens compared with llama.cpp's")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default=f"{os.cpu_count() or 2},1",
                    help="llama.cpp thread counts, comma-separated: each is an engine; the first is `llama_cpp`, the "
                         "ratios are also taken against the fastest of them in each round (on a loaded host one "
                         "thread beats two: its OpenMP barriers wait for a descheduled thread)")
    ap.add_argument("--isas", default=None,
                    help="kernel sets also timed in-process, as engines ours_<isa> (default: every set this CPU "
                         "has but scalar and the default)")
    ap.add_argument("--pools", default="xla",
                    help="thread pools also timed in-process besides the default (the library's own workers), as "
                         "engines ours_pool-<name>: 'xla' = XLA's intra-op pool ('' for none)")
    ap.add_argument("--skip-cluster", action="store_true", help="skip `primasim run --cluster local`")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("PRIMASIM_CACHE", "/tmp/primasim-bench")))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="seconds to wait for a quiet machine per round")
    ap.add_argument("--max-foreign", type=float, default=0.10,
                    help="a segment counts if other processes used less than this share of the CPUs")
    args = ap.parse_args()
    if not llamacpp.available():
        raise SystemExit("needs llama-cpp-python: pip install -e '.[bench]'")

    spec = load_model(args.model)
    formats = args.formats.split(",")
    files = make_files(spec, args.cache, formats)
    for p in files.values():
        warm(p)
    streamed = {f: streamed_bytes(p) for f, p in files.items()}
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, spec.vocab, args.prompt_tokens)]
    n_ctx = args.prompt_tokens + max(args.tokens, args.agree_tokens) + 8
    print(f"{spec.name}; {os.cpu_count()} cores; jax {jax.__version__}; kernels {K.isa()}; llama-cpp-python "
          f"{__import__('llama_cpp').__version__}", flush=True)
    for f in formats:
        print(f"  {f}: {files[f].stat().st_size / GB:.3f} GB file, {streamed[f] / GB:.3f} GB read per token", flush=True)

    threads = [int(t) for t in str(args.threads).split(",")]
    isas = ([i for i in K.isas() if i not in ("scalar", K.isa())] if args.isas is None
            else [i for i in args.isas.split(",") if i])
    pools = [p for p in args.pools.split(",") if p]
    print("kernels alone (one core):", flush=True)
    rates = {isa: kernel_rates(isa) for isa in [K.isa(), *isas]}
    ours = {f: Ours(files[f], n_ctx) for f in formats}
    llama = {f: {t: LlamaCpp(files[f], n_ctx, args.prompt_tokens, t) for t in threads} for f in formats}
    numerics: dict[str, Any] = {}
    for f in formats:  # compile, and the numerics (once: they do not depend on timing)
        o = ours[f].run(prompt, args.agree_tokens)
        ref = llama[f][threads[0]]
        theirs = ref.greedy(prompt, args.agree_tokens)
        lc = ref.run(prompt, o["tokens"][:2])["logits0"]
        for isa in isas:  # compile (the executable is shared; the kernel set is chosen per call)
            with K.use_isa(isa):
                ours[f].run(prompt, 4)
        numerics[f] = {"greedy_agree": agree(o["tokens"], theirs), "compared": args.agree_tokens,
                       "logits_corr": float(np.corrcoef(o["logits0"], lc)[0, 1]),
                       "logits_max_abs_diff": float(np.abs(o["logits0"] - lc).max()),
                       "logits_std": float(np.std(lc))}
        print(f"  {f}: greedy tokens agree for {numerics[f]['greedy_agree']}/{args.agree_tokens}, first-step logits "
              f"corr {numerics[f]['logits_corr']:.6f}", flush=True)

    load_before = os.getloadavg()
    segs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        quiet = wait_quiet(args.quiet_wait)
        with Foreign() as fr:
            bw = read_bandwidth()
        segs.append({"round": r, "format": "-", "engine": "read_bw", "foreign": fr.share, "value": bw})
        line = [f"round {r} (others {quiet:.0%} before): read {bw / GB:.1f} GB/s"]
        for f in formats:
            order = ["ours", *(f"ours_{i}" for i in isas), *(f"ours_pool-{p}" for p in pools)]
            order = order if r % 2 == 0 else order[::-1]  # which kernel set runs first alternates
            msg = f"{f}:"
            for e in order:
                with Foreign() as fr, variant(e):
                    res = ours[f].run(prompt, args.tokens)
                if e == "ours":
                    o = res
                segs.append({"round": r, "format": f, "engine": e, "foreign": fr.share, "step_s": float(np.median(
                    res["steps"])), "prefill_s": res["prefill_s"], "samples": res["steps"]})
                msg += f" {e} {1 / segs[-1]['step_s']:.1f} tok/s [{fr.share:.0%}]"
            for t in threads:
                e = "llama_cpp" if t == threads[0] else f"llama_cpp_t{t}"
                with Foreign() as fr:
                    lc = llama[f][t].run(prompt, o["tokens"])
                segs.append({"round": r, "format": f, "engine": e, "foreign": fr.share, "threads": t,
                             "step_s": float(np.median(lc["steps"])), "prefill_s": lc["prefill_s"],
                             "samples": lc["steps"]})
                msg += f" {e} {1 / segs[-1]['step_s']:.1f} [{fr.share:.0%}]"
            if not args.skip_cluster:
                with Foreign() as fr:
                    c = cluster_run(files[f], prompt, args.tokens)
                segs.append({"round": r, "format": f, "engine": "cluster", "foreign": fr.share, "step_s": c["tpot_s"],
                             "prefill_s": c["ttft_s"], "same_tokens": c["tokens"] == o["tokens"]})
                segs.append({"round": r, "format": f, "engine": "cluster_mean", "foreign": fr.share,
                             "step_s": c["tpot_mean_s"], "prefill_s": c["ttft_s"]})
                msg += f" cluster {1 / c['tpot_s']:.1f} [{fr.share:.0%}]"
            line.append(msg)
        print(" | ".join(line), flush=True)

    summary = summarise(args, spec, formats, files, streamed, segs, numerics, rates, load_before)
    write_results(summary, args.out)
    return 0


def best_llama(segs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round and format, the fastest llama.cpp thread count (decode and prefill separately)."""
    out: dict[tuple[int, str], dict[str, Any]] = {}
    for g in segs:
        if g["engine"].startswith("llama_cpp"):
            b = out.setdefault((g["round"], g["format"]), {"round": g["round"], "format": g["format"],
                                                          "engine": "llama_best", "foreign": g["foreign"],
                                                          "step_s": g["step_s"], "prefill_s": g["prefill_s"]})
            b["step_s"], b["prefill_s"] = min(b["step_s"], g["step_s"]), min(b["prefill_s"], g["prefill_s"])
            b["foreign"] = max(b["foreign"], g["foreign"])
    return list(out.values())


def summarise(args: Any, spec: Any, formats: list[str], files: dict[str, Path], streamed: dict[str, int],
              segs: list[dict[str, Any]], numerics: dict[str, Any], rates: dict[str, Any],
              load_before: tuple[float, float, float]) -> dict[str, Any]:
    def clean(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ok = [g for g in rows if g["foreign"] < args.max_foreign]
        return ok or rows

    per: dict[str, Any] = {}
    bw_rounds = {g["round"]: g["value"] for g in segs if g["engine"] == "read_bw"}
    segs = segs + best_llama(segs)
    for f in formats:
        d: dict[str, Any] = {"file_bytes": files[f].stat().st_size, "streamed_bytes": streamed[f]}
        engines = list(dict.fromkeys(g["engine"] for g in segs if g["format"] == f))
        for e in engines:
            rows = clean([g for g in segs if g["format"] == f and g["engine"] == e])
            d[e] = {"step_s": float(np.median([g["step_s"] for g in rows])),
                    "prefill_s": float(np.median([g["prefill_s"] for g in rows])),
                    "rounds": [g["round"] for g in rows]}
            d[e]["tok_s"] = 1 / d[e]["step_s"]
            d[e]["bw"] = streamed[f] / d[e]["step_s"]
            # bandwidth fraction within each round, then the median over rounds
            d[e]["bw_fraction"] = float(np.median([streamed[f] / g["step_s"] / bw_rounds[g["round"]] for g in rows]))
            d[e]["prefill_tok_s"] = args.prompt_tokens / d[e]["prefill_s"]

        def ratio(a_eng: str, b_eng: str, key: str = "step_s", f: str = f) -> float:
            """b / a within each round (a faster -> > 1), the median over rounds."""
            pairs = [(a[key], b[key]) for a in segs for b in segs if a["format"] == f == b["format"]
                     and a["engine"] == a_eng and b["engine"] == b_eng and a["round"] == b["round"]]
            return float(np.median([lb / la for la, lb in pairs])) if pairs else float("nan")

        for e in engines:
            if e.startswith("ours") or e.startswith("cluster"):
                d[f"{e}_vs_llama_cpp"] = ratio(e, "llama_cpp")
                d[f"{e}_vs_llama_best"] = ratio(e, "llama_best")
            if e.startswith("ours_"):
                d[f"{e}_vs_ours"] = ratio(e, "ours")
        d["prefill_vs_llama_cpp"] = ratio("ours", "llama_cpp", "prefill_s")
        d["prefill_vs_llama_best"] = ratio("ours", "llama_best", "prefill_s")
        if not args.skip_cluster:  # what the head <-> worker hop costs per token beyond the in-process step
            d["cluster_overhead_fraction"] = 1 - d["ours"]["step_s"] / d["cluster"]["step_s"]
            d["cluster_same_tokens"] = all(g.get("same_tokens") for g in segs if g["format"] == f and g["engine"] == "cluster")
        d["numerics"] = numerics[f]
        per[f] = d
    import llama_cpp

    return {
        "command": "python experiments/runtime_decode_bench.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "jax": jax.__version__, "kernels": K.isa(), "llama_cpp": llama_cpp.__version__,
        "llama_cpp_threads": args.threads, "model": spec.name, "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.tokens, "rounds": args.rounds, "max_foreign": args.max_foreign,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "read_bw": float(np.median(list(bw_rounds.values()))), "formats": per, "kernel_rates": rates,
        "segments": [{k: v for k, v in g.items() if k != "samples"} for g in segs],
    }


def write_results(s: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "runtime_decode_bench.json", s, indent=2)
    with atomic_open(out / "runtime_decode_segments.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["round", "format", "engine", "foreign_cpu_share", "step_s_or_bytes_per_s", "prefill_s"])
        for g in s["segments"]:
            w.writerow([g["round"], g["format"], g["engine"], f"{g['foreign']:.3f}",
                        f"{g.get('step_s', g.get('value')):.6g}", f"{g.get('prefill_s', float('nan')):.6g}"])
    g = lambda v: f"{v / GB:.1f}"  # noqa: E731
    lines = [
        "# Single-device decode and prefill vs llama.cpp, per weight format", "",
        f"`{s['command']}` — {s['date']}, {s['cores']} cores ({s['machine']}), jax {s['jax']}, kernels "
        f"`{s['kernels']}`, llama-cpp-python {s['llama_cpp']} ({s['llama_cpp_threads']} threads); load average "
        f"{s['loadavg_before'][0]:.1f} before, {s['loadavg_after'][0]:.1f} after. Model {s['model']} (random "
        f"weights), prompt {s['prompt_tokens']} tokens, {s['decode_tokens']} decode steps per engine per round, "
        f"{s['rounds']} rounds, engines interleaved; ratios are taken within a round (median over rounds); "
        f"memory read bandwidth of the same rounds: {g(s['read_bw'])} GB/s (median).", "",
        "Decode (tokens/s; ratios > 1: ours faster). `cluster` is `primasim run --cluster local` (head + one "
        "worker process, what users run; the median TPOT from its JSON, as every engine's step time here is a "
        "median; its mean TPOT is listed below the table), `ours` the in-process engine, `llama.cpp` "
        "llama-cpp-python on the same file with the first thread count, `best` the faster of its thread counts in "
        "each round. Bandwidth = file bytes read per token / step time, as a share of the read bandwidth "
        "measured in the same round.", "",
        "| format | file GB | read/token GB | cluster tok/s | ours tok/s | llama.cpp tok/s (threads) | "
        "**cluster / best llama.cpp** | cluster / llama.cpp | ours / best llama.cpp | cluster GB/s (% of read bw) | "
        "ours % of read bw | prefill tok/s ours / best llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f, d in s["formats"].items():
        o, c = d["ours"], d.get("cluster")
        lcs = ", ".join(f"{d[e]['tok_s']:.1f} ({e[10:] or 't' + str(s['llama_cpp_threads']).split(',')[0]})" for e in d if e.startswith("llama_cpp") and
                        isinstance(d[e], dict))
        best = d["llama_best"]
        lines.append(
            f"| {f} | {d['file_bytes'] / GB:.3f} | {d['streamed_bytes'] / GB:.3f} | "
            + (f"{c['tok_s']:.1f} | " if c else "- | ")
            + f"{o['tok_s']:.1f} | {lcs} | "
            + (f"**{d['cluster_vs_llama_best']:.2f}** | {d['cluster_vs_llama_cpp']:.2f} | " if c else "- | - | ")
            + f"{d['ours_vs_llama_best']:.2f} | "
            + (f"{g(c['bw'])} ({c['bw_fraction']:.0%}) | " if c else "- | ")
            + f"{o['bw_fraction']:.0%} | {o['prefill_tok_s']:.0f} / {best['prefill_tok_s']:.0f} "
              f"({d['prefill_vs_llama_best']:.2f}) |")
    means = [f"{f} {d['cluster_mean']['tok_s']:.1f} tok/s ({d['cluster_mean_vs_llama_best']:.2f}x best llama.cpp)"
             for f, d in s["formats"].items() if isinstance(d.get("cluster_mean"), dict)]
    if means:
        lines += ["", "`cluster` from its mean TPOT instead: " + ", ".join(means) + "."]
    isa_rows = [(f, e, d[e]["tok_s"], d[f"{e}_vs_ours"], d[e]["prefill_tok_s"] / o["prefill_tok_s"])
                for f, d in s["formats"].items() for e in d if e.startswith("ours_") and isinstance(d[e], dict)
                for o in [d["ours"]]]
    if isa_rows:
        lines += ["", f"Variants in-process: other kernel sets (the default is `{s['kernels']}`) and `pool-xla`, the rows "
                  "handed to XLA's intra-op pool instead of the library's own workers (same rounds, order alternating):",
                  "", "| format | variant | decode tok/s | decode vs default | prefill vs default |", "|---|---|---|---|---|"]
        lines += [f"| {f} | {e[5:]} | {t:.1f} | {r:.2f} | {p:.2f} |" for f, e, t, r, p in isa_rows]
    lines += ["", "llama.cpp's own bandwidth: " + ", ".join(
        f"{f} {g(d['llama_cpp']['bw'])} GB/s ({d['llama_cpp']['bw_fraction']:.0%})" for f, d in s["formats"].items()) + ".",
        "", "Numerics against llama.cpp on the same file (greedy decoding from the same prompt; our kernels quantise "
        "the activations as llama.cpp does: Q8_K / Q8_0 with an f16 scale, f16 for F16 weights):", "",
        "| format | greedy tokens agreeing from the start | first-step logits correlation | max abs diff (logit std) |",
        "|---|---|---|---|"]
    for f, d in s["formats"].items():
        n = d["numerics"]
        lines.append(f"| {f} | {n['greedy_agree']} / {n['compared']} | {n['logits_corr']:.6f} | "
                     f"{n['logits_max_abs_diff']:.2e} ({n['logits_std']:.2f}) |")
    lines += ["", "Kernels alone, one core, one weight row of 2^20 elements (L2/L3-resident), bytes of weights per "
              "second; B = tokens per call (token-GB/s = tokens x bytes / s):", "",
              "| kernel set | type | ours B=1 | ours B=4 | ours B=8 |", "|---|---|---|---|---|"]
    for isa, rates in s["kernel_rates"].items():
        for t, r in rates.items():
            lines.append(f"| {isa} | {t} | {g(r['ours_B1'])} | {g(r['ours_B4'])} | {g(r['ours_B8'])} |")
    atomic_write_text(out / "runtime_decode_bench.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
