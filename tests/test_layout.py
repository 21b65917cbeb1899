"""The package's structure: imports only go downward (no cycle), and no module reaches into another's
private names.

The import graph is built from the source with ``ast``: every import statement, at module level or inside
a function (a lazy import is still a dependency), relative ones resolved against the importing module.
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``. Both checks are
shown falsifiable on a small package the test writes itself.

Private names: a name starting with one underscore (not a dunder) belongs to its module. Importing one
from another module, or reaching ``obj._name`` where ``_name`` is defined in another module of the
package and not in this one, is a violation. Documented exception: the compiled extensions
(``replay.engines._engine``, ``replay.security._content``, ``replay.security._xts``, ``replay.security._gcm``) are private modules by name
but public to the package: their wrappers import them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# compiled module -> its Cython source, as setup.py builds them
EXTENSIONS = {name: ROOT / src for name, src in
              re.findall(r'Extension\(\s*"([\w.]+)",\s*\["(cext/\w+\.pyx)"\]', (ROOT / "setup.py").read_text())}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (source file, is a package) for every .py file under ``root/package``."""
    out = {}
    for f in sorted((root / package).rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _owner(name: str, known) -> str | None:
    """The longest prefix of ``name`` that is a known module."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (never executed: annotations only)."""
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING":
            out.update(id(x) for stmt in n.body for x in ast.walk(stmt))
    return out


def import_graph(root: Path, package: str, extensions: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (module level and function level; not the imports
    under ``if TYPE_CHECKING:``). ``extensions``: compiled module -> its Cython source, whose Python-level
    imports (``from replay.x import ...``) are its edges."""
    mods = modules(root, package)
    known = set(mods) | set(extensions or {})
    graph: dict[str, set[str]] = {}
    for name, src in (extensions or {}).items():
        found = re.findall(rf"^\s*(?:from|import)\s+({package}(?:\.\w+)*)", src.read_text(), flags=re.M)
        graph[name] = {m for m in (_owner(f, known) for f in found) if m and m != name}
    for name, (path, is_pkg) in mods.items():
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        edges: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                edges.update(filter(None, (_owner(a.name, known) for a in node.names)))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    hit = sub if sub in known else _owner(target, known)
                    if hit:
                        edges.add(hit)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt) and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def _defined(tree: ast.AST) -> set[str]:
    """Names a module defines: functions, classes, assigned names and attributes, arguments."""
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            out.add(n.attr)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
    return out


def private_access(root: Path, package: str) -> list[str]:
    """Every import of another module's private name, and every ``obj._name`` whose ``_name`` another
    module of the package defines and this one does not; as "file:line: what"."""
    mods = modules(root, package)
    trees = {m: ast.parse(p.read_text(), str(p)) for m, (p, _) in mods.items()}
    defined = {m: _defined(t) for m, t in trees.items()}
    elsewhere: dict[str, set[str]] = {}
    for m, names in defined.items():
        for n in names:
            if _private(n):
                elsewhere.setdefault(n, set()).add(m)
    found = []
    for m, tree in trees.items():
        rel = mods[m][0].relative_to(root)
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom):
                for a in n.names:
                    if _private(a.name) and f"{package}.{a.name}" not in EXTENSIONS:
                        found.append(f"{rel}:{n.lineno}: imports {a.name} from {n.module or '.'}")
            elif isinstance(n, ast.Attribute) and _private(n.attr):
                if isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
                    continue
                if n.attr not in defined[m] and elsewhere.get(n.attr, set()) - {m}:
                    found.append(f"{rel}:{n.lineno}: {ast.unparse(n)} (defined in {', '.join(sorted(elsewhere[n.attr]))})")
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph(ROOT, "replay", EXTENSIONS)
    assert graph["replay.engines._engine"] >= {"replay.engines.common", "replay.core.errors", "replay.model.snp"}  # the .pyx's imports
    assert "replay.engines._engine" in graph["replay.engines"]
    assert len(graph) > 50 and "replay.migration.precopy" in graph["replay.migration"]  # the graph is real
    assert find_cycle(graph) is None


def test_no_module_uses_another_modules_private_names():
    assert private_access(ROOT, "replay") == []


# The layers, bottom to top (docs/internals.md, "Layers"): a module imports its own layer or those below.
LAYERS = ["replay.core", "replay.model", "replay.traces", "replay.engines", "replay.scenario", "replay.runs",
          "replay.security", "replay.migration", "replay.analysis", "replay.sweeps", "replay.api",
          "replay.commands", "replay.cli"]


def layer_of(module: str) -> int:
    """The layer index of a module: its subpackage's place in LAYERS (the package root: the API's)."""
    for i, top in enumerate(LAYERS):
        if module == top or module.startswith(top + "."):
            return i
    if module == "replay":
        return LAYERS.index("replay.api")
    raise AssertionError(f"{module} belongs to no layer: add its subpackage to LAYERS and docs/internals.md")


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs if layer_of(b) > layer_of(a))


def test_layers_import_only_downward():
    """Every module sits in a layer's subpackage, and no import goes to a higher layer."""
    graph = import_graph(ROOT, "replay", EXTENSIONS)
    assert {m.split(".")[1] for m in graph if m.count(".") >= 1} >= {t.split(".")[1] for t in LAYERS}
    assert upward_edges(graph) == []
    # Falsifiable: one lazy import of the driver from a trace module is one upward edge.
    graph["replay.traces.format"] = graph["replay.traces.format"] | {"replay.migration"}
    assert upward_edges(graph) == ["replay.traces.format -> replay.migration"]


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    """A small package with one cycle through a function-level relative import (a -> b -> c -> a) and
    one private name reached from another module."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    # d imports a; a's import of d is for annotations only (never executed): not an edge
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nfrom .sub import b\n_SECRET = 1\n"
                              "if TYPE_CHECKING:\n    from . import d\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    return g\n")
    (pkg / "c.py").write_text("import toy.a as a\n\ndef g(x):\n    x._hidden = 1\n    return a\n")
    (pkg / "d.py").write_text("from .a import _SECRET\n\ndef h(obj):\n    return obj._hidden\n")
    return tmp_path


def test_the_checks_find_a_cycle_and_private_access_they_are_shown(toy: Path):
    graph = import_graph(toy, "toy")
    assert graph["toy.sub.b"] == {"toy.c"}  # function level, relative, two levels up
    assert graph["toy.a"] == {"toy.sub.b"}  # from a package import a module
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"toy.a", "toy.sub.b", "toy.c"} and cycle[0] == cycle[-1]
    # Break it: no cycle left.
    (toy / "toy" / "sub" / "b.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(toy, "toy")) is None
    found = private_access(toy, "toy")
    assert [f.split(": ", 1)[1].split(" (")[0] for f in found] == ["imports _SECRET from a", "obj._hidden"]
