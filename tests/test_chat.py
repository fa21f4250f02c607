"""Chat templates (runtime/chat.py) render as transformers' apply_chat_template does, fail with one
clear line, and `primasim run --chat` / stop-at-EOS work end to end, on one device and a cluster."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from primasim.core.errors import CheckpointError, SpecError
from primasim.runtime import generate, load_params, open_checkpoint
from primasim.runtime.chat import chat_prompt_ids, render_chat
from primasim.runtime.tokenizer import Tokenizer, load_tokenizer
from primasim.runtime.vocabularies import (
    CHATML_TEMPLATE,
    LLAMA2_TEMPLATE,
    LLAMA3_TEMPLATE,
    cached_vocab_model,
    train_vocabulary,
    write_vocab_gguf,
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, who are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  2 + 2?  "},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "Ünïcode ☕ 日本語"}],
]


def primasim(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "primasim", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("style", ["llama3", "qwen2", "spm"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_templates_render_and_tokenize_as_transformers(style: str, conv: int) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(cached_vocab_model(style))
    assert tok is not None and tok.chat_template in (LLAMA3_TEMPLATE, CHATML_TEMPLATE, LLAMA2_TEMPLATE)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.hf, bos_token=tok.bos_token or None, eos_token=tok.eos_token)
    messages = CONVERSATIONS[conv]
    text = hf.apply_chat_template(messages, chat_template=tok.chat_template, tokenize=False,
                                  add_generation_prompt=True)
    assert render_chat(tok.chat_template, messages, bos_token=tok.bos_token, eos_token=tok.eos_token) == text
    theirs = hf.apply_chat_template(messages, chat_template=tok.chat_template, tokenize=True,
                                    add_generation_prompt=True, return_dict=False)
    assert chat_prompt_ids(tok, messages) == list(theirs)


def test_template_errors_are_one_line() -> None:
    tok = load_tokenizer(cached_vocab_model("spm"))
    assert tok is not None
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(CheckpointError, match="roles must alternate"):
        chat_prompt_ids(tok, two_users)  # Llama 2's template raises through raise_exception
    with pytest.raises(CheckpointError, match="does not parse"):
        render_chat("{% for m in messages %}{{ m.content }", CONVERSATIONS[0])
    with pytest.raises(CheckpointError, match="unsafe"):  # the sandbox refuses reaching into Python
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", CONVERSATIONS[0])
    with pytest.raises(CheckpointError, match="cannot be changed|unsafe"):  # and mutating the messages
        render_chat("{{ messages.append(1) }}", CONVERSATIONS[0])
    no_template = dataclasses.replace(tok, chat_template=None)
    with pytest.raises(SpecError, match="has no chat template") as err:
        chat_prompt_ids(no_template, CONVERSATIONS[0])
    assert "--chat-template" in str(err.value)


def test_tojson_keeps_text_and_generation_blocks_render() -> None:
    tpl = "{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
    out = render_chat(tpl, [{"role": "user", "content": "café"}])
    assert json.loads(out) == {"role": "user", "content": "café"} and "café" in out


# ---------------------------------------------------------------------------- stop at end of generation
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a trained Llama 3-style vocabulary and chat template."""
    return write_vocab_gguf(tmp_path_factory.mktemp("chat") / "chat.gguf", train_vocabulary("llama3", 1200,
                                                                                              corpus_bytes=120_000))


def _with_eos(model: Path, eos: int, out: Path) -> Path:
    """The same weights (same seed) with `eos` as the end-of-generation token."""
    from primasim.core.gguf import read_metadata
    from primasim.runtime.vocabularies import Vocabulary

    meta = read_metadata(model, ("tokenizer.",))
    tokens = [b.decode() for b in meta["tokenizer.ggml.tokens"]]
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    for i in range(len(tokens)):  # no other end-of-generation tokens
        if tokens[i] in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"):
            tokens[i] = f"<|renamed_{i}|>"
    v = Vocabulary("gpt2", "llama-bpe", tokens, types, [b.decode() for b in meta["tokenizer.ggml.merges"]],
                   bos_id=int(meta["tokenizer.ggml.bos_token_id"]), eos_id=eos, style="llama3")
    return write_vocab_gguf(out, v)


