"""Our tokenizer against llama.cpp's on the same GGUF file (llama-cpp-python, optional).

`LlamaCppVocab` loads only the vocabulary (`vocab_only=True`) and calls llama.cpp's C API:
`llama_tokenize`, `llama_token_to_piece`, `llama_detokenize`. `compare` runs a corpus through both
and counts agreements; tests/test_tokenizer_llamacpp.py and experiments/tokenizer_vs_llamacpp.py
use it.

Decoding is compared three ways, because llama.cpp itself decodes three ways:
- pieces: the concatenation of `llama_token_to_piece` (what llama.cpp's CLI streams), with the
  SentencePiece leading space dropped at the start of a text, which is what `Tokenizer.decode` does;
- `Llama.detokenize` (llama-cpp-python): pieces, minus one leading space after a BOS (any vocabulary);
- `llama_detokenize` (C): for BPE vocabularies also "cleans" spaces (" ." -> ".", " 's" -> "'s"),
  and for SentencePiece keeps the leading space when the text starts with BOS.
"""

from __future__ import annotations

import ctypes
import random
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .tokenizer import Tokenizer
from .vocabularies import stdlib_texts, synthetic_texts

# Hand-picked edge cases: whitespace runs, digits, code, scripts, emoji sequences, combining marks,
# special-token strings, contractions, control characters, SentencePiece's own markers.
EDGE_TEXTS = [
    "", " ", "  ", "\n", "\n\n\n", "\t\t", " \n \n", "Hello", " Hello", "Hello world", "   leading", "trailing   ",
    "a  b   c    d", "1234567890", "3.14159 2.71828 1e-10 -42", "x=1;y=22;z=333;w=4444",
    "def f(x):\n    return x ** 2\n", "if (a && b) { return c; }", "日本語のテキスト", "中文文本测试", "한국어 텍스트",
    "😀👍🏽👨‍👩‍👧‍👦🏳️‍🌈🇫🇷", "café naïve résumé Ærøskøbing", "e\u0301 a\u0308", "Ελληνικά κείμενο", "Русский текст",
    "<|eot_id|>", "<s>", "</s>", "<|im_start|>user\nhi<|im_end|>", "<|begin_of_text|>Hi", "<|user|> hi <|assistant|>",
    "<tool_call>{\"a\": 1}</tool_call>", "I'm you're it's we'll they'd I've He'S", "don't  ' s", "  '  ", "\r\n\r\n",
    "\u2581x", "\x00\x01\x7f", "<0x0A>", "hello . world , yes ?", "\u00a0\u2003\u3000 spaces", "\U0001D11E\U0002A6B2",
]
_POOLS = [" \t\n\r\u00a0\u2003\u3000\u2028\u0085\x0b\x0c", "abcXYZ'sSdtTmMlLrReEvV", "0123456789٠١٢३४५①²½",
          ".,;:!?()[]{}<>|~^$+=-_/\\\"'`@#%&*", "éüñçßøÆŒİıſK", "日本語中文한국어ひらがなカタカナ",
          "😀👍🏽👨‍👩‍👧‍👦🏳️‍🌈🇫🇷\u200d\ufe0f", "\u0301\u0308\u093f\u094d", "αβγабв", "\u2581"]


def corpus(*, held_out_bytes: int = 300_000, synthetic: int = 1500, seed: int = 99) -> Iterator[str]:
    """Texts to compare on: the edge cases, paragraphs of standard-library files no vocabulary was
    trained on, and synthetic multilingual lines of a seed no vocabulary was trained with."""
    yield from EDGE_TEXTS
    for text in stdlib_texts(held_out=True, limit_bytes=held_out_bytes):
        yield from (p for p in text.split("\n\n") if p.strip())
    yield from synthetic_texts(seed, synthetic)


