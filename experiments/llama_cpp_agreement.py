"""Numerics against llama.cpp on the same GGUF files (issue 14 part 3): how long greedy decoding
agrees, how well the logits correlate step by step, and whether every disagreement is a near-tie.

    python experiments/llama_cpp_agreement.py                      # llama-mini-300m: F32, F16, Q8_0, Q4_K_M
    python experiments/llama_cpp_agreement.py --tokens 256 --prompts 4

Files as in runtime_decode_bench.py (same cache): F32, F16, Q8_0 written by
`write_random_checkpoint`, Q4_K_M by llama.cpp's own quantiser from the F32 file. Per prompt:
- free-running greedy: each engine feeds its own choices; tokens agreeing from the start;
- teacher-forced: llama.cpp is fed our greedy tokens, so both see the same context at every step;
  per step the correlation of the two logit vectors, their max abs difference, and, where the
  argmax differs, our top-1 / top-2 margin -- a disagreement the arithmetic allows has a margin
  below the logits' difference.
Both engines quantise activations the same way (Q8_K / Q8_0 with an f16 scale for quantised
weights, f16 for F16 weights); what remains is float summation order (and llama.cpp's F16 KV cache
vs our f32 one). No timing: runs without the measurement lock. Writes
experiments/results/llama_cpp_agreement.{md,json}.

    python experiments/llama_cpp_agreement.py --depth          # where the differences come from

`--depth`: random models of 1, 2, 4 and 8 blocks (hidden 1024) per quantised format, llama.cpp with
an F32 KV cache: the first prompt's logits of both engines. With one block they agree to float
rounding (the arithmetic is the same); each further block amplifies the rare activation whose int8
rounding the summation order flips. Writes experiments/results/llama_cpp_agreement_depth.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime_decode_bench import FORMATS, LlamaCpp, Ours, agree, make_files  # noqa: E402

from primasim.core.io import atomic_write_json, atomic_write_text  # noqa: E402
from primasim.core.model_sources import load_model  # noqa: E402
from primasim.runtime import generate, kernels as K  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def teacher_forced(lc: LlamaCpp, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """llama.cpp's logits after the prompt and after each of `tokens` but the last."""
    lc.llm.reset()
    lc.llm.eval(prompt)
    out = [lc.logits()]
    for t in tokens[:-1]:
        lc.llm.eval([t])
        out.append(lc.logits())
    return out


def compare(ours: list[np.ndarray], theirs: list[np.ndarray]) -> dict[str, Any]:
    corr, diff, flips = [], [], []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        corr.append(float(np.corrcoef(a64, b64)[0, 1]))
        diff.append(float(np.abs(a64 - b64).max()))
        if int(np.argmax(a)) != int(np.argmax(b)):
            top = np.sort(a64)[-2:]
            flips.append({"step": i, "margin": float(top[1] - top[0]), "max_abs_diff": diff[-1],
                          "within_diff": bool(top[1] - top[0] <= diff[-1])})
    return {"corr_min": min(corr), "corr_median": float(np.median(corr)), "max_abs_diff_median": float(np.median(diff)),
            "logit_std": float(np.std(ours[0])), "argmax_differs": len(flips), "steps": len(ours), "flips": flips}


