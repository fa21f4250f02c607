"""The tables of a sweep report (pandas, no I/O): a sweep's results per scenario and system, the
best system per scenario, speed-ups, feasibility limits, curves and crossovers. Vocabulary and
what each table holds: primasim/loop/sweep/report.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from primasim.core.errors import SpecError

from .knobs import KNOBS

HIGHER_IS_BETTER = {"throughput_tok_s"}
METRICS = ("tpot_ms", "ttft_ms", "throughput_tok_s", "tpot_p90_ms", "max_memory_pressure")
TIE = 0.01  # systems within 1 % of the best are listed as tied with it
MAX_BINS = 8  # a numeric knob with more distinct values (sampled) is cut into this many quantile bins
SYSTEM_ORDER = ("prima", "prima-no-prefetch", "prima-no-halda", "llama.cpp", "exo", "dllama", "mdi-llm", "pipo",
                "flexgen", "bud")


@dataclass
class Report:
    out: Path
    metric: str
    scenario_keys: list[str]
    numeric_keys: list[str]
    per_system: pd.DataFrame  # one row per (scenario, system): its best metric and setting
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _better(metric: str) -> str:
    return "max" if metric in HIGHER_IS_BETTER else "min"


def _system_sort(names: list[str]) -> list[str]:
    return sorted(names, key=lambda s: (SYSTEM_ORDER.index(s) if s in SYSTEM_ORDER else len(SYSTEM_ORDER), s))


def prepare(df: pd.DataFrame, metric: str = "tpot_ms", extra_keys: tuple[str, ...] = ()) -> Report:
    """Scenario keys, settings, replicates averaged, each system's best setting per scenario."""
    if metric not in df:
        raise SpecError(f"no column {metric!r} in the results", where="--metric", fix=f"use one of {', '.join(METRICS)}")
    if "system" not in df or df.empty:
        raise SpecError("the results have no rows", where="sweep-report", fix="run the sweep first")
    knobs = [c for c in df.columns if c in KNOBS and c != "system"] + [k for k in extra_keys if k in df]
    errors = df["error"].fillna("") != "" if "error" in df else pd.Series(False, index=df.index)
    notes = [f"{int(errors.sum()):,} of {len(df):,} cells failed with an error and are left out"] if errors.any() else []
    d = df[~errors].copy()
    d["_ok"] = d["feasible"].fillna(False).astype(bool) & d[metric].notna() & np.isfinite(d[metric].astype(float))
    d.loc[~d["_ok"], metric] = np.nan
    settings = [k for k in knobs if d[k].isna().any() and k not in extra_keys and k != "seed"]
    scen = [k for k in knobs if k not in settings and k != "seed"]
    for k in scen:  # a scenario key is never missing; settings get a printable label
        d[k] = d[k].astype(object)
    group = scen + ["system"] + settings
    if "seed" in d and d["seed"].nunique() > 1:  # replicates: mean metric, feasible if every replicate is
        d = d.groupby(group, dropna=False, sort=False).agg(**{metric: (metric, "mean"), "_ok": ("_ok", "all")}).reset_index()
        d.loc[~d["_ok"], metric] = np.nan
    d["setting"] = ""
    for k in settings:  # "S=4 k=2" (vectorised: sweeps have millions of rows)
        part = d[k].map(lambda v, k=k: "" if pd.isna(v) else f"{k}={_fmt(v)}")
        d["setting"] = (d["setting"] + " " + part).str.strip()
    asc = _better(metric) == "min"
    d = d.sort_values(metric, ascending=asc, na_position="last", kind="stable")
    per = d.groupby(scen + ["system"], sort=False, dropna=False).head(1)[scen + ["system", metric, "_ok", "setting"]]
    per = per.rename(columns={"_ok": "feasible"}).reset_index(drop=True)
    numeric = [k for k in scen if pd.api.types.is_numeric_dtype(df[k]) and df[k].nunique() > 1]
    return Report(out=Path("."), metric=metric, scenario_keys=scen, numeric_keys=numeric, per_system=per, notes=notes)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def best_table(rep: Report) -> pd.DataFrame:
    m, scen = rep.metric, rep.scenario_keys
    # not pivot_table(dropna=False): it builds the product of the index levels' values, which for a
    # sampled design (1,000 distinct bandwidths x latencies x ...) is billions of rows, not the scenarios
    wide = rep.per_system.groupby(scen + ["system"], dropna=False, sort=True)[m].first().unstack("system")
    wide = wide.reindex(columns=_system_sort(list(wide.columns)))
    vals = wide.to_numpy(dtype=float)
    sign = 1.0 if _better(m) == "min" else -1.0
    key = np.where(np.isnan(vals), np.inf, sign * vals)
    order = np.argsort(key, axis=1, kind="stable")
    cols = np.array(wide.columns)
    rows = []
    for i, idx in enumerate(wide.index):
        b, r = order[i, 0], order[i, 1] if vals.shape[1] > 1 else None
        best_ok = np.isfinite(key[i, b])
        run_ok = r is not None and np.isfinite(key[i, r])
        row = dict(zip(scen, idx if isinstance(idx, tuple) else (idx,)))
        row.update(best=cols[b] if best_ok else "none feasible", best_value=vals[i, b] if best_ok else np.nan,
                   runner_up=cols[r] if run_ok else "", runner_up_value=vals[i, r] if run_ok else np.nan,
                   feasible_systems=int(np.isfinite(key[i]).sum()),
                   tied=" ".join(str(c) for c, v in zip(cols, key[i]) if best_ok and c != cols[b]
                                 and np.isfinite(v) and abs(v - key[i, b]) <= TIE * abs(key[i, b])))
        row["margin"] = (row["runner_up_value"] / row["best_value"] if sign > 0 else row["best_value"] / row["runner_up_value"]) \
            if run_ok and best_ok else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def speedups(rep: Report, baseline: str) -> pd.DataFrame:
    """Per scenario and system: speed-up over the baseline (> 1: faster), NaN where either is infeasible."""
    m, scen = rep.metric, rep.scenario_keys
    per = rep.per_system
    base = per[per["system"] == baseline][scen + [m]].rename(columns={m: "baseline_value"})
    j = per.merge(base, on=scen, how="left")
    if _better(m) == "min":
        j["speedup"] = j["baseline_value"] / j[m]
    else:
        j["speedup"] = j[m] / j["baseline_value"]
    j["baseline"] = baseline
    return j[scen + ["system", m, "baseline", "baseline_value", "speedup", "setting"]]


