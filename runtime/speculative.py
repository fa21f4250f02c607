"""Speculative decoding in the runtime: a draft model on the head proposes K tokens, the ring
verifies the K + 1 positions in one pass (reference speculation-and-serving.md sections 1-2).

- `Draft`: the draft model, standalone on the head worker (all its blocks, embedding and head in
  one jitted call per step, weights pinned as prima.cpp mlocks them), with its own KV cache. It
  catches up on the committed tokens it has not seen (prefix matching, as llama.cpp's
  common_speculative does), then proposes K tokens: greedily at temperature 0, else sampled from
  its processed distribution q, which it returns for the acceptance rule.
- `verify`: the acceptance rule. Greedy: keep drafts while they equal the target's argmax, then
  emit the target's argmax (so the output is plain greedy decoding's). Sampling: accept draft i
  with probability min(1, p_i/q_i); at the first rejection emit a token from the normalised
  residual max(0, p_i - q_i); after K acceptances the bonus token from p_{K+1}. Exact: the emitted
  tokens are distributed as the (processed) target's (Leviathan et al. 2023, Appendix A).
- Rollback costs nothing: KV caches are position-indexed and attention masks positions past the
  step's own, so the next pass (which starts right after the last accepted position) overwrites the
  rejected entries on every device. No control message is needed.
- `speculative_generate`: the same loop in one process (the reference the ring is tested against,
  and what measures acceptance logs for the simulator's replay without starting workers).
- `write_prefix_draft`: a random-weight draft made of a random-weight target's first blocks (same
  seed, same embedding and head), for tests and the validation: a real draft-target pair whose
  acceptance is set by how much the remaining blocks change the result.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from primasim.core.errors import CheckpointError, WorkerError
from primasim.core.model import ModelSpec
from primasim.core.speculation import check_compatible, prefix_draft, summarize

from . import model as md
from .checkpoint import Checkpoint, open_checkpoint, write_random_checkpoint
from .model import processed_probs
from .pages import drop_pages, trim_heap


# ---------------------------------------------------------------------------- the acceptance rule
def verify(drafts: Sequence[int], q: Sequence[np.ndarray] | None, p: Sequence[np.ndarray],
           rng: np.random.Generator | None) -> tuple[int, int]:
    """(accepted drafts n, the token the target emits after them) for one verification pass.

    `p[i]`: the target's processed distribution at draft position i (K + 1 of them, the last for
    the bonus token); `q[i]`: the draft's, from which drafts[i] was drawn. Greedy when `q` is None:
    p[i] may then be the target's argmax ids instead of distributions."""
    k = len(drafts)
    if len(p) != k + 1:
        raise ValueError(f"{k} drafts need {k + 1} target positions, got {len(p)}")
    if q is None:  # greedy: keep drafts while they are the target's argmax
        top = [int(x) if np.ndim(x) == 0 else int(np.argmax(x)) for x in p]
        n = 0
        while n < k and int(drafts[n]) == top[n]:
            n += 1
        return n, top[n]
    if rng is None:
        raise ValueError("speculative sampling needs a seeded numpy Generator")
    for i, x in enumerate(drafts):
        pi, qi = p[i], q[i]
        px, qx = float(pi[x]), float(qi[x])
        if qx > 0 and rng.random() * qx < px:  # accept with probability min(1, p/q)
            continue
        resid = np.maximum(pi - qi, 0.0)
        s = resid.sum()
        # s == 0 only when p == q where q has mass, yet x (drawn from q) was rejected: impossible
        # but for rounding, so fall back to p itself
        return i, int(rng.choice(resid.size, p=resid / s if s > 0 else pi / pi.sum()))
    last = p[k]
    return k, int(rng.choice(last.size, p=last))


