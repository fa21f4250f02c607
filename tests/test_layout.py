"""The house's layout: every package installs, under one top-level name."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _source_packages() -> set[str]:
    found = set()
    for top, name in (("primasim", "primasim"), ("runtime", "primasim.runtime")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_package_is_listed_for_the_wheel() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    missing = _source_packages() - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    assert cfg["package-dir"]["primasim.runtime"] == "runtime"


def test_the_runtime_installs_as_primasim_runtime_only(tmp_path: Path) -> None:
    code = ("import importlib.util, primasim.runtime; "
            "print(importlib.util.find_spec('runtime') is None, primasim.runtime.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "primasim.runtime"]
