"""Planning with a draft model: where the draft lives, how many tokens it drafts, and the plan.

Speculative decoding changes two things Halda optimises (reference speculation-and-serving.md 2.6):

- **memory**: the draft is loaded first and pinned on its device, so the target is planned on
  that device's memory without it (`primasim.core.speculation.with_draft`);
- **the objective**: a pass verifies B = K + 1 positions, so the per-layer compute (FLOPs, KV
  appends) and the head's output layer scale with B while weight reads, disk reloads and hop
  latencies do not. Halda gets this as per-device corrections (`DeviceCorrection`: seconds per CPU
  and GPU layer, head seconds) built from the cost model's own batch-independent and per-token
  parts, so as K grows it moves layers towards devices with spare FLOPS (GPUs).

For every placement of the draft (each device's CPU, and GPU where it has one and the draft
fits) and every K, Halda plans the target on the cluster with the draft loaded, the cost model
gives the verification pass T_v(K) and the draft's per-token time t_d, and the expected time per
output token is (K t_d + T_v(K) [+ two small messages when the draft is not on the head]) / E[X],
with E[X] the expected tokens per pass under the draft's acceptance model. K = 0 (no draft, full
memory) is always a candidate, so speculation is only recommended where it pays.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from primasim.core.cluster import ClusterSpec
from primasim.core.errors import SpecError
from primasim.core.model import ModelSpec
from primasim.core.plan import Plan
from primasim.core.speculation import (
    DraftSpec,
    Where,
    check_compatible,
    draft_bytes,
    parse_acceptance,
    with_draft,
)

from .cost import CostModel, DeviceCorrection, _plan_cost_model, _ring_totals, _seconds
from .planners import make_plan

#: K values the planner tries by default (K = 0 is plain decoding).
DEFAULT_KS = tuple(range(0, 9))
TOKEN_MSG_BYTES = 64.0  # token ids + header, head <-> a draft on another device


def planner_variant(options: dict[str, Any]) -> tuple[str, bool]:
    """The cost-model variant and communication flag Halda uses under these planner options."""
    mode = str(options.get("planner", "global"))
    variant = str(options.get("variant") or ("code" if mode == "loop" else "paper"))
    comm = bool(options.get("comm", mode != "loop"))
    return variant, comm


def batch_corrections(model: ModelSpec, cluster: ClusterSpec, n_tokens: int, *, n_ctx: int,
                      variant: str = "paper", comm: bool = True) -> dict[str, DeviceCorrection]:
    """Per-device coefficients of a pass of `n_tokens` positions for Halda: a layer's time is its
    one-token time plus (n_tokens - 1) times its per-token part (FLOPs + KV append; the weight read
    is paid once), and the head's output layer computes n_tokens rows."""
    cm = CostModel.for_cluster(model, cluster, n_ctx=n_ctx, variant=variant, comm=comm)
    extra = n_tokens - 1
    out: dict[str, DeviceCorrection] = {}
    head = cluster.device(cluster.head)
    out_flops = model.output_flops() if variant == "paper" else model.layer_flops_avg(min(n_ctx, 256))
    head_s = n_tokens * _seconds(out_flops, head.cpu_rate)
    for i, d in enumerate(cluster.devices):
        cpu = float(cm.alpha[i] + extra * cm.tok_cpu[i])
        gpu = float(cm.alpha[i] + cm.beta[i] + extra * cm.tok_gpu[i]) if d.gpu is not None else None
        out[d.name] = DeviceCorrection(cpu_layer_s=cpu, gpu_layer_s=gpu,
                                       head_s=head_s if d.name == cluster.head else None)
    return out


