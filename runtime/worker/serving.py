"""The head's open-ended request stream (`primasim serve`): slots, a FIFO of waiting requests,
cancellation, and padded prompts.

A GENERATE with ``{"serve": true, "slots": S}`` turns the head's session into a server: requests
arrive one by one (SUBMIT: id, prompt ids, tokens to generate, sampler, stop ids) and run in
*slots* -- sequence ids 0..S-1, so every device of the ring reuses the S KV caches it allocated at
LOAD -- as MDI-LLM's recurrent pipeline runs its sequences: each slot's token walks the ring on its
own, devices work on whichever activation arrives first. A finished (or cancelled) request frees
its slot for the next waiting one when its activation is back on the head; a new request starting
at position 0 overwrites the slot's cache as it goes (positions past a sequence's own are masked).

Prompts are padded to the next of the set-up's compiled lengths (`buckets`) so no prompt length
compiles anything while serving; the padding sits after the prompt (causal attention ignores it
for the prompt's own positions), only the last real position's logits are used, and the next
token overwrites the padding's cache entries. A single fused device (one call per token, no
padding support) compiles a new prompt length at its first use instead.

Sampling is seeded per (request seed, token index): the same request with the same seed samples the
same tokens, and a request re-submitted after a device left (prompt + the tokens it had, as the
engine re-prefills it) samples what it would have.
"""

from __future__ import annotations

import bisect
import collections
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from primasim.core.errors import WorkerError

from ..wire import MsgType

if TYPE_CHECKING:
    from .session import Session


@dataclass
class Active:
    """A request in a slot."""

    rid: int
    ids: list[int]
    max_new: int
    index0: int  # tokens it produced before this (re)start: the index of its next token
    opts: dict[str, Any]
    stop_ids: frozenset[int]
    min_new: int
    admitted: float = 0.0
    valid: int = 0  # prompt length (the first pass carries padding after it)
    generated: int = 0
    cancelled: bool = False
    first: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class ServeLoop:
    """The head session's request stream (one per GENERATE{serve})."""

    def __init__(self, session: Session, obj: dict[str, Any]) -> None:
        self.s = session
        self.slots = max(1, int(obj.get("slots", 1)))
        self.buckets = sorted(int(b) for b in obj.get("buckets", []) if int(b) > 0)
        self.max_seq = int(session.cfg["max_seq"])
        self.free: collections.deque[int] = collections.deque(range(self.slots))
        self.waiting: collections.deque[dict[str, Any]] = collections.deque()
        self.active: dict[int, Active] = {}  # slot -> request
        self.where: dict[int, int] = {}  # rid -> slot

    # ---------------------------------------------------------------------------- commands
    def submit(self, o: dict[str, Any]) -> None:
        ids, max_new = [int(t) for t in o["ids"]], int(o["max_new"])
        vocab = self.s.stage.spec.vocab
        if not ids or max_new < 1 or len(ids) + max_new > self.max_seq or any(not 0 <= t < vocab for t in ids):
            self._emit(MsgType.FINISHED, {"rid": int(o["rid"]), "reason": "error",
                                          "error": f"bad request: {len(ids)} prompt tokens + {max_new} new "
                                                   f"(context {self.max_seq}, vocabulary {vocab})"})
            return
        o["received"] = time.time()
        self.waiting.append(o)
        self._fill()

    def cancel(self, o: dict[str, Any]) -> None:
        rid = int(o["rid"])
        for i, w in enumerate(self.waiting):
            if int(w["rid"]) == rid:
                del self.waiting[i]
                self._emit(MsgType.FINISHED, {"rid": rid, "reason": "cancelled"})
                return
        slot = self.where.get(rid)
        if slot is not None:  # its activation is somewhere in the ring: freed when it is back
            self.active[slot].cancelled = True

    # ---------------------------------------------------------------------------- slots
    def _fill(self) -> None:
        while self.free and self.waiting:
            self._start(self.free.popleft(), self.waiting.popleft())

    def _start(self, slot: int, o: dict[str, Any]) -> None:
        ids = [int(t) for t in o["ids"]]
        a = Active(int(o["rid"]), ids, int(o["max_new"]), int(o.get("index0", 0)),
                   {"temperature": float(o.get("temperature", 0.0)), "top_k": int(o.get("top_k", 0)),
                    "top_p": float(o.get("top_p", 1.0)), "seed": int(o.get("seed", 0))},
                   frozenset(int(t) for t in o.get("stop_ids", [])), int(o.get("min_new", 0)),
                   admitted=time.time(), valid=len(ids))
        self.active[slot] = a
        self.where[a.rid] = slot
        self.s.work.append((slot, 0, self._padded(ids), 0, a.index0))

    def _padded(self, ids: list[int]) -> list[int]:
        if self.s.fused or not self.buckets:
            return ids
        i = bisect.bisect_left(self.buckets, len(ids))
        if i == len(self.buckets):
            return ids
        return ids + [0] * (self.buckets[i] - len(ids))

    # ---------------------------------------------------------------------------- hooks of Session
    def opts(self, seq: int) -> dict[str, Any]:
        return self.active[seq].opts

    def rng(self, seq: int) -> np.random.Generator:
        a = self.active[seq]
        return np.random.default_rng([a.opts["seed"] & 0xFFFFFFFF, a.index0 + a.generated])

    def trim(self, seq: int, x: np.ndarray) -> np.ndarray:
        """The first pass's hidden states without the padding (output at the last real position)."""
        a = self.active[seq]
        if a.first:
            a.first = False
            return x[:, :a.valid]
        return x

    def token(self, seq: int, tok: int, next_pos: int, step: int, t: float) -> None:
        """A token sampled for slot `seq`: report it, then queue the slot's next pass or free it."""
        a = self.active[seq]
        a.first = False
        if a.cancelled:
            self._free(seq, "cancelled")
            return
        index = a.index0 + a.generated
        a.generated += 1
        payload: dict[str, Any] = {"rid": a.rid, "seq": seq, "index": index, "token_id": int(tok), "time": t}
        if a.generated == 1:
            payload["admitted"] = a.admitted
        self._emit(MsgType.TOKEN, payload)
        if a.generated >= a.max_new:
            self._free(seq, "length")
        elif tok in a.stop_ids and a.generated >= a.min_new:
            self._free(seq, "stop")
        elif next_pos >= self.max_seq:
            self._free(seq, "length")
        else:
            self.s.work.append((seq, 0, [int(tok)], next_pos, step + 1))

    def _free(self, slot: int, reason: str) -> None:
        a = self.active.pop(slot)
        self.where.pop(a.rid, None)
        self._emit(MsgType.FINISHED, {"rid": a.rid, "reason": reason, "generated": a.generated})
        self.free.append(slot)
        self._fill()

    def _emit(self, t: MsgType, obj: dict[str, Any]) -> None:
        self.s.w.emit(t, obj)


def serve_command(session: Session | None, msg: Any) -> None:
    """SUBMIT / CANCEL from the driver (worker compute thread)."""
    loop = getattr(session, "serving", None)
    if session is None or loop is None:
        raise WorkerError(f"{msg.type.name} before GENERATE{{serve}}", where="serve",
                          fix="start the head's request stream first")
    if msg.type == MsgType.SUBMIT:
        loop.submit(msg.obj)
    else:
        loop.cancel(msg.obj)
    session.drain()
