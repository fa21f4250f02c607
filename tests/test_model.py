"""ModelSpec: catalogue, byte/FLOP accounting, Hugging Face configs, GGUF metadata, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from primasim import SpecError
from primasim.core.model import GGML_BLOCK, ModelSpec
from primasim.core.model_sources import (
    catalogue,
    from_gguf,
    from_hf_config,
    from_hf_config_file,
    load_model,
)

TABLE4 = ["llama3-8b", "llama3-14b", "llama1-30b", "llama3-45b", "llama3-60b", "llama1-65b", "llama3-70b"]


def test_catalogue_has_every_paper_model() -> None:
    cat = catalogue()
    for name in TABLE4 + ["qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b", "tinyllama-1.1b", "nanollama-304m"]:
        assert name in cat, name
    for name, spec in cat.items():
        assert spec.n_layers > 0 and spec.layer_bytes > 0, name


def test_block_sizes_match_the_gguf_package() -> None:
    for name, (per_block, nbytes) in GGML_BLOCK.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == (per_block, nbytes), name


def test_q4k_sizes_are_those_of_the_paper() -> None:
    # paper: Llama 3-8B Q4K needs 5.3 GiB VRAM with buffers; 70B Q4K is about 40 GiB
    m8, m70 = load_model("llama3-8b", "q4k"), load_model("llama3-70b", "q4k")
    assert 4.5e9 < m8.total_bytes < 5.0e9
    assert 39 * 2**30 < m70.total_bytes < 41 * 2**30
    # the quantisations order as their bits per weight
    sizes = [load_model("llama3-8b", q).total_bytes for q in ("q4k", "q8_0", "f16", "f32")]
    assert sizes == sorted(sizes)


def test_kv_bytes_are_gqa_aware_and_flops_grow_with_context() -> None:
    m = load_model("llama3-70b")
    assert m.kv_bytes_per_token() == 2 * 8 * 128 * 2  # K and V, 8 KV heads of 128, F16
    m30 = load_model("llama1-30b")
    assert m30.kv_bytes_per_token() == 2 * 6656 * 2  # no GQA: 52 KV heads of 128
    assert m.layer_bytes_with_kv(1024) == m.layer_bytes + 1024 * m.kv_bytes_per_token()
    f1, f2 = m.layer_flops(256), m.layer_flops(4096)
    assert sum(f2.values()) > sum(f1.values())
    assert f2["q4k"] == f1["q4k"]  # weight matmuls do not depend on the context


def _write_gguf(path: Path, spec: ModelSpec, ggml_type: gguf.GGMLQuantizationType) -> None:
    w = gguf.GGUFWriter(str(path), spec.family)
    w.add_block_count(spec.n_layers)
    w.add_embedding_length(spec.hidden)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_context_length(spec.max_context)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    w.add_file_type({gguf.GGMLQuantizationType.F32: 0, gguf.GGMLQuantizationType.Q8_0: 7}[ggml_type])
    w.add_vocab_size(spec.vocab)
    rng = np.random.default_rng(0)
    for t in spec.tensors():
        arr = rng.standard_normal(t.shape).astype(np.float32)
        st_type = gguf.GGMLQuantizationType[t.storage_type]
        if st_type == gguf.GGMLQuantizationType.F16:
            w.add_tensor(t.name, arr.astype(np.float16))
        elif st_type != gguf.GGMLQuantizationType.F32:
            w.add_tensor(t.name, gguf.quants.quantize(arr, st_type), raw_dtype=st_type)
        else:
            w.add_tensor(t.name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0])
def test_gguf_round_trip(tmp_path: Path, qtype: gguf.GGMLQuantizationType) -> None:
    quant = "f32" if qtype == gguf.GGMLQuantizationType.F32 else "q8_0"
    spec = load_model("llama-tiny", quant)  # ffn = 344: some rows do not divide into Q8_0 blocks
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, spec, qtype)
    got = from_gguf(path)
    for f in ("family", "n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab", "max_context"):
        assert getattr(got, f) == getattr(spec, f), f
    assert got.rope_theta == pytest.approx(spec.rope_theta)
    assert got.quant == quant
    # bytes measured from the file's tensors equal the ones derived from shapes and ggml types
    assert got.layer_bytes == pytest.approx(spec.layer_bytes)
    assert got.input_bytes == pytest.approx(spec.input_bytes)
    assert got.output_bytes == pytest.approx(spec.output_bytes)
    assert load_model(path).n_layers == spec.n_layers


def test_gguf_bad_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF not really" * 10)
    with pytest.raises(SpecError, match="junk.gguf"):
        from_gguf(junk)
    with pytest.raises(SpecError, match="not found"):
        from_gguf(tmp_path / "missing.gguf")


# ---------------------------------------------------------------------------- Hugging Face configs
def test_hf_config_round_trip() -> None:
    for name in ("llama3-8b", "qwen2.5-7b", "llama3.1-8b"):
        spec = load_model(name, "f16")
        back = from_hf_config(spec.to_hf_config(), name=name)
        assert (back.n_layers, back.hidden, back.n_kv_heads, back.ffn, back.vocab, back.family) == \
            (spec.n_layers, spec.hidden, spec.n_kv_heads, spec.ffn, spec.vocab, spec.family)
        assert back.with_quant(spec.quant).layer_bytes == spec.layer_bytes  # to_hf_config says float32


def test_unknown_model_name() -> None:
    with pytest.raises(SpecError) as e:
        load_model("llama-9000b")
    msg = e.value.message
    assert "--model" in msg and "llama-9000b" in msg and "llama3-70b" in msg  # names the field and the choices


def test_unsupported_architecture(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 12}))
    with pytest.raises(SpecError) as e:
        load_model(p)
    assert str(p) in e.value.message and "model_type" in e.value.message and "Llama" in e.value.message


@pytest.mark.parametrize("drop", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"])
def test_incomplete_config(tmp_path: Path, drop: str) -> None:
    cfg = load_model("llama3-8b").to_hf_config()
    del cfg[drop]
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match=drop):
        from_hf_config_file(p)


def test_negative_sizes_and_bad_json(tmp_path: Path) -> None:
    cfg = load_model("llama3-8b").to_hf_config() | {"num_hidden_layers": -4}
    with pytest.raises(SpecError, match="n_layers"):
        from_hf_config(cfg)
    p = tmp_path / "config.json"
    p.write_text("{ not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        from_hf_config_file(p)
    p.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(SpecError):
        from_hf_config_file(p)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                           | st.text(max_size=8), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=6)
HF_KEYS = ["model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
           "intermediate_size", "vocab_size", "head_dim", "rope_theta", "rope_scaling", "rms_norm_eps",
           "max_position_embeddings", "tie_word_embeddings", "torch_dtype", "sliding_window", "use_sliding_window"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(HF_KEYS), json_values, max_size=len(HF_KEYS)),
       st.sampled_from(["llama", "qwen2", "mistral", "gpt2", None]))
def test_hf_config_parser_never_crashes(cfg: dict, mt: str | None) -> None:
    base = load_model("llama-tiny").to_hf_config()
    merged = {**base, **cfg}
    if mt is not None:
        merged["model_type"] = mt
    try:
        spec = from_hf_config(merged)
    except SpecError:
        return
    assert spec.n_layers > 0 and spec.layer_bytes > 0


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_config_file_parser_never_crashes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    p = tmp_path_factory.mktemp("cfg") / "config.json"
    p.write_bytes(data)
    with pytest.raises(SpecError):
        from_hf_config_file(p)
