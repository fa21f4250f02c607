"""What several test files share, once: the root check and the models and clusters they build.

Tests that need root (cgroups, network namespaces, tc) are marked `@pytest.mark.root` and skip
elsewhere with the reason; CI runs as root, so there they run. `ROOT` is for tests that run either
way and check more as root (`from conftest import ROOT`).
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import IO

import pytest
from hypothesis import settings

from primasim import ClusterSpec, load_cluster, load_model
from primasim.runtime.checkpoint import write_random_checkpoint
from primasim.runtime.emulate import is_root

ROOT = is_root()

# The suite's property tests draw the same examples on every run (a hash of each test): CI's clean
# clone has no example database, so random draws made a rare counterexample a flaky red run that
# nobody could replay. PRIMASIM_HYPOTHESIS=explore draws afresh (run it when changing a model).
settings.register_profile("suite", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("PRIMASIM_HYPOTHESIS", "suite"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (cgroups, network namespaces, tc); CI runs as root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llama_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight llama-tiny checkpoint (safetensors, seed 7) for tests about anything but
    the architecture; session-wide, so it is written once."""
    return write_random_checkpoint(load_model("llama-tiny"), tmp_path_factory.mktemp("llama") / "llama-tiny", seed=7)


@pytest.fixture(scope="session")
def d1d4() -> ClusterSpec:
    """prima.cpp's four-device testbed."""
    return load_cluster("prima-d1-d4")


class Lines:
    """The lines a child process writes to a pipe, read by a thread, so a test can wait for one
    (an event, with a generous limit) instead of sleeping and hoping."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._new = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()

    def wait_for(self, pattern: str, timeout: float = 120.0) -> str:
        """The first line matching `pattern` (a regex), waiting up to `timeout` s for it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                hit = next((ln for ln in self.lines if rx.search(ln)), None)
                if hit is not None:
                    return hit
                left = deadline - time.monotonic()
                assert left > 0, f"no line matching {pattern!r} within {timeout:.0f} s: {''.join(self.lines)[-2000:]}"
                self._new.wait(min(left, 1.0))

    @property
    def text(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.lines)


def wait_until(cond: object, timeout: float = 120.0, what: str = "condition") -> None:
    """Poll `cond()` until it holds, up to `timeout` s (for state only visible by polling: files, /proc)."""
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.05)


