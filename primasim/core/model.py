"""ModelSpec: the architecture of a Llama/Qwen2-family model and what a quantisation makes of it.

One record, three sources: the built-in catalogue (data/models/catalogue.toml), a Hugging Face
`config.json`, or a GGUF file's metadata. Everything the cost model, the simulator and the runtime
need (bytes per layer, FLOPs per token, KV bytes per token) is derived here, from tensor shapes, so
the three halves of the toolkit count the same bytes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from .errors import SpecError

Family = Literal["llama", "qwen2"]

# ggml block formats: (elements per block, bytes per block). From ggml's type traits; checked
# against the `gguf` package's GGML_QUANT_SIZES in tests.
GGML_BLOCK: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}

# Our short dtype names (used as keys of FLOPS tables) <-> ggml type names.
DTYPE_OF_GGML = {"F32": "f32", "F16": "f16", "BF16": "f16", "Q8_0": "q8_0", "Q4_0": "q4_0",
                 "Q4_K": "q4k", "Q5_K": "q5k", "Q6_K": "q6k"}

QUANTS: tuple[str, ...] = ("f32", "f16", "q8_0", "q4k")
QUANT_HELP = "f32, f16, q8_0 or q4k (llama.cpp's Q4_K_M tensor mix)"

KV_BYTES_PER_ELEMENT = 2  # llama.cpp and prima.cpp keep the KV cache in F16
# Bytes per KV-cache element per `ModelSpec.kv_dtype`: primasim's runtime keeps its cache in f32.
KV_DTYPE_BYTES: dict[str, int] = {"f16": 2, "f32": 4}


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style RoPE frequency scaling (`rope_type = "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


@dataclass(frozen=True)
class Tensor:
    """One weight tensor: GGUF name, shape (ggml order reversed, i.e. PyTorch's (out, in)), type."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def storage_type(self) -> str:
        """The ggml type actually stored. Blocks run along a row, so a row length the block does
        not divide falls back as llama-quant.cpp does (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, else
        F16; F16 too if the fallback's block does not divide either)."""
        t = self.ggml_type
        row = self.shape[-1]
        if row % GGML_BLOCK[t][0] == 0:
            return t
        t = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}.get(t, "F16")
        return t if row % GGML_BLOCK[t][0] == 0 else "F16"

    @property
    def nbytes(self) -> int:
        per_block, block_bytes = GGML_BLOCK[self.storage_type]
        return self.n_elements // per_block * block_bytes

    @property
    def dtype(self) -> str:
        return DTYPE_OF_GGML[self.ggml_type]


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule for which layers get more bits in *_K_M mixes."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only Llama/Qwen2 model plus the quantisation of its weights."""

    name: str = field(metadata={"help": "catalogue name or file the spec came from"})
    family: Family = field(metadata={"help": "llama or qwen2 (QKV bias)"})
    n_layers: int = field(metadata={"help": "transformer blocks L"})
    hidden: int = field(metadata={"help": "embedding size e"})
    n_heads: int = field(metadata={"help": "query heads"})
    n_kv_heads: int = field(metadata={"help": "key/value heads (GQA)"})
    head_dim: int = field(metadata={"help": "per-head dimension"})
    ffn: int = field(metadata={"help": "SwiGLU intermediate size f"})
    vocab: int = field(metadata={"help": "vocabulary size V"})
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    max_context: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    quant: str = field(default="f16", metadata={"help": QUANT_HELP})
    source: str = field(default="", compare=False, metadata={"help": "where this spec came from"})
    # Bytes measured from a real file (GGUF) override the mix-derived ones: (layer avg, input, output).
    measured_bytes: tuple[float, float, float] | None = field(default=None, compare=False)
    # What the engine that runs the model allocates besides the weights (additive knobs; the
    # defaults are llama.cpp's, which the planners and the paper comparisons assume).
    kv_dtype: str = field(default="f16", metadata={
        "help": "element type of the KV cache: f16 (llama.cpp, prima.cpp) or f32 (primasim's runtime)"})
    buffer_bytes: float | None = field(default=None, metadata={
        "help": "compute-buffer bytes the engine allocates; None = llama.cpp's estimate (compute_buffer_bytes)"})

    def __post_init__(self) -> None:
        for f in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise SpecError(f"field '{f}' must be a positive integer, got {v!r}",
                                where=f"model {self.name}", fix=f"set '{f}' to the architecture's value")
        if self.n_heads % self.n_kv_heads:
            raise SpecError(f"n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})",
                            where=f"model {self.name}", fix="check num_key_value_heads")
        if self.quant not in QUANTS and self.quant not in ("q6k", "q5k", "q4_0", "mixed"):
            raise SpecError(f"unknown quantisation {self.quant!r}", where=f"model {self.name}",
                            fix=f"use one of {QUANT_HELP}")
        if self.kv_dtype not in KV_DTYPE_BYTES:
            raise SpecError(f"unknown KV-cache dtype {self.kv_dtype!r}", where=f"model {self.name}",
                            fix=f"use one of {', '.join(KV_DTYPE_BYTES)}")
        if self.buffer_bytes is not None and not self.buffer_bytes >= 0:
            raise SpecError(f"buffer_bytes must be >= 0, got {self.buffer_bytes!r}", where=f"model {self.name}",
                            fix="give the engine's compute-buffer size in bytes, or None")

    # ------------------------------------------------------------------ derived architecture
    def with_quant(self, quant: str | None) -> ModelSpec:
        """The same architecture under another quantisation (None keeps the current one)."""
        if quant is None or quant == self.quant:
            return self
        q = quant.lower().replace("-", "_")
        q = {"q4_k_m": "q4k", "q4km": "q4k", "q4_k": "q4k", "q80": "q8_0", "fp16": "f16",
             "fp32": "f32", "float32": "f32", "float16": "f16"}.get(q, q)
        if q not in QUANTS:
            raise SpecError(f"unknown quantisation {quant!r}", where="--quant", fix=f"use one of {QUANT_HELP}")
        return dataclasses.replace(self, quant=q, measured_bytes=None)

    @property
    def n_kv_embd(self) -> int:
        """Width of K (and of V) per token per layer: h_k * e_k."""
        return self.n_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    def _ggml_type(self, role: str, layer: int | None) -> str:
        """Weight type of a 2-D tensor under this spec's quantisation (llama.cpp's choices)."""
        q = self.quant
        if q == "f32":
            return "F32"
        if q == "f16":
            return "F16"
        if q == "q8_0":
            return "Q8_0"
        if q == "q6k":
            return "Q6_K"
        if q == "q5k":
            return "Q5_K"
        if q == "q4_0":
            return "Q6_K" if role == "output" else "Q4_0"
        # q4k: Q4_K_M (llama-quant.cpp, llama_tensor_get_type)
        if role == "output":
            return "Q6_K"
        if role == "token_embd":  # tied: the embedding is also the output layer, which gets Q6_K
            return "Q6_K" if self.tie_embeddings else "Q4_K"
        assert layer is not None
        if role == "attn_v":
            if _use_more_bits(layer, self.n_layers):
                return "Q6_K"
            # "In the 70B model we have 8 heads sharing the same attn_v weights" -> Q5_K
            if self.n_layers == 80 and self.n_heads // self.n_kv_heads >= 8:
                return "Q5_K"
            return "Q4_K"
        if role == "ffn_down" and _use_more_bits(layer, self.n_layers):
            return "Q6_K"
        return "Q4_K"

    def layer_tensors(self, layer: int) -> list[Tensor]:
        """The tensors of block `layer`, GGUF-named, with shapes (out, in)."""
        e, f = self.hidden, self.ffn
        t = lambda role, shape: Tensor(f"blk.{layer}.{role}.weight", shape, self._ggml_type(role, layer))  # noqa: E731
        out = [
            Tensor(f"blk.{layer}.attn_norm.weight", (e,), "F32"),
            t("attn_q", (self.q_dim, e)),
            t("attn_k", (self.n_kv_embd, e)),
            t("attn_v", (self.n_kv_embd, e)),
            t("attn_output", (e, self.q_dim)),
            Tensor(f"blk.{layer}.ffn_norm.weight", (e,), "F32"),
            t("ffn_gate", (f, e)),
            t("ffn_up", (f, e)),
            t("ffn_down", (e, f)),
        ]
        if self.qkv_bias:
            out += [Tensor(f"blk.{layer}.attn_q.bias", (self.q_dim,), "F32"),
                    Tensor(f"blk.{layer}.attn_k.bias", (self.n_kv_embd,), "F32"),
                    Tensor(f"blk.{layer}.attn_v.bias", (self.n_kv_embd,), "F32")]
        return out

    def input_tensors(self) -> list[Tensor]:
        return [Tensor("token_embd.weight", (self.vocab, self.hidden), self._ggml_type("token_embd", None))]

    def output_tensors(self) -> list[Tensor]:
        out = [Tensor("output_norm.weight", (self.hidden,), "F32")]
        if not self.tie_embeddings:
            out.append(Tensor("output.weight", (self.vocab, self.hidden), self._ggml_type("output", None)))
        return out

    def tensors(self) -> Iterator[Tensor]:
        yield from self.input_tensors()
        for i in range(self.n_layers):
            yield from self.layer_tensors(i)
        yield from self.output_tensors()

    # ------------------------------------------------------------------ bytes
    def layer_bytes_of(self, layer: int) -> int:
        return sum(t.nbytes for t in self.layer_tensors(layer))

    @cached_property
    def layer_bytes_list(self) -> tuple[int, ...]:
        return tuple(self.layer_bytes_of(i) for i in range(self.n_layers))

    def block_bytes(self, layer: int) -> float:
        """Bytes of block `layer`'s weights as the file holds them: a mixed quantisation makes blocks
        unequal (Q4_K_M gives attn_v and ffn_down Q6_K in a third of the middle layers and the first
        and last eighths: 13 % more bytes there for llama-mini-300m); measured sizes (a GGUF file's)
        scale them to the measured mean. Planners use the mean (`layer_bytes`), as prima.cpp does."""
        b = float(self.layer_bytes_list[layer])
        mean = sum(self.layer_bytes_list) / self.n_layers
        return b * self.layer_bytes / mean if mean else b

    @property
    def layer_bytes(self) -> float:
        """b: average bytes of one block's weights (prima.cpp averages over layers)."""
        if self.measured_bytes:
            return self.measured_bytes[0]
        return sum(self.layer_bytes_list) / self.n_layers

    @property
    def input_bytes(self) -> float:
        """b_i: bytes of the token-embedding table (only one row, b_i/V, is read per token)."""
        if self.measured_bytes:
            return self.measured_bytes[1]
        return float(sum(t.nbytes for t in self.input_tensors()))

    @property
    def output_bytes(self) -> float:
        """b_o: bytes of output norm + output projection (the tied embedding when tied)."""
        if self.measured_bytes:
            return self.measured_bytes[2]
        out = float(sum(t.nbytes for t in self.output_tensors()))
        if self.tie_embeddings:
            out += self.input_bytes
        return out

    @property
    def total_bytes(self) -> float:
        """Bytes of all weights as stored (a tied embedding counted once)."""
        tied_extra = self.input_bytes if self.tie_embeddings else 0.0
        return self.layer_bytes * self.n_layers + self.input_bytes + self.output_bytes - tied_extra

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors())

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token adds to one layer's cache (`kv_dtype`, F16 by default; GQA-aware)."""
        return 2 * self.n_kv_embd * KV_DTYPE_BYTES[self.kv_dtype]

    def layer_bytes_with_kv(self, n_ctx: int) -> float:
        """b' = b + 2(h_k e_k + h_v e_v) n_kv: a layer's weights plus its full KV cache."""
        return self.layer_bytes + self.kv_bytes_per_token() * n_ctx

    @property
    def hidden_bytes(self) -> int:
        """Bytes of one token's hidden state on the wire (FP32, as prima.cpp sends it)."""
        return 4 * self.hidden

    def compute_buffer_bytes(self, n_ctx: int, n_ubatch: int = 512) -> float:
        """Estimate of llama.cpp's compute buffer (activations of one ubatch + logits), or the
        engine's own figure when `buffer_bytes` is set."""
        if self.buffer_bytes is not None:
            return float(self.buffer_bytes)
        acts = n_ubatch * (2 * self.hidden + 2 * self.ffn) + self.n_heads * min(n_ctx, 4096) * n_ubatch
        return 4.0 * (acts + self.vocab)

    # ------------------------------------------------------------------ FLOPs
    def layer_flops(self, n_ctx: int, n_tokens: int = 1) -> dict[str, float]:
        """FLOPs of one block for `n_tokens` new tokens attending to `n_ctx` positions, by dtype.

        Weight matmuls count in the weight's dtype, attention (KQ, KQV) in f16 as ggml does,
        element-wise work (norms, RoPE, softmax, SiLU, residuals) in f32.
        """
        out: dict[str, float] = {}

        def add(dtype: str, flops: float) -> None:
            out[dtype] = out.get(dtype, 0.0) + flops

        for t in self.layer_tensors(0 if self.n_layers == 1 else self.n_layers // 2):
            if len(t.shape) == 2:
                add(t.dtype, 2.0 * t.n_elements * n_tokens)
        e, f, nh, d = self.hidden, self.ffn, self.n_heads, self.head_dim
        add("f16", 4.0 * nh * d * n_ctx * n_tokens)  # KQ and KQV
        elementwise = 2 * (4 * e + 1) + 2.5 * (nh + self.n_kv_heads) * d + 7 * nh * n_ctx + 9 * f + 2 * e
        add("f32", float(elementwise * n_tokens))
        return out

    def layer_flops_avg(self, n_ctx: int) -> dict[str, float]:
        """Per-layer FLOPs averaged over the mixed-precision layers (the cost model's f_m^q)."""
        tot: dict[str, float] = {}
        attn = self.layer_flops(n_ctx)
        # keep only attention + element-wise work of layer_flops: with f16/f32 weights its f16/f32
        # entries also hold the middle layer's weight matmuls, which the loop below averages in
        for t in self.layer_tensors(0 if self.n_layers == 1 else self.n_layers // 2):
            if len(t.shape) == 2 and t.dtype in ("f16", "f32"):
                attn[t.dtype] -= 2.0 * t.n_elements
        for k in ("f16", "f32"):
            tot[k] = attn.get(k, 0.0)
        n = self.n_layers
        for i in range(n):
            for t in self.layer_tensors(i):
                if len(t.shape) == 2:
                    tot[t.dtype] = tot.get(t.dtype, 0.0) + 2.0 * t.n_elements / n
        return tot

    def output_flops(self) -> dict[str, float]:
        """FLOPs of the output norm + projection + softmax for one token."""
        w = self.input_tensors()[0] if self.tie_embeddings else self.output_tensors()[-1]
        return {w.dtype: 2.0 * w.n_elements, "f32": float(5 * self.hidden + 5 * self.vocab)}

    def flops_per_token(self, n_ctx: int) -> float:
        per_layer = sum(self.layer_flops_avg(n_ctx).values())
        return per_layer * self.n_layers + sum(self.output_flops().values())

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name, "family": self.family, "quant": self.quant, "n_layers": self.n_layers,
            "hidden": self.hidden, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "ffn": self.ffn, "vocab": self.vocab, "params": self.n_params,
            "layer_bytes": self.layer_bytes, "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes, "total_bytes": self.total_bytes,
            "kv_bytes_per_token_per_layer": self.kv_bytes_per_token(),
        }

    def to_hf_config(self) -> dict[str, Any]:
        """A Hugging Face config.json dict for this architecture (used by the checkpoint writer)."""
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM" if self.family == "llama" else "Qwen2ForCausalLM"],
            "model_type": self.family,
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_context,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        if self.family == "llama":
            cfg["attention_bias"] = False
            cfg["mlp_bias"] = False
        if self.rope_scaling:
            rs = self.rope_scaling
            cfg["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor,
                                   "low_freq_factor": rs.low_freq_factor,
                                   "high_freq_factor": rs.high_freq_factor,
                                   "original_max_position_embeddings": rs.original_max_position}
        return cfg