def pass_time(plan: Plan, model: ModelSpec, cluster: ClusterSpec, n_tokens: int, *, variant: str = "paper",
              comm: bool = True) -> float:
    """The cost model's time of one ring pass of `n_tokens` positions of `plan` (seconds): every
    device's compute (per-token parts x n_tokens), disk reloads and hops (activations x n_tokens),
    and the head's output layer for n_tokens rows."""
    cm, _ = _plan_cost_model(plan, model, cluster, variant=variant, comm=comm)
    lt, lg, wm = _ring_totals(plan)
    t = cm.device_times(lt, lg, wm, pinned=plan.weights == "pinned", n_tokens=n_tokens)
    head = cluster.device(plan.head)
    out_flops = model.output_flops() if variant == "paper" else model.layer_flops_avg(min(plan.n_ctx, 256))
    rows = (n_tokens - 1) * _seconds(out_flops, head.cpu_rate)
    return float(t["compute"].sum() + t["disk"].sum() + t["comm"].sum() + cm.head_time() + rows)


def draft_token_time(draft: ModelSpec, cluster: ClusterSpec, device: str, where: Where, *, n_ctx: int) -> float:
    """The cost model's time of one draft token on `device` (its CPU or GPU): every draft block
    and the draft's output layer, weights pinned (no disk)."""
    dev = cluster.device(device)
    cm = CostModel(draft, [dev], cluster.network, 0, n_ctx=n_ctx, variant="paper")
    L = draft.n_layers
    lg = L if (where == "gpu" and dev.gpu is not None) else 0
    t = cm.device_times(np.array([float(L)]), np.array([float(lg)]), np.array([1.0]), pinned=True)
    return float(t["compute"].sum() + cm.head_time())


@dataclass
class DraftCandidate:
    """One (placement, K) the planner evaluated."""

    device: str
    where: str
    k: int
    feasible: bool
    reason: str = ""
    plan: Plan | None = None
    t_draft_s: float = 0.0  # one draft token
    t_pass_s: float = 0.0  # one verification pass (K + 1 positions)
    t_msgs_s: float = 0.0  # head <-> draft device messages per pass
    tokens_per_pass: float = 1.0
    tpot_s: float = float("inf")  # expected time per output token

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "where": self.where, "k": self.k, "feasible": self.feasible,
                "reason": self.reason, "t_draft_ms": self.t_draft_s * 1e3, "t_pass_ms": self.t_pass_s * 1e3,
                "t_msgs_ms": self.t_msgs_s * 1e3, "tokens_per_pass": self.tokens_per_pass,
                "tpot_ms": self.tpot_s * 1e3 if np.isfinite(self.tpot_s) else None,
                "plan": None if self.plan is None else self.plan.describe()}


@dataclass
class DraftPlan:
    """The planner's answer: the best (placement, K, plan), the plain-decoding baseline, everything tried."""

    best: DraftCandidate
    baseline: DraftCandidate
    candidates: list[DraftCandidate] = field(default_factory=list)
    draft: DraftSpec | None = None
    outcome: Any = None  # the make_plan outcome of the best candidate

    @property
    def draft_spec(self) -> DraftSpec | None:
        """The draft as chosen (device, where, K), or None when plain decoding is best."""
        if self.draft is None or self.best.k == 0:
            return None
        return self.draft.replace(device=self.best.device, where=self.best.where, tokens=self.best.k)

    def table(self) -> list[dict[str, Any]]:
        return [c.to_json() for c in self.candidates]

    def to_json(self) -> dict[str, Any]:
        b = self.best
        gain = (1.0 - b.tpot_s / self.baseline.tpot_s) if np.isfinite(self.baseline.tpot_s) else None
        return {"best": b.to_json(), "baseline": self.baseline.to_json(), "tpot_gain": gain,
                "draft": None if self.draft is None else self.draft.to_json(), "candidates": self.table()}


def placements(draft: DraftSpec, cluster: ClusterSpec) -> list[tuple[str, Where]]:
    """Where the draft may run: the given device (and side), else every device's CPU and GPU."""
    names = [draft.device] if draft.device else cluster.names
    out: list[tuple[str, Where]] = []
    for n in names:
        if n not in cluster.names:
            raise SpecError(f"draft device {n!r} is not in cluster {cluster.name}", where="--draft-on",
                            fix=f"use one of {', '.join(cluster.names)}")
        dev = cluster.device(n)
        sides: list[Where] = [draft.where] if draft.where else (["gpu", "cpu"] if dev.gpu is not None else ["cpu"])
        out.extend((n, s) for s in sides)
    return out


