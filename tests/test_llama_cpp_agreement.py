"""Our runtime and llama.cpp on the same GGUF files (optional: llama-cpp-python, `.[bench]`).

Both quantise activations the same way (Q8_K / Q8_0 with an f16 scale, f16 for F16 weights), so
greedy decoding should agree for as long as float summation order leaves the argmax alone.
Random-weight models have near-tied logits, which is what limits it. The F16 file is ours, the
Q4_K_M file is llama.cpp's own (llama_model_quantize of our F32 file).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from primasim.core.model import ModelSpec
from primasim.runtime import (
    generate,
    kernels as K,
    load_params,
    open_checkpoint,
    write_random_checkpoint,
)

llama_cpp = pytest.importorskip("llama_cpp", reason="optional extra 'bench' (llama-cpp-python) not installed")
pytestmark = pytest.mark.skipif(not K.available(), reason="compiled kernels not built (pip install -e .)")

SPEC = ModelSpec(name="agree", family="llama", n_layers=4, hidden=256, n_heads=4, n_kv_heads=2, head_dim=64,
                 ffn=768, vocab=512, quant="f32")
PROMPT = [1, 17, 300, 42, 99, 5, 260, 77]
N = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("agree")
    f32 = write_random_checkpoint(SPEC, d / "f32.gguf", fmt="gguf", seed=5)
    f16 = write_random_checkpoint(dataclasses.replace(SPEC, quant="f16"), d / "f16.gguf", fmt="gguf", seed=5)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(d / "q4_k_m.gguf").encode(), params) == 0
    return {"f32": f32, "f16": f16, "q4_k_m": d / "q4_k_m.gguf"}


def theirs(path: Path) -> tuple[list[int], np.ndarray]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, n_batch=len(PROMPT), verbose=False)
    logits = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()  # noqa: E731
    llm.eval(PROMPT)
    first = logits()
    out = [int(np.argmax(first))]
    while len(out) < N:
        llm.eval([out[-1]])
        out.append(int(np.argmax(logits())))
    return out, first


def ours(path: Path) -> tuple[list[int], np.ndarray]:
    ckpt = open_checkpoint(path)
    g = generate(load_params(ckpt, range(ckpt.spec.n_layers), embed=True, head=True), PROMPT, N, keep_logits=True)
    return g.tokens, g.logits[0]


def agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("fmt", ["f32", "f16", "q4_k_m"])
def test_greedy_tokens_and_logits_agree_with_llama_cpp(files: dict[str, Path], fmt: str) -> None:
    (a, la), (b, lb) = ours(files[fmt]), theirs(files[fmt])
    assert np.corrcoef(la, lb)[0, 1] >= 0.999
    assert agree(a, b) >= 16, (a, b)