# ---------------------------------------------------------------------------- the draft model
class Draft:
    """A draft model run standalone (one jitted call per step: embedding, every block, head)."""

    def __init__(self, path: str | Path | Checkpoint, max_seq: int, *, target: ModelSpec | None = None) -> None:
        self.ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
        self.spec: ModelSpec = self.ckpt.spec
        if target is not None:
            check_compatible(target, self.spec)
        self.max_seq = max_seq
        self.layers = list(range(self.spec.n_layers))
        # views of the mapped file (nothing read): enough to compile; `load` pins them
        self.params = md.load_params(self.ckpt, self.layers, embed=True, head=True)
        self.kv: Any = None
        self.fed: list[int] = []  # tokens in the draft's KV cache, positions 0..len-1
        self.step_s: list[float] = []

    def compile(self, lengths: Sequence[int]) -> None:
        """Compile the prompt lengths at position 0 and one and two tokens at every attention-span
        bucket (a step after a fully accepted pass feeds two), without running anything."""
        kv = md.init_kv(self.spec, self.layers, self.max_seq, abstract=True)
        # a prefill feeds the prompt but its last token (the first proposal feeds that one)
        steps = {(int(n) - 1, 0) for n in lengths if int(n) > 1} | {(1, 0), (2, 0)}
        for p in (1 << i for i in range(self.max_seq.bit_length())):
            if p + 2 < self.max_seq and md.attention_span(p + 1, self.max_seq) != md.attention_span(p, self.max_seq):
                steps |= {(1, p), (2, p - 1)}
        self.steps = sorted(steps)
        for n, pos in self.steps:
            md.forward(self.params, kv, [[0] * n], pos, self.layers, compile_only=True)

    def warm(self) -> None:
        """Run every compiled shape once (XLA's first execution of an executable is slow; this
        keeps it out of the first tokens). What it writes into the cache sits at positions a
        sequence writes before it reads them."""
        for n, pos in getattr(self, "steps", []):
            _, tok, self.kv = md.forward(self.params, self.kv, [[0] * n], pos, self.layers)
            tok.block_until_ready()  # type: ignore[union-attr]
        self.fed = []
        # the warm-up's freed buffers stay in the C heap (~30 MiB measured for a 2-block draft of
        # llama-mini-300m) and would count against the target's memory budget: give them back
        gc.collect()
        trim_heap()

    def load(self, *, pinned: bool = True) -> None:
        """Map the weights again (inside the device's memory limit), pinned into anonymous memory
        (prima.cpp mlocks the draft), and allocate the KV cache."""
        self.params = md.load_params(self.ckpt, self.layers, embed=True, head=True)
        if pinned:
            self.params = jax.block_until_ready(md.pin_params(self.params))
            # the copy is what the draft holds: the file's pages it read would otherwise stay in the
            # page cache, charged to the device's memory cgroup, and count against the target's budget
            path = Path(self.ckpt.path)
            files = [path] if path.is_file() else [f for f in path.iterdir() if f.suffix in (".safetensors", ".gguf")]
            drop_pages([(str(f), 0, f.stat().st_size) for f in files])
        self.kv = md.init_kv(self.spec, self.layers, self.max_seq)
        self.fed = []

    @property
    def nbytes(self) -> int:
        """Weights + KV cache the draft holds."""
        w = sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(self.params) if hasattr(a, "nbytes"))
        return w + (self.kv.nbytes if self.kv is not None else 0)

    def reset(self) -> None:
        self.fed = []

    def _step(self, ids: list[int], pos: int) -> np.ndarray:
        t0 = time.perf_counter()
        lg, _, self.kv = md.forward(self.params, self.kv, [ids], pos, self.layers)
        out = np.asarray(lg).reshape(-1)
        self.step_s.append(time.perf_counter() - t0)
        return out

    def prefill(self, tokens: Sequence[int]) -> None:
        """Feed a prompt (all but its last token: a proposal always starts by feeding a token)."""
        if self.kv is None:
            self.load()
        toks = [int(t) for t in tokens][:-1]
        if toks:
            self._step(toks, 0)
        self.fed = toks

    def propose(self, committed: Sequence[int], k: int, rng: np.random.Generator | None, *,
                temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0) -> tuple[list[int], list[np.ndarray] | None]:
        """K draft tokens after the committed sequence (prompt + output so far), and their
        distributions q (None when greedy). Feeds what the cache lacks first (prefix matching)."""
        if self.kv is None:
            self.load()
        seq = [int(t) for t in committed]
        if len(seq) + k > self.max_seq:
            raise WorkerError(f"the draft's context ({self.max_seq}) cannot hold {len(seq) + k} positions",
                              where="draft", fix="allocate a longer context (--n-ctx)")
        keep = 0
        lim = min(len(self.fed), len(seq) - 1)
        while keep < lim and self.fed[keep] == seq[keep]:
            keep += 1
        drafts: list[int] = []
        qs: list[np.ndarray] = []
        ids, pos = seq[keep:], keep
        self.fed = seq[:keep]
        greedy = temperature <= 0
        for _ in range(k):
            lg = self._step(ids, pos)
            self.fed += ids
            pos += len(ids)
            if greedy:
                x = int(np.argmax(lg))
            else:
                q = processed_probs(lg, temperature=temperature, top_k=top_k, top_p=top_p)
                assert rng is not None
                x = int(rng.choice(q.size, p=q))
                qs.append(q)
            drafts.append(x)
            ids = [x]
        return drafts, (None if greedy else qs)


