"""Where every command prints: readable on a terminal, in a file, a pager or a pipe.

Piped, rich would cut tables to 80 columns ("lla…"); here a console that is not a terminal gets
no width limit and no colour codes, so `primasim models | cat` and `> file` keep every name.
"""

from __future__ import annotations

import sys

from rich.console import Console

UNLIMITED = 100_000  # columns for output that is not a terminal: tables keep their natural width


def console(*, stderr: bool = False) -> Console:
    """A rich Console for stdout (or stderr): the terminal's width on a terminal, else unlimited."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=UNLIMITED, color_system=None, highlight=False, emoji=False)


def print_infeasible(con: Console, title: str, reason: str) -> None:
    """The one way a command says that a system cannot run a case (it is a result, not an error)."""
    con.print(f"[bold]{title}[/bold]\n[red]cannot run this case:[/red] {reason}")