def random_texts(n: int, seed: int = 0, *, unassigned: bool = False) -> Iterator[str]:
    """Random strings over character pools that stress pre-tokenizers (spaces of every kind, digits of
    other scripts, punctuation, letters that case-fold oddly, combining marks), plus any code point
    assigned in Python's Unicode database (`unassigned=True`: any code point at all; llama.cpp's
    and Oniguruma's Unicode tables differ on letters assigned recently, e.g. U+16D40.. in 16.0)."""
    rng = random.Random(seed)
    for _ in range(n):
        out: list[str] = []
        k = rng.randint(0, 40)
        while len(out) < k:
            c = chr(rng.randint(1, 0x2FFFF)) if rng.random() < 0.03 else rng.choice(rng.choice(_POOLS))
            if unicodedata.category(c) != "Cs" and (unassigned or unicodedata.category(c) != "Cn"):
                out.append(c)
        yield "".join(out)


class LlamaCppVocab:
    """llama.cpp's tokenizer for a GGUF file, through llama-cpp-python's C bindings."""

    def __init__(self, path: str | Path) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._buf = ctypes.create_string_buffer(1 << 16)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=add_special, special=parse_special))

    def piece(self, i: int, *, special: bool = False) -> bytes:
        n = self.lib.llama_token_to_piece(self.vocab, i, self._buf, len(self._buf), 0, special)
        return self._buf.raw[:n]

    def detokenize_py(self, ids: list[int]) -> bytes:
        return bytes(self.llm.detokenize(ids))

    def detokenize_c(self, ids: list[int], *, remove_special: bool = True) -> bytes:
        arr = (self.lib.llama_token * max(1, len(ids)))(*ids)
        n = self.lib.llama_detokenize(self.vocab, arr, len(ids), self._buf, len(self._buf), remove_special, False)
        return self._buf.raw[:n] if n >= 0 else b"<overflow>"

    def n_vocab(self) -> int:
        return int(self.lib.llama_vocab_n_tokens(self.vocab))

    def close(self) -> None:
        self.llm.close()


@dataclass
class Agreement:
    texts: int = 0
    text_bytes: int = 0
    tokens: int = 0
    tokenize: int = 0            # texts whose ids are identical (add BOS, specials as text)
    tokenize_special: int = 0    # ... with special-token texts parsed
    decode_pieces: int = 0       # our decode == llama.cpp's concatenated pieces
    decode_py: int = 0           # == Llama.detokenize
    decode_c: int = 0            # == llama_detokenize(remove_special=True)
    vocab: int = 0
    pieces: int = 0              # ids whose piece is identical (special=False and special=True)
    examples: list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("tokenize", "tokenize_special", "decode_pieces", "decode_py", "decode_c"):
            d[f"{k}_pct"] = 100.0 * getattr(self, k) / max(self.texts, 1)
        d["pieces_pct"] = 100.0 * self.pieces / max(self.vocab, 1)
        return d


def compare(tok: Tokenizer, ref: LlamaCppVocab, texts: Iterable[str], *, pieces: bool = True,
            max_examples: int = 5) -> Agreement:
    a = Agreement(examples=[])
    assert a.examples is not None
    if pieces:
        a.vocab = ref.n_vocab()
        a.pieces = sum(ref.piece(i) == tok.piece(i) and ref.piece(i, special=True) == tok.piece(i, special=True)
                       for i in range(min(a.vocab, tok.vocab_size)))
    for text in texts:
        a.texts += 1
        a.text_bytes += len(text.encode())
        theirs, ours = ref.tokenize(text), tok.encode(text)
        a.tokens += len(ours)
        ok = theirs == ours
        a.tokenize += ok
        a.tokenize_special += ref.tokenize(text, parse_special=True) == tok.encode(text, parse_special=True)
        if not ok and len(a.examples) < max_examples:
            a.examples.append({"text": text[:200], "llama.cpp": [tok.token_text(i) for i in theirs[:40]],
                               "ours": [tok.token_text(i) for i in ours[:40]]})
        mine = tok.decode_bytes(theirs)
        joined = b"".join(ref.piece(i) for i in theirs)
        if tok.add_space_prefix and joined.startswith(b" "):
            joined = joined[1:]
        a.decode_pieces += mine == joined
        a.decode_py += mine == ref.detokenize_py(theirs)
        a.decode_c += mine == ref.detokenize_c(theirs)
    return a
