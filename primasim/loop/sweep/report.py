"""`primasim sweep-report DIR`: what a sweep says, as pandas tables and figures written beside the data.

Vocabulary. A *scenario* is everything a cell sets except the system and the system's own
settings: model, cluster, bandwidth, RAM ... A knob set only for some cells (a `[[when]]` axis such
as mdi-llm's S) is a *setting*: each system is credited with its best setting per scenario.
Replicates (`seed`) are averaged. Infeasible cells (OOM, no plan) have no metric; cells that
failed with an error are counted and left out.

Tables (CSV in DIR/report/, also returned): `systems` (per system: scenarios feasible, won, median
metric), `best` (per scenario: the best system, its metric, the runner-up and the margin), `speedups`
(per scenario, each system against the baseline), `speedup_summary`, `feasibility` (feasible share
per system along each numeric knob), `limits` (where each system stops being feasible), and
`crossovers` (where the faster of two systems changes along the x knob). Figures: `heatmap_best.png`
(which system wins over x and y), `heatmap_speedup.png` (the focus system against the best other),
`crossover.png` (metric against x per system). `README.md` sums it up.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from primasim.core import io as _io
from primasim.core.errors import SpecError

from .figures import crossover_figure, heatmap_best, heatmap_speedup
from .knobs import KNOBS
from .store import load_results, open_results
from .tables import (
    Report as Report,
    _better,
    _system_sort,
    best_table,
    choose_axes,
    crossovers as crossovers,
    curves as curves,
    feasibility,
    limits,
    prepare as prepare,
    speedup_summary,
    speedups,
)


def sweep_report(out: str | Path, *, metric: str = "tpot_ms", baseline: str | None = None, focus: str | None = None,
                 x: str | None = None, y: str | None = None, facet: str | None = None,
                 report_dir: str | Path | None = None, figures: bool = True, where: str | None = None) -> Report:
    """Tables and figures of the sweep in `out`, written to `out/report/` (or `report_dir`);
    `where` keeps only the rows a pandas query selects (e.g. "cluster == 'prima-d1-d4'")."""
    out = Path(out)
    ds = open_results(out)
    cols = [c for c in ds.schema.names if c in KNOBS or c in (metric, "feasible", "error")]
    extra = tuple(k for k in (x, y) if k and k not in KNOBS and k in ds.schema.names)
    df = load_results(out, columns=cols + list(extra))
    if where:
        try:
            df = df.query(where)
        except Exception as exc:  # pandas raises many kinds for a bad expression
            raise SpecError(f"cannot select rows with {where!r} ({type(exc).__name__}: {exc})", where="--where",
                            fix=f"a pandas query over {', '.join(df.columns)}, e.g. \"cluster == 'prima-d1-d4'\"") from None
        if df.empty:
            raise SpecError(f"{where!r} selects no rows", where="--where", fix="loosen the condition")
    rep = prepare(df, metric, extra_keys=extra)
    if extra:
        rep.numeric_keys += [k for k in extra if k not in rep.numeric_keys]
    rep.out = Path(report_dir) if report_dir else out / "report"
    systems = _system_sort(list(rep.per_system["system"].unique()))
    baseline = baseline or next((s for s in ("llama.cpp", "exo") if s in systems), systems[0])
    if baseline not in systems:
        raise SpecError(f"baseline {baseline!r} is not in the sweep", where="--baseline", fix=f"use one of {', '.join(systems)}")
    focus = focus or ("prima" if "prima" in systems else systems[0])
    if focus not in systems:
        raise SpecError(f"focus {focus!r} is not in the sweep", where="--focus", fix=f"use one of {', '.join(systems)}")
    xk, yk, facets = choose_axes(rep, x, y, facet)
    by = facets
    best = best_table(rep)
    per = rep.per_system
    sys_rows = []
    for s in systems:
        g = per[per["system"] == s]
        sys_rows.append({"system": s, "scenarios": len(g), "feasible": int(g["feasible"].sum()),
                         "won": int((best["best"] == s).sum()), f"median_{metric}": float(g[metric].median()),
                         "best_settings": ", ".join(f"{k} ({v})" for k, v in g["setting"].value_counts().head(3).items()
                                                    if k)})
    sp = speedups(rep, baseline)
    rep.tables = {"systems": pd.DataFrame(sys_rows), "best": best, "speedups": sp,
                  "speedup_summary": speedup_summary(sp, by, metric), "feasibility": feasibility(rep, by)}
    rep.tables["limits"] = limits(rep.tables["feasibility"], by)
    if xk is not None:
        cur = curves(rep, xk, facets + ([yk] if yk and per[yk].nunique() <= 4 else []))
        cur.attrs["higher_is_better"] = _better(metric) == "max"
        rep.tables["curves"] = cur
        log_x = bool((per[xk] > 0).all() and per[xk].max() / max(per[xk].min(), 1e-300) >= 20)
        rep.tables["crossovers"] = crossovers(cur, xk, [c for c in cur.columns if c in facets or c == yk], log_x)
    for name, t in rep.tables.items():
        _io.atomic_csv(rep.out / f"{name}.csv", t)
    if figures and xk is not None:
        if yk is not None:
            rep.figures["heatmap_best"] = heatmap_best(rep, best, xk, yk, facets, rep.out / "heatmap_best.png")
            rep.figures["heatmap_speedup"] = heatmap_speedup(rep, focus, xk, yk, facets, rep.out / "heatmap_speedup.png")
        rep.figures["crossover"] = crossover_figure(rep, rep.tables["curves"], xk, yk, facets, rep.out / "crossover.png")
    _io.atomic_write_text(rep.out / "README.md", markdown(rep, baseline, focus, xk, yk, facets))
    return rep


def markdown(rep: Report, baseline: str, focus: str, x: str | None, y: str | None, facets: list[str]) -> str:
    t = rep.tables
    lines = [f"# Sweep report: {rep.metric} ({'higher' if _better(rep.metric) == 'max' else 'lower'} is better)", "",
             f"Scenario keys: {', '.join(rep.scenario_keys)}; numeric: {', '.join(rep.numeric_keys) or 'none'}. "
             f"Baseline for speed-ups: {baseline}; focus: {focus}.", ""]
    lines += [f"- {n}" for n in rep.notes]
    lines += ["", "## Systems", "", _md(t["systems"]), "", f"## Speed-up over {baseline} (per {', '.join(facets) or 'sweep'})",
              "", _md(t["speedup_summary"]), ""]
    if not t["limits"].empty:
        lim = t["limits"][[c for c in t["limits"].columns if c not in ("limit", "min_share", "max_share")]]
        lines += ["## Where each system stops being feasible (feasible in >= half the scenarios)", "", _md(lim), ""]
    if "crossovers" in t and not t["crossovers"].empty:
        lines += [f"## Crossovers along {x}", "", _md(t["crossovers"]), ""]
    for name, path in rep.figures.items():
        lines += [f"![{name}]({path.name})", ""]
    lines += ["Tables: " + ", ".join(f"[{n}.csv]({n}.csv)" for n in t), ""]
    return "\n".join(lines)


def _md(df: pd.DataFrame, max_rows: int = 60) -> str:
    if df.empty:
        return "(none)"
    d = df.head(max_rows).copy()
    for c in d.columns:
        if pd.api.types.is_float_dtype(d[c]):
            d[c] = d[c].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
    head = "| " + " | ".join(map(str, d.columns)) + " |"
    sep = "|" + "---|" * len(d.columns)
    body = ["| " + " | ".join(str(v) for v in r) + " |" for r in d.itertuples(index=False)]
    more = [f"\n({len(df) - max_rows} more rows in the CSV)"] if len(df) > max_rows else []
    return "\n".join([head, sep, *body, *more])
