"""Where a ModelSpec comes from: the built-in catalogue (data/models/catalogue.toml), a Hugging Face
`config.json` (Llama and Qwen2 families) or a GGUF file's header (read by `primasim.core.gguf`, bounds-
checked); `load_model` resolves a name or a path to one of them.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

from .errors import SpecError
from .gguf import GGUFHeader, read_header
from .model import ModelSpec, RopeScaling
from .paths import data_dir

# ---------------------------------------------------------------------------- loaders
_CATALOGUE_FIELDS = {f.name for f in dataclasses.fields(ModelSpec)} - {"name", "source", "measured_bytes"}


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def _load_catalogue(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    path = Path(path) if path is not None else data_dir() / "models" / "catalogue.toml"
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    # TOMLDecodeError and over-long integers are ValueErrors; deep nesting overflows tomllib's recursion
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise SpecError(f"not a valid TOML model catalogue ({type(exc).__name__}: {str(exc)[:200]})", where=str(path),
                        fix="fix the TOML syntax (see data/models/catalogue.toml)") from None
    except OSError as exc:
        raise SpecError(f"cannot read the catalogue ({exc.strerror})", where=str(path), fix="check the path") from None
    return raw


def catalogue(path: str | Path | None = None) -> dict[str, ModelSpec]:
    """Every model of a catalogue file (default: the built-in one), by canonical name (f16 weights
    unless the entry says otherwise)."""
    out = {}
    for name, entry in _load_catalogue(path).items():
        out[name] = _spec_from_entry(name, entry)
    return out


def _spec_from_entry(name: str, entry: dict[str, Any]) -> ModelSpec:
    where = f"model catalogue entry [{name}]"
    if not isinstance(entry, dict):
        raise SpecError(f"expected a table, got {type(entry).__name__}", where=where,
                        fix="write each model as a [name] table (see data/models/catalogue.toml)")
    try:
        kw = {k: v for k, v in entry.items() if k in _CATALOGUE_FIELDS}
        if "rope_scaling" in kw and kw["rope_scaling"] is not None:
            kw["rope_scaling"] = RopeScaling(**kw["rope_scaling"])
        kw.setdefault("head_dim", entry["hidden"] // entry["n_heads"])
        src = entry.get("hf_id", "")
        return ModelSpec(name=name, source=f"catalogue ({src})" if src else "catalogue", **kw)
    except SpecError:
        raise
    except KeyError as exc:
        raise SpecError(f"missing field {exc}", where=where, fix="give hidden, n_heads and the other sizes") from None
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError) as exc:
        raise SpecError(f"a field has the wrong type or value ({type(exc).__name__}: {exc})", where=where,
                        fix="use positive integers for sizes and a table for rope_scaling") from None


def _catalogue_lookup(name: str) -> ModelSpec | None:
    wanted = _norm(name)
    for cname, entry in _load_catalogue().items():
        aliases = [_norm(cname)] + [_norm(a) for a in entry.get("aliases", [])]
        if wanted in aliases:
            return _spec_from_entry(cname, entry)
    return None


SUPPORTED_HF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def from_hf_config(cfg: dict[str, Any], *, name: str = "hf-model", where: str = "config.json") -> ModelSpec:
    """ModelSpec from a Hugging Face config dict (Llama and Qwen2 families)."""
    if not isinstance(cfg, dict):
        raise SpecError("expected a JSON object", where=where, fix="give a Hugging Face config.json")
    try:
        return _from_hf_config(cfg, name=name, where=where)
    except SpecError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError, OverflowError) as exc:
        # junk values (lists for sizes, a string rope_scaling, zero heads, ...)
        raise SpecError(f"a field has the wrong type or value ({type(exc).__name__}: {exc})", where=where,
                        fix="compare with the model's original config.json") from None


def _from_hf_config(cfg: dict[str, Any], *, name: str, where: str) -> ModelSpec:
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_HF:
        raise SpecError(f"unsupported architecture model_type={mt!r} (architectures={cfg.get('architectures')})",
                        where=where, fix="primasim supports the Llama and Qwen2 families "
                        "(model_type 'llama', 'mistral' or 'qwen2')")
    family = SUPPORTED_HF[mt]

    def need(key: str) -> Any:
        if key not in cfg:
            raise SpecError(f"missing field '{key}'", where=where,
                            fix=f"add '{key}' as in the model's original config.json")
        return cfg[key]

    hidden = int(need("hidden_size"))
    n_heads = int(need("num_attention_heads"))
    rs = cfg.get("rope_scaling")
    scaling = None
    if rs:
        rtype = rs.get("rope_type", rs.get("type"))
        if rtype == "llama3":
            scaling = RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]),
                                  float(rs["high_freq_factor"]), int(rs["original_max_position_embeddings"]))
        elif rtype not in (None, "default"):
            raise SpecError(f"unsupported rope_scaling type {rtype!r}", where=where,
                            fix="only Llama 3's 'llama3' rope scaling is supported")
    if cfg.get("sliding_window") and cfg.get("use_sliding_window"):
        raise SpecError("sliding-window attention is not supported", where=where,
                        fix="set use_sliding_window to false")
    try:
        return ModelSpec(
            name=name,
            family=family,
            n_layers=int(need("num_hidden_layers")),
            hidden=hidden,
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or hidden // n_heads),
            ffn=int(need("intermediate_size")),
            vocab=int(need("vocab_size")),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5 if family == "llama" else 1e-6)),
            max_context=int(cfg.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            quant={"float32": "f32"}.get(str(cfg.get("torch_dtype", "")), "f16"),
            source=where,
        )
    except (TypeError, ValueError) as exc:
        raise SpecError(f"a field has the wrong type: {exc}", where=where, fix="use integers for sizes") from None


def from_hf_config_file(path: str | Path) -> ModelSpec:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise SpecError("file not found", where=str(p), fix="give a path to a config.json") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"not valid JSON ({exc.msg} at line {exc.lineno})", where=str(p),
                        fix="repair the file or re-download config.json") from None
    except UnicodeDecodeError:
        raise SpecError("not a UTF-8 text file", where=str(p), fix="give a Hugging Face config.json") from None
    except (ValueError, RecursionError) as exc:  # a number of > 4300 digits; nesting deeper than ~1000
        raise SpecError(f"not a usable JSON file ({type(exc).__name__}: {str(exc)[:200]})", where=str(p),
                        fix="repair the file or re-download config.json") from None
    except OSError as exc:
        raise SpecError(f"cannot read the file ({exc.strerror})", where=str(p), fix="check the path") from None
    if not isinstance(cfg, dict):
        raise SpecError("expected a JSON object", where=str(p), fix="give a Hugging Face config.json")
    name = p.parent.name or p.stem
    return from_hf_config(cfg, name=name, where=str(p))


_GGUF_FTYPE = {0: "f32", 1: "f16", 7: "q8_0", 15: "q4k", 18: "q6k", 17: "q5k", 2: "q4_0"}
def check_gguf_layout(path: str | Path) -> None:
    """Walk a GGUF file's header and raise ValueError unless every count, length and tensor extent
    fits inside the file (`primasim.core.gguf.read_header` without keeping anything). `gguf.GGUFReader`
    trusts these fields: an array length of 2**63 past the end of the data makes it loop for ever."""
    read_header(path, keep=lambda key: False)


# the vocabulary's arrays: what from_gguf needs of them is their length (read_header's counts)
_VOCAB_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                 "tokenizer.ggml.token_type")


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """What from_gguf and the runtime's checkpoint need of a GGUF file's header: every metadata
    entry but the vocabulary's arrays (their lengths are in `counts`), and the tensor infos."""
    return read_header(path, keep=lambda key: key not in _VOCAB_ARRAYS)