# ---------------------------------------------------------------------------- one process
@dataclass
class SpecGeneration:
    """What `speculative_generate` produced: tokens, per pass (drafted, accepted), timings (s)."""

    tokens: list[int]
    passes: list[tuple[int, int]] = field(default_factory=list)
    prefill_s: float = 0.0
    pass_s: list[float] = field(default_factory=list)
    draft_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return summarize(self.passes)


def target_rows(params: md.Params, kv: Any, ids: Sequence[int], pos: int,
                windows: Sequence[Sequence[int]]) -> tuple[np.ndarray, Any]:
    """Logits (T, V) of every position of `ids` fed at `pos`: embed, every window, the head."""
    x = md.embed(params, [list(ids)])
    for w in windows:
        x, kv = md.run_layers(params, kv, x, pos, w)
    return np.asarray(md.logits(params, x)[0]), kv


def speculative_generate(params: md.Params, draft: Draft, prompt: Sequence[int], max_new_tokens: int, k: int, *,
                         windows: Sequence[Sequence[int]] | None = None, temperature: float = 0.0, top_k: int = 0,
                         top_p: float = 1.0, seed: int = 0, max_seq: int | None = None, stop: Sequence[int] = (),
                         on_token: Callable[[int], None] | None = None) -> SpecGeneration:
    """`model.generate` with a draft: prefill, then passes of K drafts verified at once. Greedy
    output equals `model.generate`'s (up to batch-size rounding); sampled output has its distribution."""
    spec = params.spec
    if k < 0:
        raise WorkerError(f"draft tokens must be >= 0, got {k}", where="speculative_generate", fix="e.g. k=4")
    check_compatible(spec, draft.spec)
    windows = [tuple(w) for w in (windows or [tuple(range(spec.n_layers))])]
    if not prompt:
        raise WorkerError("empty prompt", where="speculative_generate", fix="give at least one token (e.g. BOS)")
    max_seq = max_seq or len(prompt) + max_new_tokens + k
    kv: Any = md.init_kv(spec, range(spec.n_layers), max_seq)
    rng = np.random.default_rng(seed)
    draft.load()
    out = SpecGeneration([])
    opts = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    stops = {int(s) for s in stop}

    t0 = time.perf_counter()
    rows, kv = target_rows(params, kv, prompt, 0, windows)
    out.prefill_s = time.perf_counter() - t0
    draft.prefill(prompt)
    first = md.sample(rows[-1], rng, **opts) if temperature > 0 else int(np.argmax(rows[-1]))
    seq = [int(t) for t in prompt] + [first]
    out.tokens.append(first)
    if on_token is not None:
        on_token(first)
    while len(out.tokens) < max_new_tokens and out.tokens[-1] not in stops:
        pos = len(seq) - 1  # the last committed token is not in the target's cache yet
        t1 = time.perf_counter()
        drafts, q = draft.propose(seq, k, rng, **opts) if k > 0 else ([], None)
        t2 = time.perf_counter()
        rows, kv = target_rows(params, kv, [seq[-1], *drafts], pos, windows)
        p = [processed_probs(r, **opts) for r in rows] if temperature > 0 else [int(np.argmax(r)) for r in rows]
        n, nxt = verify(drafts, q, p, rng if temperature > 0 else None)
        out.draft_s.append(t2 - t1)
        out.pass_s.append(time.perf_counter() - t2)
        out.passes.append((k, n))
        for t in [*drafts[:n], nxt]:
            if len(out.tokens) >= max_new_tokens or out.tokens[-1] in stops:
                break
            seq.append(int(t))
            out.tokens.append(int(t))
            if on_token is not None:
                on_token(int(t))
    return out


