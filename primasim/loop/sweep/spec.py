"""Sweep specs: which cells a sweep evaluates, parsed and checked before anything runs.

    name = "wifi-ram"
    evaluate = "simulate"              # simulate (default) | plan
    seed = 0                           # seeds the sampling design and the generated clusters
    replicates = 1                     # > 1: every cell again with simulation seed 0..N-1
    [grid]                             # lists are axes (cartesian product), scalars are fixed
    model = ["llama3-8b", "llama3-70b"]
    cluster = ["prima-d1-d4", "home"]  # "home": every member of [generate.home]
    system = ["prima", "exo", "mdi-llm"]
    [sample]                           # optional: n points over ranges, crossed with the grid
    method = "lhs"                     # random | lhs | sobol (n a power of 2) | halton
    n = 64
    ranges.bandwidth_mbps = { low = 10, high = 1000, log = true }
    ranges.ram_scale = { low = 0.25, high = 1.5 }
    [[when]]                           # conditional axes: only for cells that match `if`
    if = { system = "mdi-llm" }
    S = [1, 2, 4]
    [[cells]]                          # optional extra cells, each a full table
    model = "llama3-8b"
    cluster = "prima-d1-d4"
    system = "llama.cpp"
    [generate.home]                    # generated clusters (primasim/loop/sweep/generate.py)
    count = 10
    classes = { laptop = 2, phone = 1 }

The cells form blocks, each a plain cartesian product (times the sample design): a `when` splits
the grid where its condition holds. Cell i is computed from its index alone (mixed-radix in its
block), so workers build their own cells from index ranges and nothing of size "number of cells"
is ever held or shipped.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from primasim.core.errors import SpecError
from primasim.core.systems import SYSTEMS

from .dist import Dist, parse_dist
from .generate import Family, parse_classes, parse_family
from .knobs import KNOBS, REQUIRED, Knob, knob, system_takes

TOP_KEYS = ("name", "evaluate", "seed", "replicates", "grid", "sample", "when", "cells", "generate", "classes")
EVALUATE = ("simulate", "plan")
METHODS = ("random", "lhs", "sobol", "halton")


def cell_id(cell: dict[str, Any]) -> str:
    """A stable id of a cell's parameters (order-free): the key results are matched by on resume."""
    blob = json.dumps(cell, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Block:
    """A cartesian product of `axes` with `fixed` values, crossed with the sample design if `sampled`."""

    axes: tuple[tuple[str, tuple[Any, ...]], ...]
    fixed: tuple[tuple[str, Any], ...]
    sampled: bool
    n_grid: int

    def keys(self) -> list[str]:
        return [k for k, _ in self.axes] + [k for k, _ in self.fixed]

    def values_of(self, key: str) -> tuple[Any, ...]:
        for k, v in self.axes:
            if k == key:
                return v
        for k, v in self.fixed:
            if k == key:
                return (v,)
        return ()


@dataclass(frozen=True)
class Sampling:
    method: str
    n: int
    ranges: tuple[tuple[str, Dist], ...]


@dataclass(frozen=True, eq=False)
class SweepSpec:
    """A parsed, checked sweep: `len(spec)` cells, `spec.cell(i)` the i-th (a dict of knobs)."""

    name: str
    evaluate: str
    blocks: tuple[Block, ...]
    explicit: tuple[dict[str, Any], ...] = ()
    sampling: Sampling | None = None
    design: np.ndarray | None = None  # n x d uniform design of the sampled knobs
    families: dict[str, Family] = field(default_factory=dict)
    seed: int = 0
    path: str = ""
    source: str = ""  # the spec's text, kept beside the results
    base_dir: str = ""  # relative model and cluster paths are looked up here first (the spec's folder)
    offsets: tuple[int, ...] = ()  # first index of every block, then the number of cells

    def __len__(self) -> int:
        return self.offsets[-1]

    def cell(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        b = bisect.bisect_right(self.offsets, i) - 1
        j = i - self.offsets[b]
        if b == len(self.blocks):
            return dict(self.explicit[j])
        blk = self.blocks[b]
        cell: dict[str, Any] = dict(blk.fixed)
        if blk.sampled:
            assert self.sampling is not None and self.design is not None
            j, s = divmod(j, self.sampling.n)
            for (k, d), u in zip(self.sampling.ranges, self.design[s]):
                cell[k] = d.at(float(u))
        for k, vals in reversed(blk.axes):  # the last axis varies fastest, as itertools.product
            j, r = divmod(j, len(vals))
            cell[k] = vals[r]
        return {k: cell[k] for k in KNOBS if k in cell}

    def cells(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
        for i in range(start, len(self) if stop is None else stop):
            yield self.cell(i)

    def knob_values(self, key: str) -> list[Any]:
        """Every value knob `key` takes in the grid, the `when` tables and the explicit cells (not sampled)."""
        seen: list[Any] = []
        for b in self.blocks:
            for v in b.values_of(key):
                if v not in seen:
                    seen.append(v)
        for c in self.explicit:
            if key in c and c[key] not in seen:
                seen.append(c[key])
        if self.sampling is not None:
            for k, d in self.sampling.ranges:
                if k == key and d.choices:
                    seen += [v for v in d.choices if v not in seen]
        return seen

    def columns(self) -> list[str]:
        """The knobs some cell sets, in the knob table's order."""
        keys = {k for b in self.blocks for k in b.keys()} | {k for c in self.explicit for k in c}
        if self.sampling is not None:
            keys |= {k for k, _ in self.sampling.ranges}
        return [k for k in KNOBS if k in keys]

    def fingerprint(self) -> str:
        """Changes whenever the cells (or their order) change: resumes take a fast path when it matches."""
        h = hashlib.sha1()
        blob = {"evaluate": self.evaluate, "blocks": [[list(map(list, b.axes)), list(b.fixed), b.sampled]
                                                      for b in self.blocks],
                "explicit": list(self.explicit), "seed": self.seed,
                "sampling": None if self.sampling is None else [self.sampling.method, self.sampling.n,
                                                                [[k, repr(d)] for k, d in self.sampling.ranges]]}
        h.update(json.dumps(blob, sort_keys=True, default=str).encode())
        if self.design is not None:
            h.update(np.ascontiguousarray(self.design).tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        axes: dict[str, int] = {}
        for b in self.blocks:
            for k, v in b.axes:
                axes[k] = max(axes.get(k, 0), len(v))
        return {"name": self.name, "evaluate": self.evaluate, "cells": len(self), "blocks": len(self.blocks),
                "explicit_cells": len(self.explicit), "axes": axes,
                "sampled": {k: d.describe() for k, d in self.sampling.ranges} if self.sampling else {},
                "sample": {"method": self.sampling.method, "n": self.sampling.n} if self.sampling else None,
                "generated_clusters": {f.name: f.count for f in self.families.values()}, "seed": self.seed}


# ------------------------------------------------------------------------------ parsing
def load_spec(path: str | Path) -> SweepSpec:
    p = Path(path)
    try:
        text = p.read_text()
        raw = tomllib.loads(text)
    except FileNotFoundError:
        raise SpecError("file not found", where=str(p), fix="give the path of a sweep TOML file") from None
    except IsADirectoryError:
        raise SpecError("is a folder", where=str(p), fix="give the path of a sweep TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"not valid TOML ({exc})", where=str(p), fix="fix the TOML syntax") from None
    except (ValueError, RecursionError) as exc:
        raise SpecError(f"not a usable TOML file ({type(exc).__name__})", where=str(p), fix="fix the TOML file") from None
    return spec_from_dict(raw, where=str(p), source=text, base_dir=p.parent)


def spec_from_dict(raw: Any, where: str = "sweep", *, source: str = "", base_dir: Path | None = None) -> SweepSpec:
    """Parse and check a spec (the TOML's dict). Every mistake is a SpecError naming the key and the fix."""
    if not isinstance(raw, dict):
        raise SpecError("a sweep spec is a table", where=where, fix="see docs/sweeps.md")
    extra = [k for k in raw if k not in TOP_KEYS]
    if extra:
        raise SpecError(f"unknown key(s) {extra}", where=where, fix=f"top-level keys are {', '.join(TOP_KEYS)}")
    name = raw.get("name", Path(where).stem)
    if not isinstance(name, str) or not name or "/" in name:
        raise SpecError(f"name = {name!r}", where=f"{where}: name", fix='give a short name without "/", e.g. name = "wifi-ram"')
    evaluate = raw.get("evaluate", "simulate")
    if evaluate not in EVALUATE:
        raise SpecError(f"unknown evaluate = {evaluate!r}", where=f"{where}: evaluate", fix=f"use one of {', '.join(EVALUATE)}")
    seed = _int(raw.get("seed", 0), f"{where}: seed", low=0)
    replicates = _int(raw.get("replicates", 1), f"{where}: replicates", low=1)
    classes = parse_classes(raw.get("classes"), where)
    fams_raw = raw.get("generate", {})
    if not isinstance(fams_raw, dict):
        raise SpecError("[generate] is a table of cluster families", where=f"{where}: generate",
                        fix="write [generate.NAME] tables")
    families = {k: parse_family(k, v, classes, where) for k, v in fams_raw.items()}

    grid = raw.get("grid")
    sampling_raw = raw.get("sample")
    if grid is not None and not isinstance(grid, dict):
        raise SpecError("[grid] must be a table", where=f"{where}: grid", fix="write [grid] with one key per knob")
    grid = _knob_table(grid or {}, f"{where}: [grid]", families)
    if replicates > 1:
        if "seed" in grid:
            raise SpecError("replicates and a seed knob in [grid] both set the simulation seed", where=f"{where}: replicates",
                            fix="keep one of them")
        grid["seed"] = list(range(replicates))
    sampling, design = _parse_sampling(sampling_raw, seed, f"{where}: [sample]")
    if sampling is not None:
        clash = [k for k, _ in sampling.ranges if k in grid]
        if clash:
            raise SpecError(f"{clash[0]!r} is both a [grid] knob and a [sample] range", where=f"{where}: [sample]",
                            fix=f"keep {clash[0]} in one of them")
    whens = _parse_whens(raw.get("when", []), grid, sampling, families, where)
    blocks = _blocks(grid, whens, sampling is not None, where) if (grid or sampling) else []
    explicit = _parse_cells(raw.get("cells", []), families, where)
    if not blocks and not explicit:
        raise SpecError("the sweep has no cells", where=where, fix="add a [grid] table, a [sample] or [[cells]]")
    if explicit and blocks:  # explicit cells the grid already has would run twice
        explicit = [c for c in explicit if not any(_in_block(c, b) for b in blocks if not b.sampled)]
    seen: set[str] = set()
    unique = []
    for c in explicit:
        if (cid := cell_id(c)) not in seen:
            seen.add(cid)
            unique.append(c)
    n_sample = sampling.n if sampling else 1
    sizes = [b.n_grid * (n_sample if b.sampled else 1) for b in blocks] + [len(unique)]
    offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes)]))
    spec = SweepSpec(name=name, evaluate=evaluate, blocks=tuple(blocks), explicit=tuple(unique), sampling=sampling,
                     design=design, families=families, seed=seed, path=where, source=source,
                     base_dir=str(base_dir or ""), offsets=offsets)
    _check(spec, where)
    return spec


def _int(v: Any, where: str, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise SpecError(f"{v!r} is not a whole number >= {low}", where=where, fix=f"use an integer >= {low}")
    return v


def _expand_clusters(values: list[Any], families: dict[str, Family]) -> list[Any]:
    """A family's name stands for all its members (a member also listed on its own counts once)."""
    out: list[Any] = []
    for v in values:
        out += families[v].members() if isinstance(v, str) and v in families else [v]
    return list(dict.fromkeys(out))


def _knob_table(raw: dict[str, Any], where: str, families: dict[str, Family]) -> dict[str, Any]:
    """{knob: list (an axis) or scalar}, knob names checked, family names expanded to their members."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        kb = knob(k, where)
        if isinstance(v, dict):
            raise SpecError(f"{k} = a table; ranges belong in [sample]", where=f"{where} {k}",
                            fix=f"list the values ({k} = [a, b]) or move it to [sample.ranges]")
        if isinstance(v, list):
            if not v:
                raise SpecError(f"{k} = [] has no values", where=f"{where} {k}", fix="give at least one value")
            if len({json.dumps(x, default=str) for x in v}) < len(v):
                raise SpecError(f"{k} lists a value twice", where=f"{where} {k}", fix="list each value once")
        vals = v if isinstance(v, list) else [v]
        for x in vals:
            if isinstance(x, list | dict):
                raise SpecError(f"{k}: {x!r} is not a plain value", where=f"{where} {k}", fix="one level of list")
            if (msg := kb.check(x)) is not None:
                raise SpecError(f"{k}: {msg}", where=f"{where} {k}", fix=_fix(kb))
        if k == "cluster":
            vals = _expand_clusters(vals, families)
        vals = [kb.coerce(x) for x in vals]
        out[k] = vals if isinstance(v, list) or len(vals) > 1 else vals[0]
    return out


def _fix(kb: Knob) -> str:
    if kb.choices:
        return f"use one of {', '.join(kb.choices)}"
    if kb.kind == "bool":
        return "use true or false"
    if kb.kind in ("int", "float"):
        return f"use {'a whole number' if kb.kind == 'int' else 'a number'}" + (
            f" {'>' if kb.above else '>='} {kb.low:g}" if kb.low is not None else "")
    return f"{kb.name}: {kb.help}"


def _parse_sampling(raw: Any, seed: int, where: str) -> tuple[Sampling | None, np.ndarray | None]:
    if raw is None:
        return None, None
    if not isinstance(raw, dict):
        raise SpecError("[sample] must be a table", where=where, fix="write [sample] with method, n and ranges")
    extra = set(raw) - {"method", "n", "ranges"}
    if extra:
        raise SpecError(f"unknown key(s) {sorted(extra)}", where=where, fix="[sample] has method, n and ranges")
    method = raw.get("method", "lhs")
    if method not in METHODS:
        raise SpecError(f"unknown method {method!r}", where=f"{where} method", fix=f"use one of {', '.join(METHODS)}")
    n = _int(raw.get("n"), f"{where} n", low=1) if "n" in raw else None
    if n is None:
        raise SpecError("missing n (how many points)", where=where, fix="e.g. n = 64")
    if method == "sobol" and n & (n - 1):
        raise SpecError(f"a Sobol design needs n a power of 2, got {n}", where=f"{where} n",
                        fix=f"use n = {1 << max(0, n.bit_length() - 1)} or {1 << n.bit_length()}, or method = \"lhs\"")
    ranges_raw = raw.get("ranges")
    if not isinstance(ranges_raw, dict) or not ranges_raw:
        raise SpecError("missing ranges", where=where, fix="e.g. ranges.bandwidth_mbps = { low = 10, high = 1000 }")
    ranges = []
    for k, v in ranges_raw.items():
        w = f"{where} ranges.{k}"
        kb = knob(k, w)
        if kb.name == "cluster":
            raise SpecError("clusters are not sampled", where=w, fix="list them in [grid] (a [generate] family draws random ones)")
        d = parse_dist(v, w, integer=kb.kind == "int")
        if d.is_range and kb.kind not in ("int", "float"):
            raise SpecError(f"{k} is not a number", where=w, fix=f"list its values: {k} = [a, b]")
        for x in d.values():
            if (msg := kb.check(x)) is not None:
                raise SpecError(f"{k}: {msg}", where=w, fix=_fix(kb))
        ranges.append((k, d))
    d = len(ranges)
    design = _design(method, n, d, seed)
    return Sampling(method, n, tuple(ranges)), design


def _design(method: str, n: int, d: int, seed: int) -> np.ndarray:
    """n points in [0, 1)^d; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    if method == "random":
        return rng.random((n, d))
    from scipy.stats import qmc

    if method == "lhs":
        return qmc.LatinHypercube(d=d, rng=rng).random(n)
    if method == "sobol":
        return qmc.Sobol(d=d, scramble=True, rng=rng).random_base2(int(math.log2(n)))
    return qmc.Halton(d=d, scramble=True, rng=rng).random(n)


@dataclass(frozen=True)
class _When:
    match: dict[str, tuple[Any, ...]]
    body: dict[str, Any]
    where: str


def _parse_whens(raw: Any, grid: dict[str, Any], sampling: Sampling | None, families: dict[str, Family],
                 where: str) -> list[_When]:
    if not isinstance(raw, list):
        raise SpecError("when must be a list of tables", where=f"{where}: when", fix="write [[when]] tables")
    sampled = {k for k, _ in sampling.ranges} if sampling else set()
    out: list[_When] = []
    for i, w in enumerate(raw):
        loc = f"{where}: [[when]] #{i + 1}"
        if not isinstance(w, dict) or "if" not in w or not isinstance(w["if"], dict) or not w["if"]:
            raise SpecError("a [[when]] needs an if table", where=loc, fix='e.g. if = { system = "mdi-llm" }')
        match: dict[str, tuple[Any, ...]] = {}
        for k, v in w["if"].items():
            kb = knob(k, f"{loc} if")
            if k not in grid:
                raise SpecError(f"if matches {k!r}, which is not a [grid] knob", where=f"{loc} if",
                                fix=f"match on grid knobs ({', '.join(grid) or 'none'})"
                                + ("; sampled knobs cannot be matched" if k in sampled else ""))
            vals = v if isinstance(v, list) else [v]
            if k == "cluster":
                vals = _expand_clusters(vals, families)
            vals = [kb.coerce(x) if kb.check(x) is None else x for x in vals]
            have = grid[k] if isinstance(grid[k], list) else [grid[k]]
            missing = [x for x in vals if x not in have]
            if missing:
                raise SpecError(f"if {k} = {missing[0]!r}: the grid has no such value", where=f"{loc} if",
                                fix=f"use values of grid {k}: {', '.join(map(str, have))}")
            match[k] = tuple(vals)
        body = _knob_table({k: v for k, v in w.items() if k != "if"}, loc, families)
        if not body:
            raise SpecError("the [[when]] sets no knob", where=loc, fix="add the knobs it applies, e.g. S = [1, 2, 4]")
        for k in body:
            if k in sampled:
                raise SpecError(f"{k} is a [sample] range", where=loc, fix=f"set {k} in one place")
            if k in match:
                raise SpecError(f"{k} is both matched and set", where=loc, fix=f"do not set {k} in the same [[when]]")
        out.append(_When(match, body, loc))
    return out


def _blocks(grid: dict[str, Any], whens: list[_When], sampled: bool, where: str) -> list[Block]:
    """Split the grid where `when` conditions hold: each part is a plain product with its own axes."""
    involved = [k for k in grid if any(k in w.match for w in whens)]
    parts: dict[str, list[tuple[tuple[bool, ...], list[Any]]]] = {}
    for k in involved:  # group the axis' values by which conditions they satisfy, keeping their order
        vals = grid[k] if isinstance(grid[k], list) else [grid[k]]
        groups: dict[tuple[bool, ...], list[Any]] = {}
        for v in vals:
            sig = tuple(k not in w.match or v in w.match[k] for w in whens)
            groups.setdefault(sig, []).append(v)
        parts[k] = list(groups.items())
    blocks = []
    used = [False] * len(whens)
    for combo in product(*(parts[k] for k in involved)) if involved else [()]:
        applies = [all(sig[i] for sig, _ in combo) for i in range(len(whens))]
        table: dict[str, Any] = dict(grid)
        for k, (_, vals) in zip(involved, combo):
            table[k] = vals if isinstance(grid[k], list) else vals[0]
        set_by: dict[str, str] = {}
        for i, (w, on) in enumerate(zip(whens, applies)):
            if not on:
                continue
            used[i] = True
            for k, v in w.body.items():
                if k in set_by:
                    raise SpecError(f"{k} is set by two [[when]] tables that both match some cells", where=w.where,
                                    fix=f"make their conditions exclusive or set {k} once (also in {set_by[k]})")
                set_by[k] = w.where
                table[k] = v
        axes = tuple((k, tuple(v)) for k, v in table.items() if isinstance(v, list))
        fixed = tuple((k, v) for k, v in table.items() if not isinstance(v, list))
        blocks.append(Block(axes, fixed, sampled, math.prod(len(v) for _, v in axes)))
    for w, u in zip(whens, used):
        if not u:
            raise SpecError("the [[when]] matches no cell (its conditions never hold together)", where=w.where,
                            fix="check the values in its if table")
    return blocks


def _parse_cells(raw: Any, families: dict[str, Family], where: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise SpecError("cells must be a list of tables", where=f"{where}: cells", fix="write [[cells]] tables")
    out = []
    for i, c in enumerate(raw):
        loc = f"{where}: [[cells]] #{i + 1}"
        if not isinstance(c, dict):
            raise SpecError("a cell is a table", where=loc, fix="write [[cells]] tables")
        lists = [k for k, v in c.items() if isinstance(v, list)]
        if lists:
            raise SpecError(f"{lists[0]} is a list in a single cell", where=loc,
                            fix="put axes in [grid]; a cell has one value per knob")
        t = _knob_table(c, loc, families)
        clusters = t["cluster"] if isinstance(t.get("cluster"), list) else [t.get("cluster")]
        for cl in clusters:  # a family name in a cell: one cell per member
            cell = dict(t, cluster=cl) if cl is not None else {k: v for k, v in t.items() if k != "cluster"}
            out.append({k: cell[k] for k in KNOBS if k in cell})
    return out


def _in_block(cell: dict[str, Any], b: Block) -> bool:
    keys = b.keys()
    if set(cell) != set(keys):
        return False
    return all(cell[k] in b.values_of(k) for k in keys)


def _check(spec: SweepSpec, where: str) -> None:
    """Required knobs present; knobs meaningful to the evaluator and taken by the systems they meet."""
    groups: list[tuple[str, dict[str, list[Any]]]] = []
    for i, b in enumerate(spec.blocks):
        vals = {k: list(b.values_of(k)) for k in b.keys()}
        if b.sampled and spec.sampling:
            for k, d in spec.sampling.ranges:
                vals[k] = d.values()
        groups.append((f"{where}: [grid]" if len(spec.blocks) == 1 else f"{where}: [grid] part {i + 1}", vals))
    for i, c in enumerate(spec.explicit):
        groups.append((f"{where}: [[cells]] #{i + 1}", {k: [v] for k, v in c.items()}))
    for loc, vals in groups:
        missing = [r for r in REQUIRED if r not in vals]
        if missing:
            raise SpecError(f"no {missing[0]} set", where=loc, fix=f"set {', '.join(missing)} in [grid] or [sample]")
        for s in vals["system"]:
            if s not in SYSTEMS:
                raise SpecError(f"unknown system {s!r}", where=f"{loc} system", fix=f"use one of {', '.join(SYSTEMS)}")
        for k in vals:
            kb = KNOBS[k]
            if spec.evaluate not in kb.evaluate:
                raise SpecError(f"{k} means nothing with evaluate = {spec.evaluate!r}", where=f"{loc} {k}",
                                fix=f"drop {k}, or use evaluate = \"{kb.evaluate[0]}\"")
            bad = [s for s in vals["system"] if not system_takes(s, kb)]
            if bad:
                takers = [s for s in SYSTEMS if system_takes(s, kb)]
                raise SpecError(f"system {bad[0]!r} has no knob {k}", where=f"{loc} {k}",
                                fix=f"set {k} only where it applies: [[when]] if = {{ system = {json.dumps(takers)} }} "
                                f"with {k} = ...")
