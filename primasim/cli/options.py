"""What several commands share: `--option KEY=VALUE` (a system's planner options) and JSON output."""

from __future__ import annotations

import argparse
import math
from typing import Any

from primasim.core.errors import SpecError


def add_option_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=help)


def parse_value(v: str) -> Any:
    """'true'/'false' -> bool, then int, then float, else the string."""
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_options(items: list[str], example: str = "S=4") -> dict[str, Any]:
    """The `--option KEY=VALUE` items as a dict (later items win); junk is one clear SpecError."""
    opts: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SpecError(f"--option {item!r} is not KEY=VALUE", where="--option", fix=f"e.g. --option {example}")
        key, val = item.split("=", 1)
        opts[key.strip()] = parse_value(val.strip())
    return opts


def jsonable(x: Any) -> Any:
    """json.dumps(default=...): NaN/inf as null, numpy scalars as numbers, anything else as text."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item"):
        return x.item()
    return str(x)
