"""The `primasim` command. Each subcommand lives in its own module `primasim/cli/<name>.py`
exposing `add_parser(subparsers)` and `run(args) -> int`. Those modules import heavy libraries
(JAX, CVXPY, SimPy) inside `run`, so `primasim --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..core.errors import PrimasimError

COMMANDS = ("plan", "simulate", "run", "serve", "profile", "worker", "keys", "validate", "reproduce", "sweep", "sweep_report",
            "models", "clusters")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="primasim",
        description="Predict, plan and run LLM inference on home clusters of weak, mixed devices.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"primasim.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"primasim.cli.{name}":
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PrimasimError as exc:
        print(f"primasim {args.command}: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"primasim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
