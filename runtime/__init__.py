"""primasim's runtime: JAX transformer layers computed from memory-mapped checkpoints.

This package's model and checkpoint half (the workers, wire format and emulated cluster build on it):
- `open_checkpoint` / `Checkpoint`: HF safetensors (single or sharded) and GGUF (F32, F16, Q8_0, ...)
  opened file-backed and validated up front; `write_random_checkpoint` makes seeded test models.
- `load_params`, `init_kv`, `run_layers`, `embed`, `logits`, `generate`, `sample`: the model.
- `PagedKVPool`: Bud-style paged KV cache for batched decode on one worker.
- `prefetch(ranges)`: madvise(WILLNEED) over `Checkpoint.layer_ranges(...)`.
- `load_tokenizer` / `Tokenizer` / `StreamDecoder`: GGUF and tokenizer.json vocabularies as llama.cpp
  reads them, and streamed text.

Importing this package loads neither JAX nor the checkpoint readers: the names below load their
module on first use, so a worker starts listening, and `primasim keys`, the profiler's network
probe and the emulator run, without JAX (the modules themselves import at their top).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {  # name -> module that defines it
    "KVPoolExhausted": "._kvcache",
    "PagedKVPool": "._kvcache",
    "Checkpoint": ".checkpoint",
    "TensorInfo": ".checkpoint",
    "build_tokenizer": ".checkpoint",
    "evict": ".checkpoint",
    "open_checkpoint": ".checkpoint",
    "prefetch": ".checkpoint",
    "resident_fraction": ".checkpoint",
    "write_random_checkpoint": ".checkpoint",
    "Generation": ".model",
    "KVCache": "._kvcache",
    "KVStore": ".model",
    "Params": ".model",
    "embed": ".model",
    "generate": ".model",
    "init_kv": ".model",
    "load_params": ".model",
    "logits": ".model",
    "pin_params": ".model",
    "rope_inv_freq": ".rope",
    "run_layers": ".model",
    "sample": ".model",
    "StreamDecoder": ".tokenizer",
    "Tokenizer": ".tokenizer",
    "load_tokenizer": ".tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'primasim.runtime' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
