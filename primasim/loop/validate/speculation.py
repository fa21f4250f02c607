"""`primasim validate --draft`: the draft's weights, the acceptance model the prediction uses, the
plan with the draft loaded, and the speculation rows of the comparison.

The acceptance model of the prediction is never taken from the run it is compared with. Unless
`--acceptance` gives one (a rate, rates per position or an acceptance log), it comes from a
*separate* run of the runtime's own speculative loop (`primasim.runtime.speculative.
speculative_generate`: the same draft, target, prompt and K, in this process, before the cluster
runs): its pass-by-pass acceptance log is replayed by the simulator. At temperature 0 a draft's
proposals and the target's verdicts are functions of the prompt, so that log is what the ring
accepts too (up to floating point: batch sizes round differently); the comparison reports both
sides' tokens per pass, so a difference shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from primasim.core.cluster import ClusterSpec
from primasim.core.errors import PlanError
from primasim.core.model import ModelSpec
from primasim.core.runtime_facts import runtime_model
from primasim.core.speculation import AcceptanceLog, DraftSpec, Replay, parse_acceptance
from primasim.plan.draft import plan_speculative
from primasim.runtime.checkpoint import open_checkpoint
from primasim.runtime.speculative import Draft, open_draft_ref, speculative_generate

from ..row import Row


def draft_weights(ref: str, weights: Any) -> tuple[Path, ModelSpec]:
    """The draft checkpoint `ref` names (a path, or first:N of the random-weight target) and its spec."""
    path = open_draft_ref(ref, open_checkpoint(weights))
    return path, open_checkpoint(path).spec


def measure_acceptance(weights: Any, draft_path: Path, prompt: list[int], tokens: int, k: int,
                       n_ctx: int) -> AcceptanceLog:
    """A separate run of the runtime's speculative loop in this process (all blocks in one window,
    greedy): its acceptance log (drafted, accepted per pass)."""
    from primasim.runtime import model as md  # JAX: only when validating with a draft

    ckpt = open_checkpoint(weights)
    spec = ckpt.spec
    params = md.load_params(ckpt, range(spec.n_layers), embed=True, head=True)
    max_seq = min(n_ctx, len(prompt) + tokens + k + 1)
    gen = speculative_generate(params, Draft(draft_path, max_seq, target=spec), prompt, tokens, k, max_seq=max_seq)
    return AcceptanceLog(list(gen.passes), {"how": "primasim.runtime.speculative.speculative_generate, one process, "
                                                   "greedy, the validation's prompt", "target": spec.name,
                                            "draft": str(draft_path), "k": k, "prompt_ids": prompt,
                                            "tokens": tokens})


def acceptance_model(text: str, log: AcceptanceLog | None) -> Any:
    """`--acceptance` if given, else the replay of the separately measured log."""
    if text:
        return parse_acceptance(text)
    assert log is not None
    return Replay(log)


def draft_spec(draft_model: ModelSpec, k: int, head: str, acceptance: Any) -> DraftSpec:
    """The draft as the runtime runs it: on the head's CPU, held as `runtime_facts.draft_reserve`."""
    return DraftSpec(runtime_model(draft_model), k, head, "cpu", acceptance)


def plan_with_draft(system: str, model: ModelSpec, cluster: ClusterSpec, draft: DraftSpec, *, n_ctx: int,
                    prompt_tokens: int, options: dict[str, Any]) -> Any:
    """Halda (or `system`'s planner) on the cluster with the draft loaded on the head, for K + 1
    positions per pass."""
    dp = plan_speculative(system, model, cluster, draft, n_ctx=n_ctx, prompt_tokens=prompt_tokens,
                          ks=(draft.tokens,), fixed_k=draft.tokens, where_options=[(cluster.head, "cpu")],
                          runtime=True, **options)
    out = dp.outcome
    if out is None or not out.feasible or out.plan is None:
        why = dp.best.reason or (out.reason if out is not None else "no feasible plan")
        raise PlanError(f"{system} cannot run {model.name} with draft {draft.model.name} on {cluster.name}: {why}",
                        where="--draft", fix="use a smaller draft (first:N with a smaller N) or give the head more memory")
    return out.plan


def speculation_rows(sim: Any, run: Any) -> list[Row]:
    """Tokens per pass and the per-token acceptance (alpha-hat), predicted vs measured."""
    p = sim.extra.get("speculation", {})
    m = run.trace.meta.get("speculation", {})
    rows = []
    for metric, key in (("tokens per pass", "tokens_per_pass"), ("acceptance (alpha-hat)", "alpha_hat")):
        if key in p and key in m:
            rows.append(Row("", "", metric, "", float(p[key]), float(m[key]), device=""))
    return rows
