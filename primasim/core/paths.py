"""Where the built-in data (model catalogue, clusters, paper numbers) lives."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The data/ folder: inside an installed wheel, or at the repository root (editable install)."""
    env = os.environ.get("PRIMASIM_DATA")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]  # primasim/
    packaged = package / "_data"
    if packaged.is_dir():
        return packaged
    return package.parent / "data"


def cache_dir() -> Path:
    """Where generated artefacts (random-weight checkpoints, profiles) are cached."""
    env = os.environ.get("PRIMASIM_CACHE")
    if env:
        path = Path(env)
    else:
        repo = Path(__file__).resolve().parents[2]
        path = repo / ".cache" if (repo / "pyproject.toml").exists() else Path.home() / ".cache" / "primasim"
    path.mkdir(parents=True, exist_ok=True)
    return path