# ---------------------------------------------------------------------------- test drafts
def write_prefix_draft(target: ModelSpec, n_layers: int, out: str | Path, *, seed: int = 0, fmt: str = "safetensors",
                       dtype: str | None = None) -> Path:
    """A random-weight draft of `target`'s first `n_layers` blocks: the same seeded tensors as
    `write_random_checkpoint(target, seed=seed)` for those blocks, the embedding, the output norm
    and the head (each tensor has its own seeded stream). Returns the path to open."""
    spec = prefix_draft(target, n_layers)
    return write_random_checkpoint(spec, out, fmt=fmt, seed=seed, dtype=dtype)  # type: ignore[arg-type]


def scale_block_outputs(path: str | Path, factor: float, *, first: int = 0) -> None:
    """Multiply the attn_output and ffn_down (f32 safetensors) of every block from `first` on by
    `factor`, in place: those blocks then change the residual stream less, so a prefix of the model
    agrees more often with the whole (trained LLMs' early layers agree with their last often enough
    for self-speculative drafts, LayerSkip; random weights scramble the stream at every block).
    Write the target and its prefix draft, then scale both the same way: the draft stays the
    target's prefix. Blocks below `first` keep their weights, so a draft of them is unchanged."""
    ck = open_checkpoint(path)
    names = [n for n in ck.names() if n.startswith("blk.") and n.endswith(("attn_output.weight", "ffn_down.weight"))
             and int(n.split(".")[1]) >= first]
    for n in names:
        info = ck.infos[n]
        if info.dtype != "F32" or Path(info.file).suffix != ".safetensors":
            raise CheckpointError(f"{n} is {info.dtype} in {Path(info.file).name}; scaling needs f32 safetensors",
                                  where=str(path), fix="write the checkpoint with quant f32 (safetensors)")
        a = np.memmap(info.file, dtype=np.float32, mode="r+", offset=info.offset, shape=(info.nbytes // 4,))
        a *= np.float32(factor)
        a.flush()
        del a


def open_draft_ref(ref: str, target_ckpt: Any, *, seed: int = 0) -> Path:
    """The draft's weights for `run --draft REF`: a checkpoint path, or `first:N` = the target's
    first N blocks written as a random-weight prefix draft into the cache (random targets only)."""
    from primasim.core.paths import cache_dir

    if not ref.startswith("first:"):
        if not Path(ref).exists():
            raise CheckpointError("no such draft checkpoint", where=ref,
                                  fix="pass a GGUF file or a config.json + safetensors directory, or first:N")
        return Path(ref)
    try:
        n = int(ref.split(":", 1)[1])
    except ValueError:
        raise CheckpointError(f"{ref!r}: N must be an integer", where="--draft", fix="e.g. first:2") from None
    spec: ModelSpec = target_ckpt.spec
    fmt = "gguf" if Path(target_ckpt.path).suffix == ".gguf" else "safetensors"
    key = cache_dir() / "weights" / f"{spec.name}-{spec.quant}-{fmt}-s{seed}-first{n}"
    path = key / "model.gguf" if fmt == "gguf" else key
    if not (key / "COMPLETE").exists():
        write_prefix_draft(spec, n, path, seed=seed, fmt=fmt)
        (key / "COMPLETE").write_text("ok\n")
    # the prefix is the target's only if the target is primasim's random checkpoint of this seed
    probe = "blk.0.attn_norm.weight"
    if not np.array_equal(open_checkpoint(path).tensor(probe), target_ckpt.tensor(probe)):
        raise CheckpointError(f"first:{n} builds a draft from a random-weight target's seed, and this target's "
                              f"weights are not primasim's random weights of seed {seed}", where="--draft",
                              fix="pass a real draft checkpoint with the target's vocabulary")
    return path
