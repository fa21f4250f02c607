"""Parameter sweeps at scale: specs (grids, sampled ranges, conditional axes, generated clusters),
an engine that runs batches of cells on a local process pool or a Dask cluster with bounded
memory, a Parquet dataset written one part per batch, resume after any stop, and the analysis
(`sweep-report`). See docs/sweeps.md.
"""

from .engine import SweepRun as SweepRun, default_out as default_out, run_sweep as run_sweep
from .evaluate import Context as Context, apply_knobs as apply_knobs, build_context as build_context
from .knobs import KNOBS as KNOBS, knobs_table as knobs_table
from .spec import (
    SweepSpec as SweepSpec,
    cell_id as cell_id,
    load_spec as load_spec,
    spec_from_dict as spec_from_dict,
)
from .store import (
    iter_batches as iter_batches,
    load_results as load_results,
    open_results as open_results,
    write_csv as write_csv,
)

load_sweep_spec = load_spec  # the names primasim's curated API re-exports
load_sweep = load_results


def sweep_report(out: str, **kw: object) -> object:
    """Tables and figures of the sweep in `out` (primasim.loop.sweep.report.sweep_report)."""
    from .report import sweep_report as _report

    return _report(out, **kw)  # type: ignore[arg-type]


__all__ = ["load_sweep_spec", "load_sweep", "sweep_report", "SweepRun", "run_sweep", "default_out", "Context", "apply_knobs", "build_context", "KNOBS",
           "knobs_table", "SweepSpec", "cell_id", "load_spec", "spec_from_dict", "iter_batches", "load_results",
           "open_results", "write_csv"]
