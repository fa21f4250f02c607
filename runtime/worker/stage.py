"""The model code one worker runs (its layer windows; on the head, embedding and output)."""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator
from typing import Any

import numpy as np

from primasim.core.runtime_facts import attention_span


class Stage:
    """The model code one worker runs: its layer windows and, on the head, embedding + output.
    The only place that calls primasim.runtime.model / primasim.runtime.checkpoint. Activations are (1, T, E) f32."""

    def __init__(self, path: str, windows: list[tuple[int, int]], *, head: bool, max_seq: int) -> None:
        # JAX loads with the first session, not at start-up: the driver waits for the worker to listen
        from .. import checkpoint as ck, model as md

        self._md, self._ck = md, ck
        self.ckpt = ck.open_checkpoint(path)
        self.spec = self.ckpt.spec
        self.windows = windows
        self.head = head
        self.max_seq = max_seq
        self.layers = [i for s, e in windows for i in range(s, e)]
        # views of the mapped file (nothing read): enough to compile; LOAD maps them again
        self.params = md.load_params(self.ckpt, self.layers, embed=head, head=head)

    def load_weights(self, pinned: bool = False) -> None:
        """Map the weights again, inside the device's memory limit: tensors that cannot stay
        file-backed are copied now, and pinned weights (exo) are copied into anonymous memory,
        never re-read. Same shapes as at set-up, so nothing recompiles."""
        self.params = self._md.load_params(self.ckpt, self.layers, embed=self.head, head=self.head)
        if pinned:
            self.params = self._md.pin_params(self.params)

    @contextlib.contextmanager
    def zero_weights(self) -> Iterator[None]:
        """Inside: the stage computes on weights of the same shapes that are views of one read-only
        anonymous mapping, all zero pages -- running a compiled call reads neither the file nor any
        memory of ours. Warm-up runs every compiled shape once this way: XLA's first execution of an
        executable costs far more than the next ones (~0.1-0.5 s here), which would otherwise land
        in the first token and in the first token of every new attention-span bucket."""
        import jax  # (JAX loads with the first session, see __init__)

        from ..kernels import QWeight

        qw = lambda a: isinstance(a, QWeight)  # noqa: E731  (descriptors stay: the files become zeros)
        leaves = [a for a in jax.tree_util.tree_leaves(self.params, is_leaf=qw) if hasattr(a, "nbytes")]
        # private: a read fault maps the kernel's zero page (a shared anonymous mapping is shmem,
        # whose read faults allocate real, unreclaimable pages: the whole file's size here)
        zero = mmap.mmap(-1, max([int(a.nbytes) for a in leaves] + [mmap.PAGESIZE]),
                         flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ)
        buf = np.frombuffer(zero, dtype=np.uint8)

        def view(a: Any) -> Any:
            if qw(a) or not hasattr(a, "nbytes"):
                return a
            return jax.device_put(buf[:int(a.nbytes)].view(np.dtype(a.dtype)).reshape(a.shape))

        real = self.params
        self.params = jax.tree_util.tree_map(view, real, is_leaf=qw)
        try:
            yield
        finally:
            self.params = real  # the zero views (and the mapping) go with the last reference

    def fingerprint(self) -> str:
        return str(self.ckpt.fingerprint())

    def weight_bytes(self) -> int:
        """Bytes of this stage's weights (its layers, plus embedding and output on the head)."""
        return sum(n for _, _, n in self.all_ranges())

    def window_ranges(self, w: int) -> list[tuple[str, int, int]]:
        s, e = self.windows[w]
        return self.ckpt.layer_ranges(range(s, e))

    def layer_ranges(self, layer: int) -> list[tuple[str, int, int]]:
        return self.ckpt.layer_ranges([layer])

    def io_ranges(self) -> list[tuple[str, int, int]]:
        """The embedding and output tensors (head only)."""
        return self.ckpt.io_ranges() if self.head else []

    def input_ranges(self) -> list[tuple[str, int, int]]:
        return self.ckpt.input_ranges() if self.head else []

    def output_ranges(self) -> list[tuple[str, int, int]]:
        return self.ckpt.output_ranges() if self.head else []

    def all_ranges(self) -> list[tuple[str, int, int]]:
        return self.ckpt.layer_ranges(self.layers) + self.io_ranges()

    def prefetch(self, ranges: list[tuple[str, int, int]]) -> None:
        self._ck.prefetch(ranges)

    def new_kv(self, abstract: bool = False) -> Any:
        return self._md.init_kv(self.spec, self.layers, self.max_seq, abstract=abstract)

    def bucket_starts(self) -> list[int]:
        """Decode positions where the attention span moves to a new bucket, up to the KV length."""
        span = attention_span
        return [p for p in (1 << i for i in range(self.max_seq.bit_length()))
                if p < self.max_seq and span(p + 1, self.max_seq) != span(p, self.max_seq)]

    def run(self, kv: Any, x: np.ndarray, pos: int, start: int, end: int,
            compile_only: bool = False) -> tuple[np.ndarray, Any]:
        y, kv = self._md.run_layers(self.params, kv, x, pos, range(start, end), compile_only=compile_only)
        return np.asarray(y), kv

    def embed(self, ids: list[int], compile_only: bool = False) -> np.ndarray:
        return np.asarray(self._md.embed(self.params, [list(ids)], compile_only=compile_only))

    def output(self, x: np.ndarray, compile_only: bool = False) -> tuple[Any, Any]:
        """Logits (1, 1, V) of the last position of x (1, T, E) and their argmax (1, 1), on the device."""
        return self._md.head(self.params, x[:, -1:], compile_only=compile_only)  # type: ignore[no-any-return]

    def output_block(self, x: np.ndarray, start: int, end: int, compile_only: bool = False) -> Any:
        """Logits (1, 1, end - start) of vocabulary rows [start, end) at the last position of x."""
        return self._md.head_rows(self.params, x[:, -1:], start, end, compile_only=compile_only)

    def output_matrix(self) -> tuple[tuple[str, int, int], int, int]:
        """The output matrix's file range, its rows (the vocabulary) and the bytes of one row."""
        name = "token_embd.weight" if self.spec.tie_embeddings else "output.weight"
        (rng,) = self.ckpt.tensor_ranges([name])
        return rng, self.spec.vocab, self._md.output_row_bytes(self.params)

    def output_rows(self, x: np.ndarray, compile_only: bool = False) -> tuple[Any, Any]:
        """Logits (1, T, V) of every position of x (1, T, E) and their argmax (1, T): a speculative
        verification's K + 1 rows."""
        return self._md.head(self.params, x, compile_only=compile_only)  # type: ignore[no-any-return]

    def step(self, kv: Any, ids: list[int], pos: int, compile_only: bool = False) -> tuple[Any, Any, Any]:
        """The whole model for one sequence's new tokens in one call (a single-device ring):
        logits (1, V) and argmax (1,) of the last position, on the device, and the KV store."""
        return self._md.forward(self.params, kv, [list(ids)], pos, self.layers,  # type: ignore[no-any-return]
                                compile_only=compile_only)

    def sample(self, logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int,
               top_p: float) -> int:
        return int(self._md.sample(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p))
