"""primasim's runtime: JAX transformer layers computed from memory-mapped checkpoints.

This package's model and checkpoint half (the workers, wire format and emulated cluster build on it):
- `open_checkpoint` / `Checkpoint`: HF safetensors (single or sharded) and GGUF (F32, F16, Q8_0, ...)
  opened file-backed and validated up front; `write_random_checkpoint` makes seeded test models.
- `load_params`, `init_kv`, `run_layers`, `embed`, `logits`, `generate`, `sample`: the model.
- `PagedKVPool`: Bud-style paged KV cache for batched decode on one worker.
- `prefetch(ranges)`: madvise(WILLNEED) over `Checkpoint.layer_ranges(...)`.
- `load_tokenizer` / `Tokenizer` / `StreamDecoder`: GGUF and tokenizer.json vocabularies as llama.cpp
  reads them, and streamed text.
"""

from ._kvcache import KVPoolExhausted as KVPoolExhausted, PagedKVPool as PagedKVPool
from .checkpoint import (
    Checkpoint as Checkpoint,
    TensorInfo as TensorInfo,
    build_tokenizer as build_tokenizer,
    evict as evict,
    open_checkpoint as open_checkpoint,
    prefetch as prefetch,
    resident_fraction as resident_fraction,
    write_random_checkpoint as write_random_checkpoint,
)
from .model import (
    Generation as Generation,
    KVCache as KVCache,
    KVStore as KVStore,
    Params as Params,
    embed as embed,
    generate as generate,
    init_kv as init_kv,
    load_params as load_params,
    logits as logits,
    pin_params as pin_params,
    rope_inv_freq as rope_inv_freq,
    run_layers as run_layers,
    sample as sample,
)
from .tokenizer import (
    StreamDecoder as StreamDecoder,
    Tokenizer as Tokenizer,
    load_tokenizer as load_tokenizer,
)
