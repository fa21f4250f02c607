"""Reproduce the papers' figures and tables from the simulator (`primasim reproduce NAME`).

framework.py: the registry of targets, rows, claims, `reproduce()`; one module per paper registers
its targets (prima.py: prima.cpp's Table 4, Table 5, Fig. 2, 8, 10; prima_spec.py: its speculative decoding; mdi.py; bud.py; pipo.py);
timeline.py: a trace's timeline plot.
"""

# each module registers its targets; the import order is the targets' order (`--list`, `all`)
# isort: off
from . import prima, prima_spec, mdi, bud, pipo  # noqa: F401
# isort: on
from .framework import (
    TARGETS as TARGETS,
    Result as Result,
    TargetOptions as TargetOptions,
    get_target as get_target,
    reproduce as reproduce,
    target_names as target_names,
)
from .timeline import plot_timeline as plot_timeline
