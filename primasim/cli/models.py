"""`primasim models`: list the built-in model catalogue with derived sizes."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from primasim.core.model_sources import catalogue, load_model
from primasim.core.units import GB

from . import HELP
from .output import console


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help=HELP["models"])
    p.add_argument("--model", help="describe one model: catalogue name, config.json or .gguf")
    p.add_argument("--quant", help="quantisation: f32, f16, q8_0, q4k")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    specs = [load_model(args.model, args.quant)] if args.model else [
        m.with_quant(args.quant) for m in catalogue().values()]
    if args.json:
        print(json.dumps([m.summary() for m in specs], indent=2))
        return 0
    t = Table(title="models")
    for col in ("name", "family", "quant", "L", "e", "heads/kv", "ffn", "vocab", "params", "layer MB", "total GB"):
        t.add_column(col, justify="right" if col not in ("name", "family", "quant") else "left")
    for m in specs:
        t.add_row(m.name, m.family, m.quant, str(m.n_layers), str(m.hidden), f"{m.n_heads}/{m.n_kv_heads}",
                  str(m.ffn), str(m.vocab), f"{m.n_params / 1e9:.2f}B", f"{m.layer_bytes / 1e6:.1f}",
                  f"{m.total_bytes / GB:.2f}")
    console().print(t)
    return 0