def from_gguf(path: str | Path, *, header: GGUFHeader | None = None) -> ModelSpec:
    """ModelSpec from a GGUF file's metadata; bytes are measured from its tensors.

    `header`: the file's `read_gguf_header` if the caller has it already (primasim.runtime.checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise SpecError("file not found", where=str(p), fix="give a path to a .gguf file")
    try:
        header = header if header is not None else read_gguf_header(p)
    except Exception as exc:  # the reader raises assorted errors on junk
        raise SpecError(f"not a readable GGUF file ({type(exc).__name__}: {exc})", where=str(p),
                        fix="check the file is complete (re-download or re-convert it)") from None
    try:
        return _from_gguf(p, header)
    except SpecError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as exc:
        # metadata of the wrong type: a string block_count, zero heads, an infinite size, ...
        raise SpecError(f"a metadata field has the wrong type or value ({type(exc).__name__}: {exc})", where=str(p),
                        fix="re-convert the model with llama.cpp's convert_hf_to_gguf.py") from None


def _from_gguf(p: Path, header: GGUFHeader) -> ModelSpec:

    def field_value(key: str, default: Any = None) -> Any:
        v = header.metadata.get(key)
        return default if v is None else v

    arch = field_value("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise SpecError(f"unsupported architecture general.architecture={arch!r}", where=str(p),
                        fix="primasim supports GGUF files of the llama and qwen2 architectures")

    def need(key: str) -> Any:
        v = field_value(f"{arch}.{key}")
        if v is None:
            raise SpecError(f"missing metadata '{arch}.{key}'", where=str(p), fix="re-convert the model")
        return v

    hidden = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    vocab = field_value(f"{arch}.vocab_size") or header.counts.get("tokenizer.ggml.tokens") or None
    by_name = {t.name: t for t in header.tensors}
    if vocab is None and "token_embd.weight" in by_name:
        vocab = int(by_name["token_embd.weight"].shape[-1])
    n_layers = int(need("block_count"))
    layer_b = sum(int(t.n_bytes) for n, t in by_name.items() if n.startswith("blk.")) / max(n_layers, 1)
    in_b = float(by_name["token_embd.weight"].n_bytes) if "token_embd.weight" in by_name else 0.0
    out_b = sum(float(by_name[n].n_bytes) for n in ("output.weight", "output_norm.weight") if n in by_name)
    tied = "output.weight" not in by_name
    if tied:
        out_b += in_b
    ftype = field_value("general.file_type")
    quant = _GGUF_FTYPE.get(int(ftype), "mixed") if ftype is not None else "mixed"
    head_dim = field_value(f"{arch}.attention.key_length") or hidden // n_heads
    return ModelSpec(
        name=p.stem,
        family=arch,
        n_layers=n_layers,
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=int(field_value(f"{arch}.attention.head_count_kv") or n_heads),
        head_dim=int(head_dim),
        ffn=int(need("feed_forward_length")),
        vocab=int(vocab),
        rope_theta=float(field_value(f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(field_value(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_context=int(field_value(f"{arch}.context_length", 4096)),
        tie_embeddings=tied,
        qkv_bias=arch == "qwen2",
        quant=quant,
        source=str(p),
        measured_bytes=(layer_b, in_b, out_b),
    )


def load_model(ref: str | Path, quant: str | None = None) -> ModelSpec:
    """Resolve a model reference: catalogue name, config.json (or its folder), or GGUF file."""
    s = str(ref)
    p = Path(s)
    if s.endswith(".gguf"):
        spec = from_gguf(p)
        if quant is not None and spec.with_quant(quant).quant != spec.quant:
            raise SpecError(f"--quant {quant} differs from the GGUF file's own type ({spec.quant})",
                            where=str(p), fix="drop --quant for GGUF files")
        return spec
    if p.suffix == ".json" or (p.is_dir() and (p / "config.json").exists()):
        return from_hf_config_file(p).with_quant(quant)
    spec = _catalogue_lookup(s)
    if spec is None:
        names = ", ".join(sorted(_load_catalogue()))
        raise SpecError(f"unknown model {s!r}", where="--model",
                        fix=f"use a built-in name ({names}), a config.json path, or a .gguf file")
    return spec.with_quant(quant)