def speedup_summary(sp: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    """Per system (and facet): geometric mean, median, range of the speed-up where both are feasible,
    the share of those scenarios where it is faster, and where only it (not the baseline) runs."""
    rows = []
    for key, g in sp.groupby(by + ["system"], sort=False, dropna=False):
        s = g["speedup"].dropna()
        s = s[s > 0]
        row = dict(zip(by + ["system"], key if isinstance(key, tuple) else (key,)))
        row.update(scenarios=len(g), both_feasible=len(s),
                   geomean=float(np.exp(np.log(s).mean())) if len(s) else np.nan,
                   median=float(s.median()) if len(s) else np.nan, min=float(s.min()) if len(s) else np.nan,
                   max=float(s.max()) if len(s) else np.nan, faster_share=float((s > 1).mean()) if len(s) else np.nan,
                   only_this_feasible=int((g[metric].notna() & g["baseline_value"].isna()).sum()))
        rows.append(row)
    return pd.DataFrame(rows)


def binned(values: pd.Series) -> pd.Series:
    """A numeric column as ordered values: itself if it has few values, else quantile-bin centres."""
    v = values.astype(float)
    if v.nunique() <= MAX_BINS * 2:
        return v
    q = pd.qcut(v, MAX_BINS, duplicates="drop")
    positive = (v > 0).all()
    centres = {iv: (math.sqrt(max(iv.left, v.min()) * iv.right) if positive else (iv.left + iv.right) / 2)
               for iv in q.cat.categories}
    return q.map(centres).astype(float)


def feasibility(rep: Report, by: list[str]) -> pd.DataFrame:
    per = rep.per_system
    rows = []
    for k in rep.numeric_keys:
        tmp = per.assign(_x=binned(per[k]))
        g = tmp.groupby(by + ["system", "_x"], sort=True, dropna=False)["feasible"].agg(["size", "mean"]).reset_index()
        g = g.rename(columns={"_x": "value", "size": "scenarios", "mean": "feasible_share"})
        g.insert(len(by) + 1, "knob", k)
        rows.append(g)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def limits(feas: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Along each knob: the value from which a system is feasible in at least half the scenarios
    (or up to which), or that it is feasible everywhere, nowhere, or regardless of this knob."""
    rows = []
    if feas.empty:
        return feas
    for key, g in feas.groupby(by + ["system", "knob"], sort=False, dropna=False):
        g = g.sort_values("value")
        share = g["feasible_share"].to_numpy()
        x = g["value"].to_numpy()
        ok = share >= 0.5
        row = dict(zip(by + ["system", "knob"], key))
        if share.min() >= 0.999:
            row.update(verdict="feasible everywhere", limit=np.nan)
        elif share.max() <= 0.001:
            row.update(verdict="infeasible everywhere", limit=np.nan)
        elif share.max() - share.min() < 0.05:  # the other knobs decide, not this one
            row.update(verdict=f"feasible in {100 * share.mean():.0f} % of scenarios at every {key[-1]}", limit=np.nan)
        elif ok[-1] and not ok[0]:
            first = int(np.argmax(ok))
            row.update(verdict=f"feasible from {_fmt(float(x[first]))} up (infeasible at {_fmt(float(x[first - 1]))})",
                       limit=float(x[first]))
        elif ok[0] and not ok[-1]:
            last = len(ok) - 1 - int(np.argmax(ok[::-1]))
            row.update(verdict=f"feasible up to {_fmt(float(x[last]))} (infeasible at {_fmt(float(x[last + 1]))})",
                       limit=float(x[last]))
        else:
            row.update(verdict="feasible in places (not monotone)", limit=np.nan)
        row["min_share"], row["max_share"] = float(share.min()), float(share.max())
        rows.append(row)
    return pd.DataFrame(rows)


def curves(rep: Report, x: str, facets: list[str]) -> pd.DataFrame:
    """Metric against x per system: the median over the scenarios in each x bin, counting an
    infeasible scenario as infinitely slow (so the curve stops where most are infeasible)."""
    per = rep.per_system.assign(_x=binned(rep.per_system[x]))
    worst = np.inf if _better(rep.metric) == "min" else -np.inf
    per["_m"] = per[rep.metric].fillna(worst)
    g = per.groupby(facets + ["system", "_x"], sort=True, dropna=False).agg(
        value=("_m", "median"), scenarios=("_m", "size"), feasible_share=("feasible", "mean")).reset_index()
    g["value"] = g["value"].where(np.isfinite(g["value"]))
    return g.rename(columns={"_x": x})


def crossovers(cur: pd.DataFrame, x: str, facets: list[str], log_x: bool) -> pd.DataFrame:
    """Where two systems' curves cross along x (log-linear interpolation of their ratio)."""
    rows = []
    for key, g in cur.groupby(facets, sort=False, dropna=False) if facets else [((), cur)]:
        wide = g.pivot_table(index=x, columns="system", values="value", aggfunc="first").sort_index()
        xs = wide.index.to_numpy(dtype=float)
        systems = _system_sort(list(wide.columns))
        for i, a in enumerate(systems):
            for b in systems[i + 1:]:
                r = np.log(wide[a].to_numpy(dtype=float) / wide[b].to_numpy(dtype=float))
                for j in range(len(xs) - 1):
                    if j > 0 and r[j] == 0 and np.isfinite(r[j - 1]) and np.isfinite(r[j + 1]) \
                            and r[j - 1] * r[j + 1] < 0:  # equal exactly at a swept value
                        rows.append(_crossing(facets, key, a, b, x, float(xs[j]), r[j - 1] < 0, cur))
                    if np.isfinite(r[j]) and np.isfinite(r[j + 1]) and r[j] * r[j + 1] < 0:
                        t = r[j] / (r[j] - r[j + 1])
                        if log_x and xs[j] > 0:
                            xc = float(np.exp(np.log(xs[j]) + t * (np.log(xs[j + 1]) - np.log(xs[j]))))
                        else:
                            xc = float(xs[j] + t * (xs[j + 1] - xs[j]))
                        rows.append(_crossing(facets, key, a, b, x, xc, r[j] < 0, cur))
    return pd.DataFrame(rows)


def _crossing(facets: list[str], key: Any, a: str, b: str, x: str, at: float, a_lower_below: bool,
              cur: pd.DataFrame) -> dict[str, Any]:
    """One crossover row: which of a and b is better below and above `at`."""
    below = a if a_lower_below != _better_is_max(cur) else b
    row = dict(zip(facets, key if isinstance(key, tuple) else (key,)))
    row.update(system_a=a, system_b=b, knob=x, at=at, faster_below=below, faster_above=b if below == a else a)
    return row


def _better_is_max(cur: pd.DataFrame) -> bool:
    return bool(cur.attrs.get("higher_is_better", False))


def choose_axes(rep: Report, x: str | None, y: str | None, facet: str | None) -> tuple[str | None, str | None, list[str]]:
    num = sorted(rep.numeric_keys, key=lambda k: -rep.per_system[k].nunique())
    for name, v in (("--x", x), ("--y", y)):
        if v is not None and v not in rep.per_system:
            raise SpecError(f"{v!r} is not a scenario knob of this sweep", where=name,
                            fix=f"use one of {', '.join(rep.numeric_keys) or '(none: the sweep has no numeric axis)'}")
    x = x or (num[0] if num else None)
    y = y or next((k for k in num if k != x), None)
    if facet is not None and facet not in rep.scenario_keys:
        raise SpecError(f"{facet!r} is not a scenario knob", where="--facet", fix=f"use one of {', '.join(rep.scenario_keys)}")
    cats = [k for k in rep.scenario_keys if k not in (x, y) and rep.per_system[k].nunique() > 1]
    if facet is None:
        facet = "model" if "model" in cats else (min(cats, key=lambda k: rep.per_system[k].nunique()) if cats else None)
    return x, y, [facet] if facet else []