def test_single_device_engine_stops_at_the_models_stop_ids(chat_model: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(chat_model)
    assert tok is not None
    ckpt = open_checkpoint(chat_model)
    params = load_params(ckpt, range(ckpt.spec.n_layers), embed=True, head=True)
    prompt = tok.encode("Hello there")
    free = generate(params, prompt, 12).tokens
    stop_at = free[5]
    tok2 = load_tokenizer(_with_eos(chat_model, stop_at, tmp_path / "eos.gguf"))
    assert tok2 is not None and tok2.stop_ids() == (stop_at,)
    got = generate(params, prompt, 12, stop=tok2.stop_ids()).tokens
    assert got == free[:free.index(stop_at) + 1]


def test_run_chat_formats_the_prompt_and_streams_the_answer(chat_model: Path) -> None:
    base = ["run", "--cluster", "local", "--model", str(chat_model), "--tokens", "10", "--no-emulate",
            "--prompt", "What is 2+2?", "--chat", "--ignore-eos"]
    r = primasim(*base, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    tok = load_tokenizer(chat_model)
    assert tok is not None
    assert out["prompt_ids"][:2] == [tok.bos_id, tok.token_to_id("<|start_header_id|>")]
    assert out["prompt_ids"][-2:] == tok.encode("<|end_header_id|>\n\n", add_special=False, parse_special=True)
    assert len(out["token_ids"]) == 10 and out["finish_reason"] == "length"
    assert out["text"] == tok.decode(out["token_ids"], at_start=False)
    human = primasim(*base)  # what a user sees: the answer streamed token by token (the template is not echoed)
    assert human.returncode == 0, human.stderr
    assert human.stdout.startswith(out["text"] + "\n")


TWO_DEVICES = 'base = "home-emu"\nuse = ["desktop", "laptop"]\n'  # run as plain processes (--no-emulate)


def test_run_stops_at_the_models_end_of_generation_token_on_a_cluster(chat_model: Path, tmp_path: Path) -> None:
    """Two worker processes, the model split between them: the head device stops sampling at EOS."""
    cluster = tmp_path / "two.toml"
    cluster.write_text(TWO_DEVICES)
    base = ["run", "--cluster", str(cluster), "--system", "even", "--tokens", "10", "--no-emulate",
            "--prompt", "Hello there", "--json"]
    free = primasim(*base, "--model", str(chat_model), "--ignore-eos")
    assert free.returncode == 0, free.stderr
    out = json.loads(free.stdout)
    assert len(out["plan"]["devices"]) == 2
    ids = out["token_ids"]
    stop_at = ids[3]
    r = primasim(*base, "--model", str(_with_eos(chat_model, stop_at, tmp_path / "eos.gguf")))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["token_ids"] == ids[:ids.index(stop_at) + 1] and got["finish_reason"] == "stop"


def test_run_without_a_template_or_with_junk_says_so_in_one_line(chat_model: Path, tmp_path: Path) -> None:
    from primasim.core.gguf import read_metadata
    from primasim.runtime.vocabularies import Vocabulary

    meta = read_metadata(chat_model, ("tokenizer.",))
    v = Vocabulary("gpt2", "llama-bpe", [b.decode() for b in meta["tokenizer.ggml.tokens"]],
                   [int(t) for t in meta["tokenizer.ggml.token_type"]],
                   [b.decode() for b in meta["tokenizer.ggml.merges"]], bos_id=int(meta["tokenizer.ggml.bos_token_id"]),
                   eos_id=int(meta["tokenizer.ggml.eos_token_id"]), style="llama3")
    plain = write_vocab_gguf(tmp_path / "plain.gguf", v)
    r = primasim("run", "--cluster", "local", "--model", str(plain), "--prompt", "hi", "--chat", "--no-emulate")
    assert r.returncode == 2 and "has no chat template" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    junk = write_vocab_gguf(tmp_path / "junk.gguf", dataclasses.replace(v, pre="nonsense"))
    r = primasim("run", "--cluster", "local", "--model", str(junk), "--prompt", "hi", "--no-emulate")
    assert r.returncode == 2 and "tokenizer.ggml.pre 'nonsense'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_streamed_tokens_of_a_sentencepiece_model_keep_their_spaces(tmp_path: Path) -> None:
    """Token by token, as `primasim run` prints them: spaces between words and multi-byte
    characters intact, identical to decoding the whole continuation."""
    tok: Tokenizer | None = load_tokenizer(cached_vocab_model("spm"))
    assert tok is not None
    rng = np.random.default_rng(0)
    text = "The café served 日本語 tea \U0001FAE0 at 12:30, twice."
    ids = tok.encode(text, add_special=False)
    s = tok.stream()
    chunks = [s.push(i) for i in ids] + [s.flush()]
    assert "".join(chunks) == " " + text
    shuffled = list(rng.permutation(ids))
    s = tok.stream()
    assert "".join([s.push(int(i)) for i in shuffled] + [s.flush()]) == tok.decode(shuffled, at_start=False)
