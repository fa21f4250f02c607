"""Realistic tokenizer vocabularies without downloads, written into GGUF files and HF directories.

No model weights (and so no real vocabularies) can be downloaded here, so test and random-weight
models get vocabularies trained the way the real ones were, on a seeded corpus of this Python's
standard library (English prose and code) plus synthetic multilingual text (accents, Greek, Cyrillic,
CJK, Hangul, Devanagari, Arabic, emoji with modifiers and ZWJ sequences, digits, whitespace runs):

- "llama3": byte-level BPE with Llama 3's split regex and special tokens (tokenizer.ggml.pre llama-bpe)
- "qwen2":  byte-level BPE with Qwen2's split regex, ChatML tokens and user-defined tool tokens (qwen2)
- "gpt2":   byte-level BPE with GPT-2's regex (gpt-2)
- "spm":    SentencePiece BPE with byte fallback as Llama 1/2 / TinyLlama / CodeLlama (llama);
            "spm-unigram" a unigram SentencePiece model exported the same way. Trained with the
            `sentencepiece` package (a test dependency).

`Vocabulary.add_to_gguf(writer)` writes tokenizer.ggml.* as llama.cpp's convert_hf_to_gguf.py does;
`write_vocab_gguf` writes a small random-weight model around it, which llama.cpp loads.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

from primasim.core.model_sources import load_model
from primasim.core.paths import cache_dir

from .checkpoint import write_random_checkpoint
from .vocab_rules import BYTE, CONTROL, NORMAL, SPLIT_RULES, UNKNOWN, UNUSED, USER_DEFINED

STYLES = ("llama3", "qwen2", "gpt2", "spm", "spm-unigram")

# Chat templates as the models ship them (tokenizer_config.json), shortened where they only add tools.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


@dataclass
class Vocabulary:
    """A tokenizer as GGUF stores it (tokenizer.ggml.*), plus the chat template."""

    model: str                       # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str | None                  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = True
    chat_template: str | None = None
    style: str = ""

    @property
    def size(self) -> int:
        return len(self.tokens)

    def add_to_gguf(self, w: Any) -> None:
        """tokenizer.ggml.* and tokenizer.chat_template on an open gguf.GGUFWriter."""
        w.add_tokenizer_model(self.model)
        if self.pre is not None:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges:
            w.add_token_merges(self.merges)
        for add, v in ((w.add_bos_token_id, self.bos_id), (w.add_eos_token_id, self.eos_id),
                       (w.add_eot_token_id, self.eot_id), (w.add_unk_token_id, self.unk_id)):
            if v is not None:
                add(v)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(False)
        if self.chat_template is not None:
            w.add_chat_template(self.chat_template)


# ---------------------------------------------------------------------------- corpus
def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def stdlib_texts(*, held_out: bool = False, limit_bytes: int = 3_000_000) -> Iterator[str]:
    """Python standard library sources (prose in docstrings and comments, code): every fifth file
    is held out of training, for testing on text the vocabulary has not seen."""
    total = 0
    for i, f in enumerate(_stdlib_files()):
        if (i % 5 == 4) != held_out:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        total += len(text)
        yield text
        if total >= limit_bytes:
            return


def _ranges(*rs: tuple[int, int]) -> list[str]:
    return [chr(c) for a, b in rs for c in range(a, b + 1)]


_SCRIPTS: dict[str, list[str]] = {
    "latin": list("abcdefghijklmnopqrstuvwxyz") + list("éèêëàâäçîïôöùûüÿñßåæøœ"),
    "greek": _ranges((0x3B1, 0x3C9)),
    "cyrillic": _ranges((0x430, 0x44F)),
    "devanagari": _ranges((0x915, 0x939)) + ["\u093e", "\u093f", "\u0940", "\u0941", "\u0947", "\u094d", "\u0902"],
    "arabic": _ranges((0x627, 0x64A)),
    "hangul": _ranges((0xAC00, 0xAC00 + 600)),
    "han": _ranges((0x4E00, 0x4E00 + 1500)),
    "kana": _ranges((0x3041, 0x3093), (0x30A1, 0x30F3)),
}
_EMOJI = ["😀", "😂", "🥲", "❤️", "👍", "👍🏽", "🙏🏿", "🎉", "🚀", "🤖", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "🇯🇵", "🧑🏻‍💻",
          "☕", "✨", "🔥", "🐍", "👩‍🔬"]


def synthetic_texts(seed: int, n: int = 4000) -> Iterator[str]:
    """Seeded multilingual lines: Zipf-distributed words per script, numbers, emoji, whitespace runs."""
    rng = np.random.default_rng([seed, 0x70C2])
    lexicons = {}
    for name, chars in _SCRIPTS.items():
        size = 400 if name not in ("han", "kana", "hangul") else 1200
        lengths = rng.integers(1, 4 if name in ("han", "hangul") else 8, size)
        lexicons[name] = ["".join(rng.choice(chars, k)) for k in lengths]
    zipf = {name: 1.0 / np.arange(1, len(lex) + 1) for name, lex in lexicons.items()}
    names = list(lexicons)
    for _ in range(n):
        script = names[int(rng.integers(len(names)))]
        lex, p = lexicons[script], zipf[script]
        words = [lex[j] for j in rng.choice(len(lex), int(rng.integers(3, 20)), p=p / p.sum())]
        sep = "" if script in ("han", "kana") else " "
        line = sep.join(words)
        r = rng.random()
        if r < 0.2:
            line += " " + str(int(rng.integers(0, 10 ** int(rng.integers(1, 9)))))
        elif r < 0.3:
            line += f" {rng.random() * 1000:.{int(rng.integers(1, 5))}f}"
        if rng.random() < 0.3:
            line += " " + "".join(rng.choice(_EMOJI, int(rng.integers(1, 4))))
        if rng.random() < 0.1:
            line = " " * int(rng.integers(2, 9)) + line + "\t" * int(rng.integers(0, 3))
        yield line + ("\r\n" if rng.random() < 0.05 else "\n")


def training_corpus(seed: int, corpus_bytes: int = 1_500_000) -> Iterator[str]:
    yield from stdlib_texts(limit_bytes=corpus_bytes)
    yield from synthetic_texts(seed)


# ---------------------------------------------------------------------------- byte-level BPE
def _bpe_specials(style: str, n_reserved: int) -> tuple[list[str], list[str]]:
    """(control tokens, user-defined tokens) of a style, in id order after the trained vocabulary."""
    if style == "llama3":
        control = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|eom_id|>", "<|python_tag|>"]
        return control + [f"<|reserved_special_token_{i}|>" for i in range(n_reserved)], []
    if style == "qwen2":
        control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>",
                   "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
        return control, ["<tool_call>", "</tool_call>"]
    return ["<|endoftext|>"], []


def train_bpe(style: str, size: int, seed: int = 0, corpus_bytes: int = 1_500_000) -> Vocabulary:
    """A byte-level BPE vocabulary of exactly `size` tokens in the style of Llama 3, Qwen2 or GPT-2."""
    split = {"llama3": "llama3", "qwen2": "qwen2", "gpt2": "gpt2"}[style]
    control, user = _bpe_specials(style, 4)
    n_added = len(control) + len(user)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in SPLIT_RULES[split]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=size - n_added, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(training_corpus(seed, corpus_bytes), trainer)
    base = hf.get_vocab_size()
    if base + n_added < size:  # too little text for the last merges: reserved control tokens fill the table
        control += [f"<|reserved_special_token_{i}|>" for i in range(4, 4 + size - base - n_added)]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    data = _json(hf)
    tokens = [""] * hf.get_vocab_size()
    for t, i in hf.get_vocab().items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [CONTROL if t in control else USER_DEFINED if t in user else NORMAL for t in tokens]
    ids = {t: i for i, t in enumerate(tokens)}
    if style == "llama3":
        return Vocabulary("gpt2", "llama-bpe", tokens, types, merges, bos_id=ids["<|begin_of_text|>"],
                          eos_id=ids["<|eot_id|>"], add_bos=True, chat_template=LLAMA3_TEMPLATE, style=style)
    if style == "qwen2":
        return Vocabulary("gpt2", "qwen2", tokens, types, merges, bos_id=ids["<|endoftext|>"],
                          eos_id=ids["<|im_end|>"], add_bos=False, chat_template=CHATML_TEMPLATE, style=style)
    return Vocabulary("gpt2", "gpt-2", tokens, types, merges, bos_id=ids["<|endoftext|>"],
                      eos_id=ids["<|endoftext|>"], add_bos=False, style=style)


def _json(hf: HFTokenizer) -> dict[str, Any]:
    import json

    return json.loads(hf.to_str())


# ---------------------------------------------------------------------------- SentencePiece
def train_spm(size: int, seed: int = 0, *, model_type: str = "bpe", corpus_bytes: int = 1_500_000) -> Vocabulary:
    """A SentencePiece vocabulary trained as Llama 2's was (byte fallback, split digits, identity
    normalisation, whitespace-only pieces), exported as convert_hf_to_gguf.py exports it."""
    try:
        import sentencepiece as spm
    except ImportError:
        raise ImportError("training a SentencePiece vocabulary needs the sentencepiece package "
                          "(pip install sentencepiece; it is in primasim's [test] extra)") from None
    lines = [ln for text in training_corpus(seed, corpus_bytes) for ln in text.splitlines() if ln.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=size, model_type=model_type,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<|user|>", "<|assistant|>"], max_sentence_length=16384, num_threads=1,
        minloglevel=2, hard_vocab_limit=False, input_sentence_size=200_000,
        shuffle_input_sentence=False)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    tokens, types, scores = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else UNUSED if sp.is_unused(i)
                     else BYTE if sp.is_byte(i) else USER_DEFINED if tokens[-1] in ("<|user|>", "<|assistant|>")
                     else NORMAL)
    template = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + "
                "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}") \
        if model_type == "unigram" else LLAMA2_TEMPLATE
    return Vocabulary("llama", None, tokens, types, scores=scores, bos_id=1, eos_id=2, unk_id=0, add_bos=True,
                      chat_template=template, style="spm" if model_type == "bpe" else "spm-unigram")


def train_vocabulary(style: str, size: int = 8000, seed: int = 0, corpus_bytes: int = 1_500_000) -> Vocabulary:
    """A vocabulary of `style` (see STYLES) with about `size` tokens (exactly, for byte-level BPE)."""
    if style in ("llama3", "qwen2", "gpt2"):
        return train_bpe(style, size, seed, corpus_bytes)
    if style in ("spm", "spm-unigram"):
        return train_spm(size, seed, model_type="bpe" if style == "spm" else "unigram", corpus_bytes=corpus_bytes)
    raise ValueError(f"unknown vocabulary style {style!r} (one of {', '.join(STYLES)})")


def write_vocab_gguf(path: str | Path, vocab: Vocabulary, *, seed: int = 0) -> Path:
    """A tiny random-weight model (2 blocks, hidden 64) carrying `vocab`, as a GGUF file llama.cpp
    loads; its architecture follows the style (qwen2 for Qwen2 vocabularies, llama otherwise)."""
    base = load_model("qwen2-tiny" if vocab.style == "qwen2" else "llama-tiny")
    spec = dataclasses.replace(base, vocab=vocab.size, n_layers=2,
                               name=f"{base.family}-{vocab.style or vocab.model}-{vocab.size}")
    return write_random_checkpoint(spec, path, fmt="gguf", seed=seed, vocab=vocab)


def cached_vocab_model(style: str, size: int = 4000, seed: int = 0) -> Path:
    """`write_vocab_gguf(train_vocabulary(style, size, seed))`, made once into the cache directory
    (<cache>/vocab/<style>-<size>-s<seed>.gguf; training takes 5-30 s) and reused afterwards."""
    path = cache_dir() / "vocab" / f"{style}-{size}-s{seed}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.gguf")
        try:
            write_vocab_gguf(tmp, train_vocabulary(style, size, seed), seed=seed)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path
