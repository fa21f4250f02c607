"""The head worker's speculative decoding: the draft model runs here, standalone; the ring verifies
its K drafts plus the last committed token as one (1, K + 1, E) activation per window, and the head
applies the acceptance rule (primasim/runtime/speculative.py) to the K + 1 rows of logits.

A pass of sequence s fed [t, x_1..x_K] at positions p..p+K. Accepting n drafts commits t, x_1..x_n
(positions p..p+n) and the target's own next token y, which is not in any cache yet: the next pass
feeds [y, x'_1..x'_K] at position p+n+1, overwriting the rejected entries on every device, whose
attention masks positions past the step's own. That is the whole rollback.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from primasim.core.runtime_facts import draft_reserve

from ..speculative import Draft, processed_probs, verify
from ..wire import MsgType

if TYPE_CHECKING:
    from .session import Session


class HeadSpeculation:
    """What the head worker's session delegates to when the run has a draft."""

    def __init__(self, session: Session, cfg: dict[str, Any]) -> None:
        self.s = session
        self.k = int(cfg["tokens"])
        self.draft = Draft(str(cfg["path"]), int(session.cfg["max_seq"]), target=session.stage.spec)
        self.passes: list[tuple[int, int]] = []
        self.prefilled: set[int] = set()
        self.draft_s = 0.0

    # ---------------------------------------------------------------------------- set-up
    def compile(self, lengths: list[int]) -> None:
        t0 = time.time()
        self.draft.compile(lengths)
        self.compile_s = time.time() - t0

    def reserve_bytes(self) -> int:
        """What the draft will hold at LOAD (weights + KV cache), for the residency budget."""
        return draft_reserve(self.draft.spec, self.draft.max_seq)

    def load(self) -> dict[str, Any]:
        t0 = time.time()
        self.draft.load(pinned=True)
        self.draft.warm()
        return {"draft_load_s": time.time() - t0, "draft_bytes": float(self.draft.nbytes)}

    def reset(self) -> None:
        self.passes = []
        self.prefilled = set()
        self.draft_s = 0.0
        self.draft.reset()

    # ---------------------------------------------------------------------------- the loop
    def _opts(self) -> dict[str, Any]:
        o = self.s.gen_opts
        return {"temperature": float(o.get("temperature", 0.0)), "top_k": int(o.get("top_k", 0)),
                "top_p": float(o.get("top_p", 1.0))}

    def after_send(self, seq: int, step: int) -> None:
        """The prompt is on its way round the ring: prefill the draft meanwhile."""
        if step == 0 and seq not in self.prefilled:
            t0 = time.time()
            self.draft.prefill(self.s.seqs[seq].ids)
            self.prefilled.add(seq)
            self.s.rec.span("cpu", t0, time.time(), "draft prefill", seq, step)

    def finish(self, seq: int, x: np.ndarray, pos: int, step: int) -> None:
        """The ring's output for sequence `seq`: the first token after the prompt, or a verification."""
        s, st = self.s, self.s.seqs[seq]
        opts = self._opts()
        greedy = opts["temperature"] <= 0
        t0 = time.time()
        if step == 0:  # the prompt: its last row gives the first token, as without a draft
            lg, top = s.stage.output(x)
            top.block_until_ready()
            t1 = time.time()
            tok, _ = s._pick(seq, lg, top)
            s.rec.span("cpu", t0, t1, "output", seq, step)
            self.after_send(seq, 0)  # a single device never sent it
            out = [tok]
            next_pos = pos + x.shape[1]
        else:
            lg, top = s.stage.output_rows(x)
            if greedy:
                rows: list[Any] = [int(t) for t in np.asarray(top).reshape(-1)]
                q = None
            else:
                lgs = np.asarray(lg)[0]
                rows = [processed_probs(r, **opts) for r in lgs]
                q = self._q
            t1 = time.time()
            s.rec.span("cpu", t0, t1, f"output x{x.shape[1]}", seq, step)
            n, nxt = verify(self._drafts, q, rows, None if greedy else st.rng)
            self.passes.append((self.k, n))
            out = [*self._drafts[:n], nxt]
            next_pos = pos + n + 1
        self._emit(seq, out, step, t1)
        if st.done:
            return
        committed = st.ids + st.generated
        t2 = time.time()
        self._drafts, self._q = self.draft.propose(committed, self.k, st.rng, **opts)
        t3 = time.time()
        self.draft_s += t3 - t2
        s.rec.span("cpu", t2, t3, f"draft {self.k}", seq, step + 1)
        s.work.append((seq, 0, [committed[-1], *self._drafts], next_pos, step + 1))

    def _emit(self, seq: int, toks: list[int], step: int, t: float) -> None:
        """Report the pass's tokens (a burst) and finish the sequence at its length or a stop id."""
        s, st = self.s, self.s.seqs[seq]
        for tok in toks:
            st.generated.append(int(tok))
            s.w.emit(MsgType.TOKEN, {"seq": seq, "index": len(st.generated) - 1, "token_id": int(tok), "time": t,
                                     "pass": step})
            if len(st.generated) >= st.max_new or tok in s.stop_ids:
                st.done = True
                break
        if st.done:
            s._seq_done(seq)

    def report(self) -> dict[str, Any]:
        return {"passes": [list(p) for p in self.passes], "k": self.k, "draft": self.draft.spec.name,
                "draft_s": self.draft_s}