def depth(formats: list[str], out: Path, threads: int) -> None:
    import llama_cpp

    from primasim.core.model import ModelSpec
    from primasim.runtime import load_params, open_checkpoint, write_random_checkpoint

    rows = []
    tmp = Path(os.environ.get("PRIMASIM_CACHE", "/tmp/primasim-bench")) / "depth"
    tmp.mkdir(parents=True, exist_ok=True)
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 4000, 16)]
    for f in formats:
        for n in (1, 2, 4, 8):
            spec = ModelSpec(name=f"depth{n}", family="llama", n_layers=n, hidden=1024, n_heads=16, n_kv_heads=4,
                             head_dim=64, ffn=4096, vocab=4096, quant="f32")
            f32 = tmp / f"depth{n}-f32.gguf"
            if not f32.exists():
                write_random_checkpoint(spec, f32, fmt="gguf", seed=0)
            p = tmp / f"depth{n}-{f}.gguf"
            if not p.exists() and f == "q4_k_m":
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
                assert llama_cpp.llama_model_quantize(str(f32).encode(), str(p).encode(), params) == 0
            elif not p.exists():
                write_random_checkpoint(spec.with_quant(f), p, fmt="gguf", seed=0)
            llm = llama_cpp.Llama(model_path=str(p), n_ctx=64, n_threads=threads, n_batch=16, n_ubatch=16,
                                  type_k=0, type_v=0, verbose=False)  # ggml type 0: an F32 KV cache
            llm.eval(prompt)
            b = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype(np.float64)
            ck = open_checkpoint(p)
            a = generate(load_params(ck, range(n), embed=True, head=True), prompt, 1, keep_logits=True).logits[0]
            a = a.astype(np.float64)
            rows.append((f, n, float(np.corrcoef(a, b)[0, 1]), float(np.abs(a - b).max()), float(a.std())))
            print(f"depth {f} {n} blocks: corr {rows[-1][2]:.9f}, max abs diff {rows[-1][3]:.3g}", flush=True)
    lines = ["# Where our logits and llama.cpp's part: model depth", "",
             f"`python experiments/llama_cpp_agreement.py --depth` — {time.strftime('%Y-%m-%d %H:%M:%S')}; random "
             "models (hidden 1024, ffn 4096, 16 heads / 4 KV heads, vocabulary 4096) of 1-8 blocks, a 16-token "
             f"prompt, the first logits; llama.cpp with an F32 KV cache; kernels `{K.isa()}`.", "",
             "| format | blocks | logits correlation | max abs diff | logit std |", "|---|---|---|---|---|"]
    lines += [f"| {f} | {n} | {c:.9f} | {d:.3g} | {sd:.2f} |" for f, n, c, d, sd in rows]
    atomic_write_text(out / "llama_cpp_agreement_depth.md", "\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-mini-300m")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--tokens", type=int, default=128, help="greedy tokens per prompt")
    ap.add_argument("--prompts", type=int, default=3, help="random prompts (64 tokens each)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp threads")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("PRIMASIM_CACHE", "/tmp/primasim-bench")))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--depth", action="store_true", help="only the depth check (llama_cpp_agreement_depth.md)")
    args = ap.parse_args()
    if args.depth:
        depth([f for f in args.formats.split(",") if f not in ("f32", "f16")], args.out, args.threads)
        return 0
    spec = load_model(args.model)
    formats = args.formats.split(",")
    files = make_files(spec, args.cache, formats)
    prompts = [[int(t) for t in np.random.default_rng(s).integers(3, spec.vocab, 64)] for s in range(args.prompts)]
    res: dict[str, Any] = {}
    for f in formats:
        ours, lc = Ours(files[f]), LlamaCpp(files[f], 64 + args.tokens + 8, 64, args.threads)
        rows = []
        for p in prompts:
            g = generate(ours.params, p, args.tokens, max_seq=len(p) + args.tokens, keep_logits=True)
            o = {"tokens": g.tokens, "all_logits": g.logits}
            free = agree(o["tokens"], lc.greedy(p, args.tokens))
            tf = compare(o["all_logits"], teacher_forced(lc, p, o["tokens"]))
            rows.append({"greedy_agree": free} | tf)
            print(f"{f}: greedy agree {free}/{args.tokens}; teacher-forced argmax differs at {tf['argmax_differs']} "
                  f"steps (margins {[round(x['margin'], 4) for x in tf['flips']]}, all within the logit difference: "
                  f"{all(x['within_diff'] for x in tf['flips'])}); corr min {tf['corr_min']:.6f}", flush=True)
        res[f] = rows
    summary = {"command": "python experiments/llama_cpp_agreement.py " + " ".join(sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": spec.name, "tokens": args.tokens,
               "kernels": K.isa(), "llama_cpp": __import__("llama_cpp").__version__, "formats": res}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "llama_cpp_agreement.json", summary, indent=2)
    lines = ["# Greedy tokens and logits vs llama.cpp on the same GGUF files", "",
             f"`{summary['command']}` — {summary['date']}; {spec.name} (random weights), {len(prompts)} random "
             f"64-token prompts, {args.tokens} greedy tokens each; kernels `{summary['kernels']}`, "
             f"llama-cpp-python {summary['llama_cpp']}. Free-running: each engine feeds its own choices. "
             "Teacher-forced: llama.cpp is fed our tokens; per step the correlation of the logit vectors and, "
             "where the argmax differs, our top-1/top-2 margin against the max abs logit difference of that step.",
             "", "| format | greedy tokens agreeing from the start (per prompt) | logits corr min / median | "
             "max abs diff (median; logit std) | steps with a different argmax | their margins (all <= that step's "
             "difference?) |", "|---|---|---|---|---|---|"]
    for f, rows in res.items():
        flips = [x for r in rows for x in r["flips"]]
        margins = ", ".join(f"{x['margin']:.3g}" for x in flips) or "-"
        lines.append(
            f"| {f} | {', '.join(str(r['greedy_agree']) for r in rows)} of {args.tokens} | "
            f"{min(r['corr_min'] for r in rows):.6f} / {np.median([r['corr_median'] for r in rows]):.6f} | "
            f"{np.median([r['max_abs_diff_median'] for r in rows]):.3g} ({rows[0]['logit_std']:.2f}) | "
            f"{sum(r['argmax_differs'] for r in rows)} of {sum(r['steps'] for r in rows)} | "
            f"{margins} ({'yes' if all(x['within_diff'] for x in flips) else 'no'}) |")
    atomic_write_text(args.out / "llama_cpp_agreement.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
