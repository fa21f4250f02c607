"""The CLI's output when it is not a terminal: whole tables, and a quiet exit on a closed pipe."""

from __future__ import annotations

import subprocess
import sys

from primasim import catalogue

PRIMASIM = [sys.executable, "-m", "primasim"]


def test_piped_tables_keep_every_name() -> None:
    out = subprocess.run([*PRIMASIM, "models"], capture_output=True, text=True, timeout=300, check=True).stdout
    assert "…" not in out and "\x1b[" not in out  # nothing cut, no colour codes in a pipe
    for name in catalogue():
        assert f" {name} " in out, name


def test_a_closed_pipe_ends_quietly() -> None:
    """`primasim simulate ... --json | head -c 100`: the reader is gone before the command writes
    (here its end of the pipe is closed at once, so this does not depend on who is faster)."""
    p = subprocess.Popen([*PRIMASIM, "simulate", "--cluster", "prima-d1-d4", "--model", "llama3-8b", "--tokens", "8",
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=600) == 141, err  # 128 + SIGPIPE, as a Unix tool stopped by the closed pipe
    assert err == "", err
