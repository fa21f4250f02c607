"""The speculative-decoding flags shared by `plan`, `simulate`, `run` and `validate`:
`--draft MODEL [--draft-tokens K] [--draft-quant Q] [--draft-on DEV[:cpu|gpu]] [--acceptance A]`."""

from __future__ import annotations

import argparse
from typing import Any

from primasim.core.errors import SpecError
from primasim.core.model_sources import load_model
from primasim.core.speculation import (
    DEFAULT_DRAFT_TOKENS,
    DraftSpec,
    check_compatible,
    parse_acceptance,
)


def add_arguments(p: argparse.ArgumentParser, *, weights: bool = False, acceptance: bool = True) -> None:
    """Add the draft flags to a subcommand's parser (`weights`: the draft must be a checkpoint)."""
    g = p.add_argument_group("speculative decoding")
    what = ("a GGUF file or a directory with config.json + safetensors (same vocabulary as --model)" if weights
            else "catalogue name (e.g. llama3.2-1b), config.json or GGUF file with the target's vocabulary")
    g.add_argument("--draft", metavar="MODEL", default=None, help=f"draft model for speculative decoding: {what}")
    g.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="tokens the draft proposes per pass (K; each ring pass verifies K + 1 positions); "
                   "default: the planner's best K (plan, simulate) or 4 (run, validate)")
    if not weights:
        g.add_argument("--draft-quant", default=None, help="the draft's quantisation (default: the draft's own)")
    g.add_argument("--draft-on", default=None, metavar="DEV[:cpu|gpu]",
                   help="device (and side) running the draft; default: the head, on its GPU if the draft fits "
                   "its free VRAM (prima.cpp's placement)" + ("" if weights else "; `plan` tries every device if not given"))
    if acceptance:
        g.add_argument("--acceptance", default=None, metavar="A",
                       help="acceptance model: a per-token rate (0.7, i.i.d.), rates per draft position (0.9,0.8,0.7) "
                       "or an acceptance log written by `primasim run --acceptance-log` (replayed pass by pass); "
                       "default 0.7")


def placement(text: str | None) -> tuple[str | None, str | None]:
    if not text:
        return None, None
    dev, _, side = text.partition(":")
    if side and side not in ("cpu", "gpu"):
        raise SpecError(f"--draft-on {text!r}: the side must be cpu or gpu", where="--draft-on", fix="e.g. --draft-on D3:gpu")
    return dev or None, side or None


def draft_spec(args: argparse.Namespace, target: Any, *, default_k: int | None = None) -> Any:
    """The DraftSpec the flags describe (None without --draft); checks the flags belong together."""
    if args.draft is None:
        extra = [f for f, v in (("--draft-tokens", args.draft_tokens), ("--draft-on", args.draft_on),
                                ("--acceptance", getattr(args, "acceptance", None)),
                                ("--draft-quant", getattr(args, "draft_quant", None))) if v is not None]
        if extra:
            raise SpecError(f"{', '.join(extra)} need a draft model", where=extra[0], fix="add --draft MODEL")
        return None
    if args.draft_tokens is not None and args.draft_tokens < 0:
        raise SpecError(f"--draft-tokens must be >= 0, got {args.draft_tokens}", where="--draft-tokens",
                        fix="e.g. --draft-tokens 4 (0 = no speculation)")
    model = load_model(args.draft, getattr(args, "draft_quant", None))
    check_compatible(target, model)
    dev, side = placement(args.draft_on)
    k = args.draft_tokens if args.draft_tokens is not None else (default_k if default_k is not None else DEFAULT_DRAFT_TOKENS)
    return DraftSpec(model, k, dev, side, parse_acceptance(getattr(args, "acceptance", None)))  # type: ignore[arg-type]