def plan_speculative(system: str, model: ModelSpec, cluster: ClusterSpec, draft: DraftSpec, *, n_ctx: int = 1024,
                     prompt_tokens: int = 16, ks: Iterable[int] | None = None, fixed_k: int | None = None,
                     where_options: Sequence[tuple[str, Where]] | None = None, runtime: bool = False,
                     **options: Any) -> DraftPlan:
    """Plan `model` with `draft` on `cluster` for `system` (a prima/llama.cpp-style ring): for every
    placement and K, Halda (or the system's planner) on the cluster with the draft loaded, told the
    verification batch K + 1; the expected TPOT picks the best. `fixed_k` plans for that K only
    (the table still lists the others); K = 0 is plain decoding on the cluster without the draft.
    `runtime`: the draft's memory as primasim's runtime holds it (plans run by the runtime)."""
    check_compatible(model, draft.model)
    acc = parse_acceptance(draft.acceptance)
    kset = sorted({0, *(ks if ks is not None else DEFAULT_KS), *(() if fixed_k is None else (fixed_k,))})
    variant, comm = planner_variant(options)
    halda_like = system in ("prima", "prima-no-prefetch")

    def outcome_for(cl: ClusterSpec, k: int) -> Any:
        opts = dict(options)
        if halda_like and k > 0:
            opts["corrections"] = batch_corrections(model, cl, k + 1, n_ctx=n_ctx, variant=variant, comm=comm)
        return make_plan(system, model, cl, n_ctx=n_ctx, prompt_tokens=prompt_tokens, **opts)

    def evaluate(cl: ClusterSpec, out: Any, dev: str, where: str, k: int, t_d: float) -> DraftCandidate:
        if not out.feasible or out.plan is None:
            return DraftCandidate(dev, where, k, False, out.reason or "no feasible plan")
        plan = out.plan
        if plan.schedule != "ring":
            return DraftCandidate(dev, where, k, False, f"{system} is not a ring schedule")
        t_v = pass_time(plan, model, cl, k + 1, variant="paper", comm=True)
        msgs = 0.0
        if k > 0 and dev != plan.head:
            msgs = cl.network.transfer_time(plan.head, dev, TOKEN_MSG_BYTES) + \
                cl.network.transfer_time(dev, plan.head, TOKEN_MSG_BYTES)
        x = 1.0 + (acc.expected(k) if k > 0 else 0.0)
        tpot = (k * t_d + t_v + msgs) / x
        return DraftCandidate(dev, where, k, True, "", plan, t_d, t_v, msgs, x, tpot)

    base_out = outcome_for(cluster, 0)
    baseline = evaluate(cluster, base_out, cluster.head, "-", 0, 0.0)
    cands: list[DraftCandidate] = [baseline]
    outcomes: dict[int, Any] = {id(baseline): base_out}
    for dev, where in (where_options or placements(draft, cluster)):
        spec = draft.replace(device=dev, where=where)
        try:
            cl = with_draft(cluster, spec, cluster.head, n_ctx, runtime=runtime)
        except SpecError as exc:
            for k in kset:
                if k > 0:
                    cands.append(DraftCandidate(dev, where, k, False, exc.what))
            continue
        t_d = draft_token_time(draft.model, cluster, dev, where, n_ctx=n_ctx)
        for k in kset:
            if k == 0:
                continue
            out = outcome_for(cl, k)
            c = evaluate(cl, out, dev, where, k, t_d)
            outcomes[id(c)] = out
            cands.append(c)
    pool = [c for c in cands if c.feasible and (fixed_k is None or c.k == fixed_k)]
    if not pool:
        best = next((c for c in cands if fixed_k is None or c.k == fixed_k), baseline)
    else:
        best = min(pool, key=lambda c: c.tpot_s)
    return DraftPlan(best, baseline, cands, draft, outcomes.get(id(best)))


def draft_memory_note(draft: DraftSpec, n_ctx: int) -> str:
    return f"draft {draft.model.name} ({draft.model.quant}) pins {draft_bytes(draft.model, n_ctx) / 2**30:.2f} GiB"
