"""Our tokenizers (runtime/tokenizer.py) against llama.cpp's on the same GGUF files.

No real vocabularies can be downloaded here, so each style is trained the way the real one was
(runtime/vocabularies.py: byte-level BPE with Llama 3's / Qwen2's / GPT-2's split regex and special
tokens; SentencePiece BPE with byte fallback as Llama 2's, and a unigram SentencePiece model) on
this Python's standard library plus synthetic multilingual text, written into a GGUF file as
convert_hf_to_gguf.py writes it, and loaded by both tokenizers (llama.cpp: `vocab_only=True`).

Compared, per vocabulary (runtime/tokenizer_check.py):
- token ids on a corpus none of them was trained on (edge cases, held-out standard-library files
  split into paragraphs, synthetic multilingual lines of another seed), with special-token texts as
  text and parsed; on random strings over tricky character pools (assigned code points), and on
  random strings over all code points (where Unicode table versions differ);
- the piece of every token id (llama_token_to_piece, special off and on);
- decoded text against llama.cpp's three decoders (see runtime/tokenizer_check.py);
- every other split rule (tokenizer.ggml.pre) on the Llama 3-style vocabulary, relabelled;
- encode speed, ours / llama.cpp's, in one run (engines interleaved, median of rounds).

    python experiments/tokenizer_vs_llamacpp.py              # writes results/tokenizer_vs_llamacpp.{json,md}
    python experiments/tokenizer_vs_llamacpp.py --quick      # small vocabularies, a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from primasim.core.io import atomic_write_json, atomic_write_text
from primasim.runtime.tokenizer import load_tokenizer
from primasim.runtime.tokenizer_check import LlamaCppVocab, compare, corpus, random_texts
from primasim.runtime.vocabularies import STYLES, train_vocabulary, write_vocab_gguf

OUT = Path(__file__).resolve().parent / "results"
PRE_NAMES = ("default", "gpt-2", "qwen2", "starcoder", "falcon", "deepseek-llm", "deepseek-coder", "deepseek-v3",
             "dbrx", "smollm", "mpt", "stablelm2")


def _speed(tok: Any, ref: LlamaCppVocab, texts: list[str], rounds: int) -> dict[str, float]:
    ours, theirs = [], []
    for _ in range(rounds):  # interleaved: both see the same machine load
        t = time.perf_counter()
        n = sum(len(tok.encode(x)) for x in texts)
        ours.append(n / (time.perf_counter() - t))
        t = time.perf_counter()
        sum(len(ref.tokenize(x)) for x in texts)
        theirs.append(n / (time.perf_counter() - t))
    o, r = statistics.median(ours), statistics.median(theirs)
    return {"ours_tok_s": o, "llama_cpp_tok_s": r, "ratio": o / r}


_FRESH = """
import json, sys
from primasim.runtime.tokenizer_check import LlamaCppVocab
ref = LlamaCppVocab(sys.argv[1])
print(json.dumps([ref.tokenize(t) for t in json.load(sys.stdin)]))
"""


def _fresh_llama_cpp(path: Path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's ids for `texts` from a new process: its std::regex-based split rules (those
    without a hand-written splitter, e.g. deepseek-llm/coder) were seen to change within a long-lived
    process, so every disagreement is re-checked this way."""
    out = subprocess.run([sys.executable, "-c", _FRESH, str(path)], input=json.dumps(texts), capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def run(size: int, corpus_bytes: int, n_random: int, held_out: int, synthetic: int, rounds: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tokcmp-"))
    texts = list(corpus(held_out_bytes=held_out, synthetic=synthetic))
    rnd = list(random_texts(n_random, seed=1))
    rnd_all = list(random_texts(n_random, seed=2, unassigned=True))
    results: dict[str, Any] = {"size": size, "corpus_bytes": corpus_bytes, "texts": len(texts),
                               "text_bytes": sum(len(t.encode()) for t in texts), "random": n_random,
                               "load_before": os.getloadavg(), "styles": {}, "split_rules": {}}
    vocabs = {}
    for style in STYLES:
        t0 = time.perf_counter()
        v = train_vocabulary(style, size, seed=0, corpus_bytes=corpus_bytes)
        vocabs[style] = v
        path = write_vocab_gguf(work / f"{style}.gguf", v)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tok = load_tokenizer(path)
        load_s = time.perf_counter() - t0
        ref = LlamaCppVocab(path)
        assert tok is not None
        a = compare(tok, ref, texts).as_dict()
        a["random_ok"] = sum(tok.encode(x) == ref.tokenize(x) for x in rnd)
        a["random_all_codepoints_ok"] = sum(tok.encode(x) == ref.tokenize(x) for x in rnd_all)
        a["random_all_codepoints_diff_examples"] = [x for x in rnd_all if tok.encode(x) != ref.tokenize(x)][:3]
        a.update(_speed(tok, ref, texts, rounds), pre=v.pre, model=v.model, train_s=train_s, load_s=load_s)
        results["styles"][style] = a
        ref.close()
        print(f"{style}: tokenize {a['tokenize_pct']:.3f}%  pieces {a['pieces_pct']:.3f}%  "
              f"random {a['random_ok']}/{n_random}  all-codepoints {a['random_all_codepoints_ok']}/{n_random}  "
              f"speed x{a['ratio']:.2f}", file=sys.stderr)
    for pre in PRE_NAMES:
        path = write_vocab_gguf(work / f"pre-{pre}.gguf", dataclasses.replace(vocabs["llama3"], pre=pre))
        tok, ref = load_tokenizer(path), LlamaCppVocab(path)
        assert tok is not None
        both = texts + rnd
        a = compare(tok, ref, both, pieces=False)
        bad = [t for t in both if tok.encode(t) != ref.tokenize(t)]
        fresh = _fresh_llama_cpp(path, bad) if bad else []
        results["split_rules"][pre] = {"texts": a.texts, "tokenize": a.tokenize, "tokenize_special": a.tokenize_special,
                                       "examples": a.examples, "differ_now": len(bad),
                                       "agree_in_fresh_process": sum(tok.encode(t) == f for t, f in zip(bad, fresh))}
        ref.close()
        print(f"pre {pre}: {a.tokenize}/{a.texts}", file=sys.stderr)
    results["load_after"] = os.getloadavg()
    return results


def markdown(r: dict[str, Any], cmd: str) -> str:
    lines = [
        "# Tokenizers: ours vs llama.cpp on the same GGUF files", "",
        f"`{cmd}` (llama-cpp-python {_llama_version()}, tokenizers {_tok_version()}); "
        f"load average {r['load_before'][0]:.1f} before, {r['load_after'][0]:.1f} after.", "",
        f"Vocabularies of ~{r['size']} tokens trained on {r['corpus_bytes'] / 1e6:.1f} MB of the Python standard "
        f"library plus synthetic multilingual text (runtime/vocabularies.py). Corpus compared: {r['texts']} texts, "
        f"{r['text_bytes'] / 1e6:.2f} MB (edge cases, held-out standard-library paragraphs, synthetic lines of "
        f"another seed); {r['random']} random strings over tricky character pools.", "",
        "| vocabulary | GGUF model / pre | tokens | ids equal | ids equal, specials parsed | random strings | "
        "random, any code point | pieces equal (all ids) | decode = pieces | = Llama.detokenize | "
        "= llama_detokenize | encode speed ours/llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for style, a in r["styles"].items():
        lines.append(
            f"| {style} | {a['model']} / {a['pre'] or '-'} | {a['vocab']} | {a['tokenize_pct']:.2f} % "
            f"({a['tokenize']}/{a['texts']}) | {a['tokenize_special_pct']:.2f} % | {a['random_ok']}/{r['random']} | "
            f"{a['random_all_codepoints_ok']}/{r['random']} | {a['pieces_pct']:.2f} % | {a['decode_pieces_pct']:.2f} % | "
            f"{a['decode_py_pct']:.2f} % | {a['decode_c_pct']:.2f} % | {a['ratio']:.2f} "
            f"({a['ours_tok_s'] / 1e3:.0f}k vs {a['llama_cpp_tok_s'] / 1e3:.0f}k tok/s) |")
    lines += ["", "Split rules (`tokenizer.ggml.pre`) on the Llama 3-style vocabulary, corpus + random strings "
              "(differences re-checked against llama.cpp in a fresh process):", "",
              "| pre | ids equal | specials parsed | of the differences, equal in a fresh llama.cpp process |",
              "|---|---|---|---|"]
    for pre, a in r["split_rules"].items():
        lines.append(f"| {pre} | {a['tokenize']}/{a['texts']} | {a['tokenize_special']}/{a['texts']} | "
                     f"{a['agree_in_fresh_process']}/{a['differ_now']} |")
    diffs = {s: a["random_all_codepoints_diff_examples"] for s, a in r["styles"].items()
             if a["random_all_codepoints_diff_examples"]}
    lines += [
        "", "Notes:",
        "- Decoding: our `decode` is llama.cpp's pieces concatenated (what its CLI streams), minus the "
        "SentencePiece prefix space at the start of a text. `Llama.detokenize` (llama-cpp-python) also drops a "
        "leading space after BOS in byte-level vocabularies (' lead' -> 'lead'); `llama_detokenize` (C) also "
        "rewrites ' .', ' ,', \" 's\" in BPE vocabularies (clean_spaces) and keeps the SentencePiece prefix "
        "space after a BOS. The columns count texts where those differences do not show.",
        "- Random strings over any code point: differences come from code points unassigned in Python 3.11's "
        "Unicode 14 database that the two Unicode tables classify differently (llama.cpp's table vs "
        "Oniguruma's, used by `tokenizers`); examples in the JSON." if diffs else
        "- Random strings over any code point: no difference.",
    ]
    return "\n".join(lines) + "\n"


def _llama_version() -> str:
    import llama_cpp

    return str(getattr(llama_cpp, "__version__", "?"))


def _tok_version() -> str:
    import tokenizers

    return str(tokenizers.__version__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=32000, help="vocabulary size (default 32000, Llama 2's)")
    ap.add_argument("--corpus-bytes", type=int, default=3_000_000, help="standard-library text to train on")
    ap.add_argument("--random", type=int, default=5000, help="random strings per vocabulary")
    ap.add_argument("--rounds", type=int, default=3, help="speed rounds (median)")
    ap.add_argument("--quick", action="store_true", help="4000-token vocabularies and a small corpus")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    if a.quick:
        r = run(4000, 600_000, 500, 100_000, 300, 1)
    else:
        r = run(a.size, a.corpus_bytes, a.random, 1_000_000, 3000, a.rounds)
    cmd = "python experiments/tokenizer_vs_llamacpp.py" + (" --quick" if a.quick else "")
    name = "tokenizer_vs_llamacpp" + ("_quick" if a.quick else "")
    atomic_write_json(a.out / f"{name}.json", r)
    atomic_write_text(a.out / f"{name}.md", markdown(r, cmd))
    print(markdown(r, cmd))


if __name__ == "__main__":
    main()
