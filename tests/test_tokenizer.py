"""Tokenizers (runtime/tokenizer.py): GGUF byte-level BPE and SentencePiece vocabularies round-trip
text, stream text correctly across split characters and SentencePiece spaces, name llama.cpp's
stop tokens, agree with transformers on tokenizer.json directories, and refuse junk metadata with
one line. Agreement with llama.cpp itself: tests/test_tokenizer_llamacpp.py."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from primasim.core.errors import CheckpointError
from primasim.runtime.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf
from primasim.runtime.vocab_rules import SPACE
from primasim.runtime.vocabularies import Vocabulary, cached_vocab_model, train_vocabulary

STYLES = ("llama3", "qwen2", "spm")
EDGE = ["Hello", " Hello", "Hello world", "   leading", "trailing   ", "a  b   c    d", "\n\n\n", "\t\t x",
        "1234567890 3.14159", "def f(x):\n    return x ** 2\n", "日本語のテキスト", "한국어 텍스트", "😀👍🏽👨‍👩‍👧‍👦🏳️‍🌈🇫🇷",
        "café naïve résumé", "e\u0301 a\u0308", "Ελληνικά", "Русский", "<|eot_id|>", "<s> </s>", "<|im_end|>",
        "I'm you're it's", "\r\n\r\n", "\x00\x01\x7f", "<0x0A>", "\u00a0\u2003\u3000"]


@pytest.fixture(scope="module", params=STYLES)
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    t = load_tokenizer(cached_vocab_model(request.param))
    assert t is not None
    return t


# ---------------------------------------------------------------------------- round trips
def test_varied_text_round_trips(tok: Tokenizer) -> None:
    for text in EDGE:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id if tok.add_bos else True
        assert tok.decode(ids) == text, (text, ids)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(exclude_categories=["Cs"], exclude_characters=[SPACE]), max_size=60))
def test_any_text_round_trips(tok: Tokenizer, text: str) -> None:
    # U+2581 is SentencePiece's space: it decodes to " ", as in llama.cpp (hence excluded)
    assert tok.decode(tok.encode(text)) == text


def test_special_token_text_is_parsed_only_on_request(tok: Tokenizer) -> None:
    text = f"a{tok.eos_token}b"
    plain, parsed = tok.encode(text, add_special=False), tok.encode(text, add_special=False, parse_special=True)
    assert tok.eos_id not in plain and parsed.count(tok.eos_id) == 1
    assert tok.decode(plain) == text  # as text it is just text
    assert tok.eos_token not in tok.decode(parsed) and tok.decode(parsed, skip_special=False).count(tok.eos_token) == 1


def test_user_defined_tokens_are_always_recognised() -> None:
    tok = load_tokenizer(cached_vocab_model("qwen2"))
    assert tok is not None
    ids = tok.encode("<tool_call>{}</tool_call>")
    assert ids[0] == tok.token_to_id("<tool_call>") and ids[-1] == tok.token_to_id("</tool_call>")
    assert tok.decode(ids) == "<tool_call>{}</tool_call>"  # user-defined tokens print their text


# ---------------------------------------------------------------------------- streaming
def _stream(tok: Tokenizer, ids: list[int], at_start: bool) -> list[str]:
    s = tok.stream(at_start=at_start)
    return [s.push(i) for i in ids] + [s.flush()]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(exclude_categories=["Cs"], exclude_characters=[SPACE]), max_size=60))
def test_streamed_text_equals_the_decoded_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special=False)
    chunks = _stream(tok, ids, at_start=True)
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)  # no character was emitted before its last byte


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_id_sequence_streams_as_it_decodes(tok: Tokenizer, data: st.DataObject) -> None:
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    # invalid byte sequences become U+FFFD exactly as in a one-shot decode
    assert "".join(_stream(tok, ids, at_start=False)) == tok.decode(ids, at_start=False)


@pytest.mark.parametrize("char", ["\U0001D11E", "\U0002A6B2", "\U0001FAE0"])
def test_a_character_split_over_tokens_is_held_back(tok: Tokenizer, char: str) -> None:
    ids = tok.encode(char, add_special=False)
    chunks = _stream(tok, ids, at_start=True)
    assert "".join(chunks) == char
    pieces = [tok.piece(i) for i in ids]
    if tok.add_space_prefix:  # the prepended space is not part of the text
        pieces[0] = pieces[0][1:]
    assert sum(0 < len(p) < 4 for p in pieces) >= 2  # the case is real: the 4 bytes are spread over tokens
    buf = b""
    for piece, chunk in zip(pieces, chunks):
        buf += piece
        assert chunk == ("" if len(buf) < 4 else char)  # nothing until the last byte, then the character


def test_sentencepiece_spaces_in_a_continuation() -> None:
    tok = load_tokenizer(cached_vocab_model("spm"))
    assert tok is not None and tok.add_space_prefix
    prompt = tok.encode("The cat")
    gen = tok.encode("sat on the mat", add_special=False)  # "▁sat ▁on ...": a new word after the prompt
    assert tok.token_text(gen[0]).startswith(SPACE)
    assert "".join(_stream(tok, gen, at_start=False)) == " sat on the mat"
    assert tok.decode(prompt) + "".join(_stream(tok, gen, at_start=False)) == "The cat sat on the mat"
    assert "".join(_stream(tok, gen, at_start=True)) == "sat on the mat"


# ---------------------------------------------------------------------------- special ids
def test_stop_ids_are_llama_cpps_end_of_generation_tokens() -> None:
    l3 = load_tokenizer(cached_vocab_model("llama3"))
    qw = load_tokenizer(cached_vocab_model("qwen2"))
    sp = load_tokenizer(cached_vocab_model("spm"))
    assert l3 is not None and qw is not None and sp is not None
    names = {"llama3": {l3.token_text(i) for i in l3.stop_ids()}, "qwen2": {qw.token_text(i) for i in qw.stop_ids()},
             "spm": {sp.token_text(i) for i in sp.stop_ids()}}
    assert names["llama3"] == {"<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"}
    assert names["qwen2"] == {"<|im_end|>", "<|endoftext|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}
    assert names["spm"] == {"</s>"}
    assert l3.add_bos and not qw.add_bos and sp.add_bos and l3.bos_token == "<|begin_of_text|>"


# ---------------------------------------------------------------------------- tokenizer.json directories
@pytest.mark.parametrize("style", STYLES)
def test_tokenizer_json_directory_matches_the_gguf_and_transformers(style: str, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    g = load_tokenizer(cached_vocab_model(style))
    assert g is not None
    g.hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": g.bos_token or None, "eos_token": g.eos_token, "chat_template": g.chat_template}))
    h = load_tokenizer(tmp_path)
    assert h is not None and h.kind == g.kind and h.add_space_prefix == g.add_space_prefix
    assert (h.bos_id, h.eos_id, h.add_bos, h.chat_template) == (g.bos_id, g.eos_id, g.add_bos, g.chat_template)
    assert h.pieces == g.pieces
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in EDGE:
        ids = h.encode(text)
        assert ids == g.encode(text)
        assert h.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text


def test_random_checkpoints_keep_their_tokenizer(tmp_path: Path) -> None:
    from primasim import load_model
    from primasim.runtime import write_random_checkpoint

    d = write_random_checkpoint(load_model("llama-tiny"), tmp_path / "st", seed=0)
    tok = load_tokenizer(d)
    assert tok is not None and tok.kind == "bpe" and tok.bos_id == 1 and tok.stop_ids() == (2,)


# ---------------------------------------------------------------------------- junk metadata
@pytest.fixture(scope="module")
def small_bpe() -> Vocabulary:
    return train_vocabulary("llama3", 600, corpus_bytes=60_000)


def _write(v: Vocabulary, path: Path) -> Path:
    """Only the tokenizer metadata (no tensors): what load_tokenizer reads."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    v.add_to_gguf(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


