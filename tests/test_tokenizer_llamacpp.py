"""Our tokenizers against llama.cpp's on the same GGUF files (needs the optional llama-cpp-python,
extra 'bench'): identical ids on a varied corpus and on random text, identical pieces for every
token, decoded text equal to llama.cpp's pieces. Figures on larger vocabularies:
experiments/results/tokenizer_vs_llamacpp.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from primasim.runtime.tokenizer import Tokenizer, load_tokenizer
from primasim.runtime.tokenizer_check import LlamaCppVocab, compare, corpus, random_texts
from primasim.runtime.vocab_rules import SPLIT_RULES
from primasim.runtime.vocabularies import cached_vocab_model, train_vocabulary, write_vocab_gguf

pytest.importorskip("llama_cpp", reason="optional extra 'bench' (llama-cpp-python) not installed")

STYLES = ("llama3", "qwen2", "gpt2", "spm")


@pytest.fixture(scope="module", params=STYLES)
def pair(request: pytest.FixtureRequest) -> tuple[Tokenizer, LlamaCppVocab]:
    path = cached_vocab_model(request.param)
    tok = load_tokenizer(path)
    assert tok is not None
    ref = LlamaCppVocab(path)
    yield tok, ref
    ref.close()


def test_same_ids_pieces_and_text_as_llama_cpp(pair: tuple[Tokenizer, LlamaCppVocab]) -> None:
    tok, ref = pair
    a = compare(tok, ref, corpus(held_out_bytes=100_000, synthetic=400))
    assert a.texts > 500 and a.vocab == tok.vocab_size
    assert a.pieces == a.vocab, "pieces differ"
    assert a.tokenize == a.texts, a.examples
    assert a.tokenize_special == a.texts
    assert a.decode_pieces == a.texts


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(exclude_categories=["Cs", "Cn"]), max_size=50))
def test_any_text_tokenizes_as_llama_cpp(pair: tuple[Tokenizer, LlamaCppVocab], text: str) -> None:
    # unassigned code points excluded: llama.cpp's Unicode tables and Oniguruma's (in tokenizers)
    # disagree on some letters assigned recently (experiments/results/tokenizer_vs_llamacpp.md)
    tok, ref = pair
    assert tok.encode(text) == ref.tokenize(text)
    assert tok.encode(text, parse_special=True) == ref.tokenize(text, parse_special=True)


def test_random_strings_tokenize_as_llama_cpp(pair: tuple[Tokenizer, LlamaCppVocab]) -> None:
    tok, ref = pair
    bad = [t for t in random_texts(1000, seed=1) if tok.encode(t) != ref.tokenize(t)]
    assert not bad, bad[:3]


@pytest.mark.parametrize("pre", sorted({"default", "starcoder", "falcon", "deepseek-llm", "deepseek-coder",
                                         "deepseek-v3", "dbrx", "smollm", "mpt"}))
def test_every_split_rule_matches_llama_cpp(pre: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The other tokenizer.ggml.pre names (their split regexes) on one vocabulary."""
    assert {"default", "starcoder", "falcon", "deepseek-llm", "deepseek-coder", "deepseek-v3"} <= set(SPLIT_RULES)
    v = _small_vocab()
    path = write_vocab_gguf(tmp_path_factory.mktemp("pre") / f"{pre}.gguf", dataclasses.replace(v, pre=pre))
    tok, ref = load_tokenizer(path), LlamaCppVocab(path)
    assert tok is not None
    try:
        texts = [*corpus(held_out_bytes=30_000, synthetic=200), *random_texts(500, seed=2)]
        a = compare(tok, ref, texts, pieces=False)
        assert a.tokenize == a.texts, a.examples
    finally:
        ref.close()


_VOCAB: list[object] = []


def _small_vocab():  # type: ignore[no-untyped-def]
    if not _VOCAB:
        _VOCAB.append(train_vocabulary("llama3", 2000, corpus_bytes=200_000))
    return _VOCAB[0]


def test_llama_cpp_refuses_what_we_refuse(tmp_path: Path) -> None:
    """An unknown pre-tokenizer: llama.cpp fails to load the vocabulary too (we say so in one line)."""
    path = write_vocab_gguf(tmp_path / "bad.gguf", dataclasses.replace(_small_vocab(), pre="nonsense"))
    with pytest.raises(ValueError):
        LlamaCppVocab(path)
