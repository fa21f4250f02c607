"""The worker plugin that installs a sweep's context in every Dask worker's process, once, including
workers that join later (a module of its own: it imports distributed, which local sweeps never need)."""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from .evaluate import Context, drop_context, install_context


class ContextPlugin(WorkerPlugin):
    """Installs a sweep's context in a Dask worker's process (and removes it when unregistered)."""

    def __init__(self, name: str, ctx: Context) -> None:
        self.name = name
        self.ctx = ctx

    def setup(self, worker: Any) -> None:
        install_context(self.name, self.ctx)

    def teardown(self, worker: Any) -> None:
        drop_context(self.name)