JUNK: dict[str, tuple[Callable[[Vocabulary], dict[str, Any]], str]] = {
    "missing merges": (lambda v: dict(merges=[]), "tokenizer.ggml.merges is missing"),
    "merge of unknown tokens": (lambda v: dict(merges=[v.merges[0], "zzz\u4e00 q"]),
                                "merge 1 of tokenizer.ggml.merges"),
    "merge without a space": (lambda v: dict(merges=[v.merges[0].replace(" ", "")]),
                              "is not two tokens separated by a space"),
    "short token types": (lambda v: dict(types=[1] * 10), "tokenizer.ggml.token_type has 10 entries"),
    "unknown pre-tokenizer": (lambda v: dict(pre="nonsense"), "tokenizer.ggml.pre 'nonsense'"),
    "bos outside the vocabulary": (lambda v: dict(bos_id=10 ** 6), "tokenizer.ggml.bos_token_id = 1000000"),
    "unsupported model": (lambda v: dict(model="bert"), "tokenizer.ggml.model 'bert' is not supported"),
    "no tokens": (lambda v: dict(tokens=[], types=[], bos_id=None, eos_id=None), "tokenizer.ggml.tokens is missing"),
    "sentencepiece without scores": (lambda v: dict(model="llama", pre=None, merges=[]),
                                     "tokenizer.ggml.scores is missing"),
}


@pytest.mark.parametrize("case", JUNK)
def test_junk_metadata_is_one_clear_error(case: str, small_bpe: Vocabulary, tmp_path: Path) -> None:
    change, expected = JUNK[case]
    p = _write(dataclasses.replace(small_bpe, **change(small_bpe)), tmp_path / "junk.gguf")
    with pytest.raises(CheckpointError) as err:
        tokenizer_from_gguf(p)
    msg = str(err.value)
    assert expected in msg and "\n" not in msg and "fix:" in msg


def test_truncated_file_is_one_clear_error(small_bpe: Vocabulary, tmp_path: Path) -> None:
    p = _write(small_bpe, tmp_path / "t.gguf")
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        tokenizer_from_gguf(p)


def test_file_without_a_vocabulary_has_no_tokenizer(tmp_path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "n.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    assert load_tokenizer(tmp_path / "n.gguf") is None
