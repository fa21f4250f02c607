"""Text <-> token ids as llama.cpp reads them, built on Hugging Face `tokenizers`.

GGUF vocabularies (`tokenizer.ggml.*`):
- "gpt2": byte-level BPE. The text is split by the regexes llama.cpp uses for `tokenizer.ggml.pre`
  (llama-bpe/llama3, qwen2, gpt-2, deepseek-*, ...), byte-encoded, then merged by rank.
- "llama": SentencePiece (Llama 1/2, TinyLlama, CodeLlama). llama.cpp merges adjacent pieces by the
  score of the merged piece and falls back to <0xNN> byte tokens; a `tokenizers` BPE whose merges are
  ranked by those scores, with byte fallback, does the same (merges derived as transformers' GGUF
  converter does). A space is prepended to every text run, and spaces become U+2581.
Control and unknown tokens are recognised in text only with `parse_special=True` (llama.cpp's
`parse_special`); user-defined tokens always.

Hugging Face directories: `tokenizer.json` (byte-level BPE or SentencePiece-style BPE) with
`tokenizer_config.json`, `config.json` and `generation_config.json` for special ids and the chat template.

Decoding is llama.cpp's `token_to_piece`: every id has a byte string (a BPE token's bytes, a
SentencePiece piece with U+2581 as space, a byte token's byte; control tokens print nothing), so a
sequence decodes to the concatenation and `StreamDecoder` can emit text as soon as it is whole UTF-8.
Checked against llama.cpp in tests/test_tokenizer_llamacpp.py and experiments/tokenizer_vs_llamacpp.py.
"""

from __future__ import annotations

import codecs
import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer as HFTokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from primasim.core.errors import CheckpointError
from primasim.core.gguf import read_metadata

from .vocab_rules import (
    BYTE,
    CONTROL,
    EOG_TEXTS,
    FIM_TEXTS,
    NORMAL,
    PRE_TYPES,
    SPACE,
    SPLIT_RULES,
    UNKNOWN,
    USER_DEFINED,
    PreType,
    byte_level_bytes,
    byte_token_value,
)


