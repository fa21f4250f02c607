"""The `primasim` command. Each subcommand lives in its own module `primasim/cli/<name>.py` (`-` in
a name is `_` in its module's) exposing `add_parser(subparsers)` and `run(args) -> int`, with its
imports at its top: only the command being run is imported (`primasim --help` lists them from HELP
without importing any), so `primasim plan` never loads JAX or zmq and `primasim models` not even CVXPY.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from primasim.core.errors import PrimasimError

HELP = {  # command -> its one line in `primasim --help`
    "plan": 'plan a model on a cluster (Halda or a baseline) and predict its latency',
    "simulate": 'simulate a system serving a model on a cluster (SimPy)',
    "run": 'run a model on a cluster with real workers (emulated devices on one host, or real ones)',
    "serve": 'serve a model on a cluster over an OpenAI-compatible HTTP API (completions, chat, streaming)',
    "profile": 'measure this device (compute, memory, disk, network) into a cluster file',
    "worker": 'serve one device of a real cluster (the head connects to it)',
    "keys": "make or show the cluster's CurveZMQ key pair (who may join a cluster)",
    "validate": 'the main job: profile emulated devices, plan, simulate, run, compare predicted vs measured',
    "reproduce": 'reproduce a paper table/figure (CSV + PNG, claims checked)',
    "sweep": 'run a parameter sweep (TOML spec) locally or on Dask; resumable',
    "sweep-report": 'analyse a sweep: best system per cell, speed-ups, feasibility limits, heatmaps and '
                    'crossover curves',
    "models": 'list built-in models (or describe one)',
    "clusters": 'list built-in clusters (or describe one)',
}
COMMANDS = tuple(HELP)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with `command`'s arguments in full (None: every command, e.g. for tests) and the
    other commands as names only."""
    parser = argparse.ArgumentParser(
        prog="primasim",
        description="Predict, plan and run LLM inference on home clusters of weak, mixed devices.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        if command is None or name == command:
            importlib.import_module(f"primasim.cli.{name.replace('-', '_')}").add_parser(sub)
        else:
            sub.add_parser(name, help=HELP[name])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command) if command in HELP else build_parser("")
    args = parser.parse_args(argv)
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a reader gone by now is the closed pipe below, not a traceback at exit
        return rc
    except PrimasimError as exc:
        print(f"primasim {args.command}: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"primasim {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`... --json | head -c 100`): stop quietly, as a Unix tool killed by
        # SIGPIPE would, and point stdout at /dev/null so the interpreter's last flush cannot raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
