"""Speculative decoding: the facts the simulator, the planner and the runtime share.

A draft model proposes K tokens; one pass of the target verifies all K + 1 positions (the last
accepted token and the K drafts) and keeps the drafts up to the first rejection, plus one token of
its own (the residual at a rejection, the bonus when all K pass). So a pass yields 1..K+1 tokens.
(Leviathan et al., ICML 2023; Chen et al. 2023; reference speculation-and-serving.md section 1.)

This module holds what both sides need to agree on:
- `DraftSpec`: which draft, where it runs, how many tokens it drafts per pass, and the
  acceptance model the simulator draws from;
- acceptance models: a fixed per-token rate (i.i.d.), a rate per draft position, or the replay of
  a log the runtime measured (`AcceptanceLog`: per pass, drafted and accepted);
- the closed forms (tokens per pass, accepted-length distribution, the speed-up over plain
  decoding) and the estimator of the per-token rate from a log (accepted / (accepted + passes with
  a rejection), not llama.cpp's accepted / drafted);
- the draft's memory on its device and the cluster as the target sees it with the draft loaded
  (prima.cpp loads the draft first, pinned, so the target's profile and Halda see the head's
  memory without it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from .cluster import ClusterSpec
from .errors import SpecError
from .io import atomic_write_text
from .model import ModelSpec
from .runtime_facts import draft_reserve

Where = Literal["cpu", "gpu"]


# ------------------------------------------------------------------------------ closed forms
def expected_tokens(alpha: float, k: int) -> float:
    """E[tokens per pass] with i.i.d. acceptance `alpha` and `k` drafts: (1 - a^(k+1)) / (1 - a)."""
    if k <= 0:
        return 1.0
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def accepted_pmf(alpha: float, k: int) -> np.ndarray:
    """P(N = n), n = 0..k accepted drafts: a^n (1 - a) for n < k, a^k for n = k."""
    n = np.arange(k + 1, dtype=float)
    p = alpha ** n * (1.0 - alpha)
    p[k] = alpha ** k
    return p


def speedup(alpha: float, k: int, c: float, rho: float = 1.0) -> float:
    """Expected tokens per unit time relative to plain decoding: E[X] / (k c + rho), with c = one draft
    token's time over one plain pass and rho = a verification pass over a plain pass (Leviathan's
    Theorem 3.8 is rho = 1)."""
    return expected_tokens(alpha, k) / (k * c + rho)


def alpha_from_passes(passes: Sequence[tuple[int, int]]) -> float:
    """Maximum-likelihood per-token acceptance from (drafted, accepted) per pass: every pass is a
    run of Bernoulli trials stopped at the first failure (or at the last draft), so
    alpha = accepted / (accepted + passes that rejected)."""
    acc = sum(a for _, a in passes)
    rejections = sum(1 for d, a in passes if a < d)
    if acc + rejections == 0:
        return float("nan")
    return acc / (acc + rejections)


def summarize(passes: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """What a speculative run reports: passes, tokens per pass, the per-token acceptance (MLE), the
    share of drafts accepted (llama.cpp's "accept %"), and the accepted-length distribution."""
    passes = [(int(d), int(a)) for d, a in passes]
    if not passes:
        return {"passes": 0}
    k = max(d for d, _ in passes)
    hist = [0] * (k + 1)
    for _, a in passes:
        hist[a] += 1
    drafted = sum(d for d, _ in passes)
    accepted = sum(a for _, a in passes)
    return {"passes": len(passes), "drafted": drafted, "accepted": accepted,
            "tokens_per_pass": (accepted + len(passes)) / len(passes),
            "alpha_hat": alpha_from_passes(passes),
            "accepted_share": accepted / drafted if drafted else float("nan"),
            "accepted_hist": hist}


# ------------------------------------------------------------------------------ acceptance models
class Acceptance(Protocol):
    """Draws how many of `k` drafts a verification pass accepts."""

    def draw(self, rng: np.random.Generator, k: int) -> int: ...

    def expected(self, k: int) -> float: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class FixedRate:
    """Each draft is accepted with probability `alpha`, independently (Leviathan's model)."""

    alpha: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise SpecError(f"acceptance rate must be in [0, 1], got {self.alpha}", where="--acceptance",
                            fix="give a per-token rate such as 0.7, or a measured log (JSON)")

    def draw(self, rng: np.random.Generator, k: int) -> int:
        n = 0
        while n < k and rng.random() < self.alpha:
            n += 1
        return n

    def expected(self, k: int) -> float:
        return expected_tokens(self.alpha, k) - 1.0

    def describe(self) -> str:
        return f"i.i.d. alpha = {self.alpha:g}"


@dataclass(frozen=True)
class PerPosition:
    """Draft i (1-based) is accepted with probability alphas[i-1] given the ones before it were
    (the last rate repeats): acceptance that falls along the draft."""

    alphas: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise SpecError(f"per-position acceptance rates must be in [0, 1], got {list(self.alphas)}",
                            where="--acceptance", fix="e.g. 0.9,0.8,0.7")

    def _a(self, i: int) -> float:
        return self.alphas[min(i, len(self.alphas) - 1)]

    def draw(self, rng: np.random.Generator, k: int) -> int:
        n = 0
        while n < k and rng.random() < self._a(n):
            n += 1
        return n

    def expected(self, k: int) -> float:
        out, p = 0.0, 1.0
        for i in range(k):
            p *= self._a(i)
            out += p
        return out

    def describe(self) -> str:
        return "per position " + ",".join(f"{a:g}" for a in self.alphas)


@dataclass
class AcceptanceLog:
    """Per verification pass, how many tokens were drafted and how many accepted, as the runtime
    measured them on a model pair and a prompt set (`primasim run --draft ... --acceptance-log`)."""

    passes: list[tuple[int, int]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return max((d for d, _ in self.passes), default=0)

    @property
    def alpha(self) -> float:
        return alpha_from_passes(self.passes)

    def summary(self) -> dict[str, Any]:
        return summarize(self.passes)

    def to_json(self) -> dict[str, Any]:
        return {"passes": [list(p) for p in self.passes], "meta": self.meta, "summary": self.summary()}

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> AcceptanceLog:
        p = Path(path)
        try:
            obj = json.loads(p.read_text())
            passes = [(int(d), int(a)) for d, a in obj["passes"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SpecError(f"not an acceptance log ({exc})", where=str(p),
                            fix="write one with `primasim run --draft ... --acceptance-log FILE`") from None
        if not passes or any(d < 0 or not 0 <= a <= d for d, a in passes):
            raise SpecError("an acceptance log needs passes with 0 <= accepted <= drafted", where=str(p),
                            fix="write one with `primasim run --draft ... --acceptance-log FILE`")
        return cls(passes, dict(obj.get("meta", {})))


@dataclass
class Replay:
    """Replays a measured log pass by pass (cycling), capped at the pass's k. Run with the log's own
    k it reproduces the measured accepted lengths; with another k the log cannot say what would
    have been accepted, so it draws i.i.d. at the log's estimated rate instead (`exact` False)."""

    log: AcceptanceLog
    i: int = 0

    def exact_for(self, k: int) -> bool:
        return k == self.log.k

    def draw(self, rng: np.random.Generator, k: int) -> int:
        if not self.exact_for(k):
            return FixedRate(self.log.alpha).draw(rng, k)
        _, a = self.log.passes[self.i % len(self.log.passes)]
        self.i += 1
        return min(a, k)

    def expected(self, k: int) -> float:
        if self.exact_for(k):
            return float(np.mean([a for _, a in self.log.passes]))
        return FixedRate(self.log.alpha).expected(k)

    def describe(self) -> str:
        return f"replay of {len(self.log.passes)} measured passes (K = {self.log.k}, alpha-hat = {self.log.alpha:.3f})"


def parse_acceptance(text: str | float | Acceptance | None) -> Acceptance:
    """`0.7` (i.i.d.), `0.9,0.8,0.7` (per position) or a path to an acceptance log (replay)."""
    if text is None:
        return FixedRate(0.7)
    if not isinstance(text, str | float | int):
        return text
    if isinstance(text, float | int):
        return FixedRate(float(text))
    s = text.strip()
    try:
        vals = [float(x) for x in s.split(",")]
    except ValueError:
        if Path(s).exists():
            return Replay(AcceptanceLog.load(s))
        raise SpecError(f"{s!r} is neither a rate, a list of rates nor an acceptance log file", where="--acceptance",
                        fix="give e.g. 0.7, 0.9,0.8,0.7 or a JSON log written by `primasim run --acceptance-log`") from None
    return FixedRate(vals[0]) if len(vals) == 1 else PerPosition(tuple(vals))


# ------------------------------------------------------------------------------ the draft
#: The default number of drafted tokens (llama.cpp's --draft-max is 16; prima.cpp's server 16 with
#: p_min 0.9 cutting drafts short; a fixed K this large rarely pays on a ring: see plan/draft.py).
DEFAULT_DRAFT_TOKENS = 4


@dataclass(frozen=True)
class DraftSpec:
    """A draft model for speculative decoding and where it runs."""

    model: ModelSpec = field(metadata={"help": "the draft's architecture (same vocabulary as the target)"})
    tokens: int = field(default=DEFAULT_DRAFT_TOKENS, metadata={"help": "tokens drafted per pass (K)"})
    device: str | None = field(default=None, metadata={"help": "device running the draft (None: the plan's head, "
                                                                "as prima.cpp does)"})
    where: Where | None = field(default=None, metadata={"help": "cpu or gpu of that device (None: the GPU if the "
                                                               "draft fits its free VRAM, else the CPU)"})
    acceptance: Any = field(default_factory=lambda: FixedRate(0.7), compare=False,
                            metadata={"help": "acceptance model the simulator draws from"})

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, int) or self.tokens < 0:
            raise SpecError(f"draft tokens must be an integer >= 0, got {self.tokens!r}", where="--draft-tokens",
                            fix="e.g. --draft-tokens 4 (0 = no speculation)")
        if self.where not in (None, "cpu", "gpu"):
            raise SpecError(f"draft placement must be cpu or gpu, got {self.where!r}", where="--draft-on",
                            fix="e.g. --draft-on D3:gpu")

    def replace(self, **changes: Any) -> DraftSpec:
        import dataclasses

        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        acc = self.acceptance
        return {"model": self.model.name, "quant": self.model.quant, "tokens": self.tokens, "device": self.device,
                "where": self.where, "acceptance": acc.describe() if hasattr(acc, "describe") else str(acc)}


def check_compatible(target: ModelSpec, draft: ModelSpec) -> None:
    """prima.cpp's common_speculative_are_compatible, on what a spec knows: the same vocabulary
    (sizes within 128 of each other; tokens are checked by the runtime on real files)."""
    if abs(target.vocab - draft.vocab) > 128:
        raise SpecError(f"draft {draft.name} has a vocabulary of {draft.vocab} tokens, the target {target.name} "
                        f"{target.vocab}: they cannot share token ids", where="--draft",
                        fix="use a draft of the target's family (same tokenizer), e.g. llama3.2-1b for Llama 3")


def prefix_draft(target: ModelSpec, n_layers: int) -> ModelSpec:
    """The spec of a draft made of the target's first `n_layers` blocks and its own embedding and
    head (`primasim.runtime.speculative.write_prefix_draft` writes its weights): a draft that
    agrees with the target to a degree set by how much the remaining blocks change the result."""
    import dataclasses

    if not 1 <= n_layers < target.n_layers:
        raise SpecError(f"a prefix draft needs 1..{target.n_layers - 1} of the target's {target.n_layers} blocks, "
                        f"got {n_layers}", where="--draft", fix=f"e.g. first:{max(1, target.n_layers // 8)}")
    return dataclasses.replace(target, n_layers=n_layers, name=f"{target.name}-first{n_layers}",
                               measured_bytes=None)


def draft_bytes(draft: ModelSpec, n_ctx: int) -> float:
    """Memory the draft pins on its device: its weights (mlocked in prima.cpp; copied into anonymous
    memory by primasim's runtime), its KV cache for `n_ctx` positions and its compute buffer."""
    return float(draft.total_bytes + draft.n_layers * draft.kv_bytes_per_token() * n_ctx
                 + draft.compute_buffer_bytes(n_ctx))


def draft_placement(draft: DraftSpec, cluster: ClusterSpec, head: str, n_ctx: int) -> tuple[str, Where]:
    """(device, cpu|gpu) the draft runs on: the given ones, else the head, on its GPU when the
    draft fits the free VRAM (prima.cpp's -ngld default offloads it), else on its CPU."""
    name = draft.device or head
    if name not in cluster.names:
        raise SpecError(f"draft device {name!r} is not in cluster {cluster.name}", where="--draft-on",
                        fix=f"use one of {', '.join(cluster.names)}")
    dev = cluster.device(name)
    if draft.where == "gpu":
        if dev.gpu is None:
            raise SpecError(f"device {name} has no GPU for the draft", where="--draft-on", fix=f"use {name}:cpu")
        return name, "gpu"
    if draft.where == "cpu":
        return name, "cpu"
    need = draft_bytes(draft.model, n_ctx)
    if dev.gpu is not None and need + dev.gpu.compute_buffer <= dev.gpu.vram_avail:
        return name, "gpu"
    return name, "cpu"


def with_draft(cluster: ClusterSpec, draft: DraftSpec, head: str, n_ctx: int, *, runtime: bool = False) -> ClusterSpec:
    """The cluster as the target sees it once the draft is loaded on its device: the draft's bytes
    taken from that device's VRAM (on its GPU) or RAM. prima.cpp's profiler reports a fraction of
    what the OS has available (`avail_reported_fraction`), so pinning D bytes lowers the reported
    figure by that fraction of D and the OS's own figure by D. Raises SpecError if it does not fit.
    `runtime`: the draft as primasim's runtime holds it (`runtime_facts.draft_reserve`)."""
    name, where = draft_placement(draft, cluster, head, n_ctx)
    dev = cluster.device(name)
    need = float(draft_reserve(draft.model, n_ctx)) if runtime else draft_bytes(draft.model, n_ctx)
    if where == "gpu" and dev.gpu is not None and not dev.uma:
        left = dev.gpu.vram_avail - need
        if left < 0:
            raise SpecError(f"the draft ({need / 2**30:.2f} GiB) does not fit {name}'s free VRAM "
                            f"({dev.gpu.vram_avail / 2**30:.2f} GiB)", where="--draft", fix=f"use --draft-on {name}:cpu")
        import dataclasses

        return cluster.replace_device(dev.replace(gpu=dataclasses.replace(dev.gpu, vram_avail=left)))
    left = dev.ram_avail - need * dev.avail_fraction
    if left <= 0:
        raise SpecError(f"the draft ({need / 2**30:.2f} GiB) does not fit {name}'s available RAM "
                        f"({dev.ram_avail / 2**30:.2f} GiB)", where="--draft",
                        fix="use a smaller draft or put it on another device (--draft-on)")
    changes: dict[str, Any] = {"ram_avail": left}
    if dev.uma and dev.gpu is not None:  # a Metal device's working set shrinks with it
        import dataclasses

        changes["gpu"] = dataclasses.replace(dev.gpu, vram_avail=max(0.0, dev.gpu.vram_avail - need))
    return cluster.replace_device(dev.replace(**changes))


def tokens_of(passes: Sequence[tuple[int, int]]) -> int:
    """Tokens a run of passes produced (each pass: its accepted drafts + one)."""
    return sum(a + 1 for _, a in passes)


def break_even_alpha(k: int, c: float, rho: float) -> float:
    """The per-token acceptance above which k drafts beat plain decoding (speedup > 1), by bisection."""
    if speedup(1.0, k, c, rho) <= 1.0:
        return math.inf
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if speedup(mid, k, c, rho) <= 1.0 else (lo, mid)
    return hi