# ---------------------------------------------------------------------------- the tokenizer
@dataclass
class Tokenizer:
    """A model's tokenizer: encode text as the model's runtime does (llama.cpp for GGUF files),
    decode ids to text, stream text, and the facts generation needs (BOS, stop ids, chat template).

    `pieces[i]` is what token i prints (llama.cpp's token_to_piece with special=False);
    `special_pieces` holds the text of control tokens for `decode(..., skip_special=False)`."""

    hf: HFTokenizer
    kind: Literal["bpe", "spm"]
    pieces: list[bytes]
    special_pieces: dict[int, bytes]
    bos_id: int | None
    eos_id: int | None
    eog_ids: frozenset[int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool = False
    pre: str | None = None
    chat_template: str | None = None
    source: str = ""
    token_types: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def bos_token(self) -> str:
        return self.token_text(self.bos_id) if self.bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self.token_text(self.eos_id) if self.eos_id is not None else ""

    def token_text(self, i: int) -> str:
        """The vocabulary entry of id i as stored (e.g. "<|eot_id|>", "▁the", "Ġthe")."""
        t = self.hf.id_to_token(i)
        return "" if t is None else t

    def token_to_id(self, text: str) -> int | None:
        return self.hf.token_to_id(text)

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`: BOS/EOS added when `add_special` and the vocabulary asks for them;
        control-token texts (e.g. "<|eot_id|>") become those tokens only with `parse_special`."""
        with self._lock:  # the flag is the HF tokenizer's state: one encoding at a time (e.g. a server's threads)
            self.hf.encode_special_tokens = not parse_special
            try:
                return list(self.hf.encode(text, add_special_tokens=add_special).ids)
            finally:
                self.hf.encode_special_tokens = False

    def piece(self, i: int, *, special: bool = False) -> bytes:
        """The bytes token i prints (control tokens print their text only with `special`)."""
        if special and i in self.special_pieces:
            return self.special_pieces[i]
        return self.pieces[i]

    def decode_bytes(self, ids: Iterable[int], *, skip_special: bool = True, at_start: bool = True) -> bytes:
        """Concatenated pieces; at the start of a text a SentencePiece vocabulary's prepended space
        is removed again (`at_start=False` for a continuation, e.g. generated text after a prompt)."""
        out = b"".join(self.piece(int(i), special=not skip_special) for i in ids)
        if at_start and self.add_space_prefix and out.startswith(b" "):
            out = out[1:]
        return out

    def decode(self, ids: Iterable[int], *, skip_special: bool = True, at_start: bool = True) -> str:
        return self.decode_bytes(ids, skip_special=skip_special, at_start=at_start).decode("utf-8", "replace")

    def stream(self, *, skip_special: bool = True, at_start: bool = False) -> StreamDecoder:
        """An incremental decoder for generated ids (a continuation of the prompt by default)."""
        return StreamDecoder(self, skip_special=skip_special, at_start=at_start)

    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: EOS, EOT, EOM and llama.cpp's end-of-generation tokens."""
        return tuple(sorted(self.eog_ids))

    def describe(self) -> str:
        pre = f", pre {self.pre}" if self.pre else ""
        return f"{self.kind}{pre}, {self.vocab_size} tokens, bos {self.bos_id}, stop at {list(self.stop_ids())}"


class StreamDecoder:
    """Text of a growing token sequence, released as soon as it is whole UTF-8: a character whose
    bytes are spread over several tokens (byte-fallback or byte-level pieces) is held back until its
    last byte arrives; invalid bytes become U+FFFD exactly as a one-shot decode would make them."""

    def __init__(self, tok: Tokenizer, *, skip_special: bool = True, at_start: bool = False) -> None:
        self.tok = tok
        self.skip_special = skip_special
        self._strip = at_start and tok.add_space_prefix
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        """Feed one id; returns the text that became complete ("" while a character is incomplete)."""
        b = self.tok.piece(int(token_id), special=not self.skip_special)
        if self._strip and b:
            self._strip = False
            b = b[1:] if b.startswith(b" ") else b
        return self._utf8.decode(b)

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the end decodes as U+FFFD)."""
        return self._utf8.decode(b"", final=True)


# ---------------------------------------------------------------------------- errors
def _bad(what: str, where: str, fix: str = "re-convert the model with llama.cpp's convert_hf_to_gguf.py") -> CheckpointError:
    return CheckpointError(what, where=where, fix=fix)


# ---------------------------------------------------------------------------- GGUF
def _gguf_fields(path: Path) -> dict[str, Any]:
    """The tokenizer.* metadata of a GGUF file (string arrays as lists of bytes)."""
    try:
        return read_metadata(path, ("tokenizer.",))
    except (ValueError, OSError) as exc:
        raise _bad(f"truncated or corrupted GGUF file ({exc})", str(path),
                   "the file is incomplete or corrupted: re-copy or re-convert it") from None


def _show(v: Any) -> str:
    """A value for an error message: short, whatever a corrupted file put there."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _text(raw: Any, key: str, where: str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise _bad(f"{key} should be a string, got {type(raw).__name__}", where)
    return raw


def _int_id(raw: Any, key: str, n: int, where: str) -> int | None:
    if raw is None:
        return None
    try:
        v = int(raw)
    except (TypeError, ValueError):
        raise _bad(f"{key} should be a token id, got {_show(raw)}", where) from None
    if not 0 <= v < n:
        raise _bad(f"{key} = {v} is outside the vocabulary (0..{n - 1})", where)
    return v


def _flag(raw: Any, key: str, default: bool, where: str) -> bool:
    if raw is None:
        return default
    if isinstance(raw, bool):
        return raw
    raise _bad(f"{key} should be true or false, got {_show(raw)}", where)


def tokenizer_from_gguf(path: str | Path) -> Tokenizer | None:
    """The tokenizer embedded in a GGUF file, as llama.cpp builds it; None if the file has none."""
    p = Path(path)
    where = str(p)
    meta = _gguf_fields(p)
    model = meta.get("tokenizer.ggml.model")
    if model is None or model in ("none", "no_vocab"):
        return None
    model = _text(model, "tokenizer.ggml.model", where)
    if model not in ("gpt2", "llama"):
        raise _bad(f"tokenizer.ggml.model {_show(model)} is not supported (primasim reads 'gpt2' byte-level BPE and "
                   "'llama' SentencePiece vocabularies)", where,
                   "use a Llama or Qwen2 model, or pass token ids with --prompt-ids")
    raw_tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(raw_tokens, list) or not raw_tokens:
        raise _bad("tokenizer.ggml.tokens is missing or not a list of strings", where)
    try:
        tokens = list(map(bytes.decode, raw_tokens))
    except UnicodeDecodeError:
        i = next(i for i, b in enumerate(raw_tokens) if not _utf8(b))
        raise _bad(f"token {i} of tokenizer.ggml.tokens is not valid UTF-8 ({raw_tokens[i][:16]!r})", where) from None
    if "" in tokens:
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # llama.cpp's name for empty entries
    n = len(tokens)

    def int_array(key: str, dtype: str) -> list[Any] | None:
        a = meta.get(key)
        if a is None:
            return None
        if isinstance(a, list) or getattr(a, "dtype", None) is None or a.dtype.kind not in dtype:
            raise _bad(f"{key} has the wrong element type", where)
        if len(a) != n:
            raise _bad(f"{key} has {len(a)} entries but tokenizer.ggml.tokens has {n}", where)
        return a.tolist()

    types = int_array("tokenizer.ggml.token_type", "iu") or [NORMAL] * n
    scores = int_array("tokenizer.ggml.scores", "fiu")
    bos = _int_id(meta.get("tokenizer.ggml.bos_token_id"), "tokenizer.ggml.bos_token_id", n, where)
    eos = _int_id(meta.get("tokenizer.ggml.eos_token_id"), "tokenizer.ggml.eos_token_id", n, where)
    eot = _int_id(meta.get("tokenizer.ggml.eot_token_id"), "tokenizer.ggml.eot_token_id", n, where)
    eom = _int_id(meta.get("tokenizer.ggml.eom_token_id"), "tokenizer.ggml.eom_token_id", n, where)
    unk = _int_id(meta.get("tokenizer.ggml.unknown_token_id"), "tokenizer.ggml.unknown_token_id", n, where)
    template = _text(meta.get("tokenizer.chat_template"), "tokenizer.chat_template", where)

    # llama.cpp makes these control tokens whatever their stored type
    types = [CONTROL if t in EOG_TEXTS or t in FIM_TEXTS else ty for t, ty in zip(tokens, types)]
    if model == "gpt2":
        pre_name = _text(meta.get("tokenizer.ggml.pre"), "tokenizer.ggml.pre", where) or "default"
        pre = PRE_TYPES.get(pre_name)
        if pre is None:
            raise _bad(f"tokenizer.ggml.pre {_show(pre_name)} is not a pre-tokenizer primasim knows (known: "
                       f"{', '.join(sorted(PRE_TYPES))})", where,
                       "re-convert the model with a llama.cpp that names a known pre-tokenizer")
        raw_merges = meta.get("tokenizer.ggml.merges")
        if raw_merges is None:
            raise _bad("tokenizer.ggml.merges is missing (a 'gpt2' BPE vocabulary needs its merges)", where)
        if not isinstance(raw_merges, list):
            raise _bad("tokenizer.ggml.merges should be a list of strings", where)
        hf = _bpe_hf(tokens, raw_merges, pre, where)
        pieces = [byte_level_bytes(t) if ty == NORMAL else b"" for t, ty in zip(tokens, types)]
        add_bos = _flag(meta.get("tokenizer.ggml.add_bos_token"), "tokenizer.ggml.add_bos_token", pre.add_bos, where)
        add_space_prefix = False
        kind: Literal["bpe", "spm"] = "bpe"
    else:
        pre_name = None
        if scores is None:
            raise _bad("tokenizer.ggml.scores is missing (a 'llama' SentencePiece vocabulary needs its scores)", where)
        hf = _spm_hf(tokens, scores, types, unk, where)
        pieces = []
        for t, ty in zip(tokens, types):
            v = byte_token_value(t) if ty == BYTE else None
            pieces.append(bytes([v]) if v is not None else t.replace(SPACE, " ").encode() if ty == NORMAL else b"")
        add_bos = _flag(meta.get("tokenizer.ggml.add_bos_token"), "tokenizer.ggml.add_bos_token", True, where)
        add_space_prefix = _flag(meta.get("tokenizer.ggml.add_space_prefix"), "tokenizer.ggml.add_space_prefix",
                                 True, where)
        if add_space_prefix:
            hf.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        else:
            hf.normalizer = normalizers.Replace(" ", SPACE)
        kind = "spm"
        bos = 1 if bos is None and n > 1 else bos  # llama.cpp's SentencePiece defaults
        eos = 2 if eos is None and n > 2 else eos
    for i, ty in enumerate(types):
        if ty == USER_DEFINED:
            pieces[i] = tokens[i].encode()  # printed verbatim in both vocabularies
    add_eos = _flag(meta.get("tokenizer.ggml.add_eos_token"), "tokenizer.ggml.add_eos_token", False, where)
    if add_bos and bos is None:
        raise _bad("tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is not set", where)
    if add_eos and eos is None:
        raise _bad("tokenizer.ggml.add_eos_token is true but tokenizer.ggml.eos_token_id is not set", where)
    _add_specials(hf, tokens, types)
    _post_process(hf, tokens, bos if add_bos else None, eos if add_eos else None)
    # decoders too, so that hf.save() is a tokenizer.json transformers decodes as we do
    if kind == "bpe":
        hf.decoder = decoders.ByteLevel()
    else:
        hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                        *([decoders.Strip(" ", 1, 0)] if add_space_prefix else [])])
    eog = {i for i in (eos, eot, eom) if i is not None}
    eog |= {i for i, t in enumerate(tokens) if t in EOG_TEXTS}
    special = {i: tokens[i].encode() for i, ty in enumerate(types) if ty in (CONTROL, UNKNOWN)}
    return Tokenizer(hf=hf, kind=kind, pieces=pieces, special_pieces=special, bos_id=bos, eos_id=eos,
                     eog_ids=frozenset(eog), add_bos=add_bos, add_eos=add_eos, add_space_prefix=add_space_prefix,
                     pre=pre_name, chat_template=template, source=where, token_types=types)


def _bpe_hf(tokens: list[str], raw_merges: list[bytes], pre: PreType, where: str) -> HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    # 280k merges in a Llama 3 vocabulary: C-level map/zip/set operations, a loop only to name a bad entry
    try:
        text = list(map(bytes.decode, raw_merges))
    except UnicodeDecodeError:
        k = next(k for k, m in enumerate(raw_merges) if not _utf8(m))
        raise _bad(f"merge {k} of tokenizer.ggml.merges is not valid UTF-8 ({raw_merges[k][:40]!r})", where) from None
    cuts = [m.find(" ", 1) for m in text]  # as llama.cpp splits a merge: at the first space after its first character
    if cuts and min(cuts) < 0:
        k = cuts.index(-1)
        raise _bad(f"merge {k} of tokenizer.ggml.merges ({text[k][:40]!r}) is not two tokens separated by a space",
                   where)
    merges = [(m[:c], m[c + 1:]) for m, c in zip(text, cuts)]
    firsts, seconds = zip(*merges) if merges else ((), ())
    if not (vocab.keys() >= set(firsts) and vocab.keys() >= set(seconds)
            and vocab.keys() >= set(map(str.__add__, firsts, seconds))):
        k, part = next((k, p) for k, (a, b) in enumerate(merges) for p in (a, b, a + b) if p not in vocab)
        raise _bad(f"merge {k} of tokenizer.ggml.merges ({text[k][:40]!r}) uses {part[:40]!r}, which is not in "
                   "tokenizer.ggml.tokens", where)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in SPLIT_RULES[pre.split]]
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    return hf


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
    except UnicodeDecodeError:
        return False
    return True


def spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges that reproduce llama.cpp's SentencePiece tokenizer: any two adjacent pieces whose
    concatenation is a token merge, the highest-scoring result first (ties: lower id first)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for t, i in vocab.items():
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            ia, ib = vocab.get(a), vocab.get(b)
            if ia is not None and ib is not None:
                ranked.append((-float(scores[i]), i, ia, a, b))
    ranked.sort()
    return [(a, b) for _, _, _, a, b in ranked]


def _spm_hf(tokens: list[str], scores: list[float], types: list[int], unk: int | None, where: str) -> HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    if unk is None:
        unk = next((i for i, ty in enumerate(types) if ty == UNKNOWN), None)
    model = models.BPE(vocab=vocab, merges=spm_merges(tokens, scores), byte_fallback=True, fuse_unk=True,
                       unk_token=tokens[unk] if unk is not None else None)
    return HFTokenizer(model)


def _add_specials(hf: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control and unknown tokens are special (recognised in text only when parsing specials);
    user-defined ones are recognised always, as llama.cpp's tokenizer_st_partition does."""
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, ty in enumerate(types)
               if ty in (CONTROL, UNKNOWN)]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, ty in enumerate(types)
            if ty == USER_DEFINED]
    if special:
        hf.add_special_tokens(special)
    if user:
        hf.add_tokens(user)


def _post_process(hf: HFTokenizer, tokens: list[str], bos: int | None, eos: int | None) -> None:
    pre = f"{tokens[bos]} " if bos is not None else ""
    post = f" {tokens[eos]}" if eos is not None else ""
    specials = [(tokens[i], i) for i in {bos, eos} if i is not None]
    hf.post_processor = processors.TemplateProcessing(single=f"{pre}$A{post}", special_tokens=specials)


# ---------------------------------------------------------------------------- Hugging Face directories
def _read_json(p: Path) -> dict[str, Any]:
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"unreadable JSON ({exc})", where=str(p), fix=f"repair or remove {p.name}") from None
    if not isinstance(data, dict):
        raise CheckpointError("not a JSON object", where=str(p), fix=f"repair or remove {p.name}")
    return data


def _token_content(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _ids(v: Any) -> list[int]:
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, list):
        return [x for x in v if isinstance(x, int) and not isinstance(x, bool)]
    return []


def _components(node: Any, key: str) -> list[dict[str, Any]]:
    """A normalizer/pre-tokenizer/decoder tree of tokenizer.json flattened into its parts."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [c for sub in node.get(key, []) for c in _components(sub, key)]
    return [node]


def tokenizer_from_hf(tokenizer_json: str | Path) -> Tokenizer:
    """A tokenizer.json (with tokenizer_config.json, config.json, generation_config.json beside it)."""
    p = Path(tokenizer_json)
    d = p.parent
    try:
        hf = HFTokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises its own exception type on bad JSON
        raise CheckpointError(f"unreadable tokenizer ({exc})", where=str(p),
                              fix="repair or remove tokenizer.json") from None
    spec = json.loads(hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"tokenizer model {_show(model.get('type'))} is not supported (primasim reads byte-level "
                              "BPE and SentencePiece-style BPE tokenizers)", where=str(p),
                              fix="use a Llama or Qwen2 model's tokenizer.json, or pass --prompt-ids")
    decoder_parts = _components(spec.get("decoder"), "decoders")
    pretoks = _components(spec.get("pre_tokenizer"), "pretokenizers")
    norms = _components(spec.get("normalizer"), "normalizers")
    byte_level = any(c.get("type") == "ByteLevel" for c in decoder_parts + pretoks)
    n = hf.get_vocab_size(with_added_tokens=True)
    added = {int(a["id"]): a for a in spec.get("added_tokens", [])}
    pieces: list[bytes] = []
    for i in range(n):
        t = hf.id_to_token(i) or ""
        a = added.get(i)
        if a is not None:
            pieces.append(b"" if a.get("special") else t.encode())
        elif byte_level:
            pieces.append(byte_level_bytes(t))
        else:
            v = byte_token_value(t) if model.get("byte_fallback") else None
            pieces.append(bytes([v]) if v is not None else t.replace(SPACE, " ").encode())
    space_prefix = not byte_level and (
        any(c.get("type") == "Prepend" and c.get("prepend") == SPACE for c in norms)
        or any(c.get("type") == "Metaspace" and c.get("prepend_scheme", "always") != "never" for c in pretoks))
    cfg, gen, tcfg = _read_json(d / "config.json"), _read_json(d / "generation_config.json"), \
        _read_json(d / "tokenizer_config.json")

    def named(key: str) -> int | None:
        text = _token_content(tcfg.get(key))
        return hf.token_to_id(text) if text is not None else None

    bos = named("bos_token")
    if bos is None:
        bos = next(iter(_ids(gen.get("bos_token_id")) + _ids(cfg.get("bos_token_id"))), None)
    eos = named("eos_token")
    eos_all = _ids(gen.get("eos_token_id")) + _ids(cfg.get("eos_token_id"))
    if eos is None and eos_all:
        eos = eos_all[0]
    probe = hf.encode("a", add_special_tokens=True).ids
    add_bos = bos is not None and len(probe) > 1 and probe[0] == bos
    add_eos = eos is not None and len(probe) > 1 and probe[-1] == eos
    vocab = hf.get_vocab(with_added_tokens=True)
    eog = {i for i in [eos, *eos_all] if i is not None and 0 <= i < n}
    eog |= {i for t, i in vocab.items() if t in EOG_TEXTS}
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named_t = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named_t.get("default") or next(iter(named_t.values()), None)
    if template is None and (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    special = {i: (hf.id_to_token(i) or "").encode() for i, a in added.items() if a.get("special")}
    return Tokenizer(hf=hf, kind="bpe" if byte_level else "spm", pieces=pieces, special_pieces=special, bos_id=bos,
                     eos_id=eos, eog_ids=frozenset(eog), add_bos=add_bos, add_eos=add_eos,
                     add_space_prefix=space_prefix, chat_template=template if isinstance(template, str) else None,
                     source=str(p))


# ---------------------------------------------------------------------------- entry point
def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer of a checkpoint: `tokenizer.json` in the directory (or beside a .gguf file, or
    the path itself), else a GGUF file's embedded vocabulary; None if there is none.
    Malformed metadata raises CheckpointError naming the field and the fix."""
    p = Path(path)
    for cand in (p if p.suffix == ".json" else None, p / "tokenizer.json" if p.is_dir() else None,
                 p.parent / "tokenizer.json" if p.suffix == ".gguf" else None):
        if cand is not None and cand.is_file():
            return tokenizer_from_hf(cand)
    if p.suffix == ".gguf" and p.is_file():
        return tokenizer_from_gguf(p)
    return None
