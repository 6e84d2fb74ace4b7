"""leaplm's modules form no import cycle, and each imports on its own.

The graph is read from the source with ``ast``: every ``import`` / ``from ... import`` inside ``leaplm``,
at module level or inside a function (a function-level import is still a dependency: it only moves the
failure of a cycle to run time), but not those under ``if TYPE_CHECKING:`` (never executed). An edge goes
to the module that provides the name: ``from . import hub`` -> ``leaplm.hub``; ``from . import make_drafter``
-> the package's ``__init__``. Importing a submodule also runs its parent packages' ``__init__``; that
implicit edge is not counted (a package that re-exports its modules would otherwise always be a cycle).

``PENDING`` lists the edges of cycles whose fix lies in a file owned by other work at the time; each must
still exist (remove it from the list once fixed), and no other cycle may exist.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "leaplm"

# (importer, imported): edges of known cycles whose fix lies in a file this change could not edit
PENDING: set[tuple[str, str]] = set()


def _modules(package: Path) -> dict[str, tuple[Path | None, bool]]:
    """Dotted name -> (file, is a package) for every module under ``package`` (folders without an
    ``__init__.py`` are namespace packages: modules without code)."""
    root = package.parent
    mods: dict[str, tuple[Path | None, bool]] = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    for folder in package.rglob("*"):
        if folder.is_dir() and folder.name != "__pycache__" and not (folder / "__init__.py").exists():
            mods.setdefault(".".join(folder.relative_to(root).parts), (None, True))
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` / ``if typing.TYPE_CHECKING:``."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, list[int]]]:
    """importer -> {imported: [line, ...]} over the modules of ``package`` (see the module docstring)."""
    mods = _modules(package)
    top = package.name

    def provider(name: str) -> str | None:   # the longest module prefix of a dotted name
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, list[int]]] = {m: {} for m in mods}
    for mod, (path, is_pkg) in mods.items():
        if path is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skip = _type_checking_nodes(tree)
        here = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in mods else source for a in node.names]
            else:
                continue
            for target in targets:
                dep = provider(target)
                if dep and dep != mod and (dep == top or dep.startswith(top + ".")):
                    graph[mod].setdefault(dep, []).append(node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def describe(graph, component: list[str]) -> str:
    return "\n".join(f"  {a} -> {b} (line {', '.join(map(str, graph[a][b]))})"
                     for a in component for b in sorted(graph[a]) if b in component)


def test_leaplm_has_no_import_cycle():
    graph = import_graph()
    missing = [edge for edge in sorted(PENDING) if edge[1] not in graph.get(edge[0], {})]
    assert not missing, f"these PENDING edges are gone: remove them from PENDING: {missing}"
    for importer, imported in PENDING:
        del graph[importer][imported]
    found = cycles(graph)
    assert not found, "import cycles in leaplm:\n" + "\n".join(describe(graph, c) for c in found)


def test_the_cycle_finder_finds_cycles(tmp_path):
    """A planted cycle through a function-level import and one through ``from . import name`` are found; an
    import under ``if TYPE_CHECKING:`` and a child's implicit import of its parent package are not edges."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import C\n")
    (pkg / "sub" / "c.py").write_text("C = 1\ndef g():\n    from . import helper\n")   # -> sub/__init__
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import E\n")
    (pkg / "e.py").write_text("from .d import D\nfrom .sub import c\n")
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.a": [2]} and "pkg.e" not in graph["pkg.d"]
    assert graph["pkg.e"] == {"pkg.d": [1], "pkg.sub.c": [2]}
    assert sorted(cycles(graph)) == [["pkg.a", "pkg.b"], ["pkg.sub", "pkg.sub.c"]]


def _import_each_on_its_own(names: list[str]) -> dict[str, str]:
    """Import each module in a fresh process of its own (forked from one that has imported leaplm's
    third-party dependencies only, so that each costs milliseconds): module -> error for the failures."""
    script = r"""
import importlib, json, os, sys, traceback
names = json.loads(sys.argv[1])
for dep in ("numpy", "torch", "transformers", "safetensors", "gguf", "rich", "tokenizers"):
    try:
        importlib.import_module(dep)
    except Exception:
        pass
assert not [m for m in sys.modules if m == "leaplm" or m.startswith("leaplm.")]
failures = {}
for name in names:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            message = ""
        except ModuleNotFoundError as e:   # an optional third-party dependency that is not installed
            message = "" if e.name and not e.name.startswith("leaplm") else traceback.format_exc()
        except BaseException:
            message = traceback.format_exc()
        os.write(w, message.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode()
    _, status = os.waitpid(pid, 0)
    if message or status:
        failures[name] = message or f"exit status {status}"
print(json.dumps(failures))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", script, json.dumps(names)], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one process per module")
def test_every_module_imports_on_its_own():
    names = sorted(m for m, (path, _) in _modules(PACKAGE).items() if path is not None and not m.endswith("__main__"))
    failures = _import_each_on_its_own(names)
    assert not failures, "\n\n".join(f"{name}:\n{error}" for name, error in failures.items())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one process per module")
def test_a_module_that_cannot_import_is_reported():
    """The per-module check reports a module whose import fails (a missing leaplm module is not an optional
    dependency)."""
    failures = _import_each_on_its_own(["leaplm.no_such_module"])
    assert "leaplm.no_such_module" in failures and "ModuleNotFoundError" in failures["leaplm.no_such_module"]
