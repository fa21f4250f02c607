"""The house's layout: every package installs, under one top-level name."""

from __future__ import annotations

import ast
import re
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


# ------------------------------------------------------------------------------ the import graph
def _modules() -> dict[str, Path]:
    out = {}
    for top, name in (("primasim", "primasim"), ("runtime", "primasim.runtime")):
        for p in (ROOT / top).rglob("*.py"):
            parts = (name, *p.relative_to(ROOT / top).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at its top or inside functions (an import in a
    function is an edge too: it only runs later); `if TYPE_CHECKING:` imports are not."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for m, path in mods.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in
                       ast.unparse(node.test) for n in ast.walk(node)}
        pkg = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                mod = ".".join([*base, node.module] if node.module else base) if node.level else str(node.module)
                for a in node.names:
                    full = f"{mod}.{a.name}"
                    edges.add(full if full in mods else mod)
        graph[m] = {e for e in edges if e in mods and e != m}
    return graph


def test_no_import_cycles() -> None:
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


# what each layer may import (docs/architecture.md): core <- plan <- sim; the runtime uses core only;
# the profiler, the loop and the CLI sit on top
LAYERS = {
    "primasim.core": ("primasim.core",),
    "primasim.plan": ("primasim.core", "primasim.plan"),
    "primasim.sim": ("primasim.core", "primasim.plan", "primasim.sim"),
    "primasim.runtime": ("primasim.core", "primasim.runtime"),
    "primasim.profile": ("primasim.core", "primasim.runtime", "primasim.profile"),
    "primasim.serve": ("primasim.core", "primasim.plan", "primasim.runtime", "primasim.serve"),
}


def test_layers_point_one_way() -> None:
    bad = []
    for m, deps in _import_graph().items():
        layer = next((name for name in LAYERS if m == name or m.startswith(name + ".")), None)
        if layer is None:
            continue
        bad += [f"{m} -> {d}" for d in sorted(deps) if d != "primasim" and not any(
            d == ok or d.startswith(ok + ".") for ok in LAYERS[layer])]
    assert not bad, "imports against the layers: " + ", ".join(bad)


def test_files_are_small_or_say_why() -> None:
    """One concept per file, mostly under ~600 lines; a longer one states its reason at its top
    (the package, its tests and the experiments alike)."""
    files = [*_modules().values(), *(ROOT / "tests").glob("*.py"), *(ROOT / "experiments").rglob("*.py")]
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in files
            if (n := len(p.read_text().splitlines())) > 650 and "Longer than" not in p.read_text()[:3000]]
    assert not long, "split these or state why they are long at their top ('Longer than ~600 lines: ...'): " + \
        ", ".join(long)


# ------------------------------------------------------------------------------ the documented house
def test_architecture_doc_names_every_module_and_only_real_ones() -> None:
    """docs/architecture.md's table says what each package owns, module by module: every module of
    a package is named in its row, and every file a row names exists, so a module added, moved or
    removed without the document shows up here."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w/]+)`[^|]*\|(.*)$", doc, flags=re.M)}
    assert {"primasim/core", "primasim/plan", "primasim/sim", "runtime/", "primasim/cli"} <= set(rows)
    every = {p.name for top in ("primasim", "runtime") for p in (ROOT / top).rglob("*.py")}
    problems = []
    for pkg, text in rows.items():
        named = set(re.findall(r"([A-Za-z_]\w*\.py)\b", text))
        problems += [f"{pkg} names {n}, which does not exist" for n in sorted(named - every)]
        problems += [f"{pkg} does not name {p.relative_to(ROOT)}" for p in sorted((ROOT / pkg).rglob("*.py"))
                     if p.name not in ("__init__.py", "__main__.py") and p.name not in named
                     and not any(p.is_relative_to(ROOT / other) for other in rows
                                 if other != pkg and (ROOT / other).is_relative_to(ROOT / pkg))]
    assert not problems, "docs/architecture.md and the code disagree: " + "; ".join(problems)
