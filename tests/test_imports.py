"""The package's architecture, read from its imports: every import statement of every module of ``amalab``
(module level, inside functions, under ``TYPE_CHECKING``), parsed with ``ast`` without importing anything.

- no import cycle between amalab modules;
- no amalab module imported inside a function, except where the import is what keeps an extra optional
  (:data:`LAZY_ALLOWED`);
- arrows point down (:data:`LAYERS`): the training core knows no model family, and the LLM half, the MuJoCo
  suite and the convex lab build on it and on the mixers without importing each other;
- the training core, the objectives, the mixers and the MuJoCo suite import neither transformers nor peft.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "amalab"

#: (importing module prefix, imported module prefix): amalab imports that may sit inside a function because
#: they need an extra the importing module's other commands do not (the command line dispatches to them)
LAZY_ALLOWED = {("amalab.cli", "amalab.llm"), ("amalab.cli", "amalab.control")}

#: package -> the amalab packages it may import (besides itself); a module outside every package listed
#: (amalab.cli, amalab.__main__) may import anything
_BASE = {"amalab", "amalab.errors", "amalab.config", "amalab.atomic_write", "amalab.stats", "amalab.markdown",
         "amalab.runner"}
LAYERS = {
    "amalab.errors": set(),
    "amalab.atomic_write": set(),
    "amalab.stats": set(),
    "amalab.markdown": set(),
    "amalab.config": {"amalab.errors"},
    "amalab.runner": {"amalab.errors"},
    "amalab.mixers": _BASE,
    "amalab.objectives": _BASE | {"amalab.mixers"},
    "amalab.training": _BASE | {"amalab.mixers", "amalab.objectives"},
    "amalab.convex": _BASE | {"amalab.mixers", "amalab.objectives"},
    "amalab.llm": _BASE | {"amalab.mixers", "amalab.objectives", "amalab.training"},
    "amalab.control": _BASE | {"amalab.mixers", "amalab.objectives", "amalab.training"},
    "amalab.trl": _BASE | {"amalab.mixers", "amalab.objectives", "amalab.training", "amalab.llm"},
}

#: packages that must run without the llm extra's model libraries
NO_TRANSFORMERS = ("amalab.mixers", "amalab.objectives", "amalab.training", "amalab.control", "amalab.convex")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported(node: ast.AST, module: str) -> list[str]:
    """The modules an import statement names (``from a import b`` names ``a.b`` where that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolved against the importing module's package
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module
    submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
    return submodules if len(submodules) == len(node.names) else [base, *submodules]


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported module, inside a function?) of every import statement of ``module``."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((name, in_function) for name in _imported(child, module))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def amalab_edges() -> dict[str, set[str]]:
    edges = {}
    for module in MODULES:
        edges[module] = {name for name, _ in imports(module) if name in MODULES and name != module}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and self-loops."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def _package(module: str) -> str | None:
    return next((p for p in sorted(LAYERS, key=len, reverse=True) if module == p or module.startswith(p + ".")),
                None)


def test_the_walk_sees_every_kind_of_import():
    """The reader finds module-level, function-level, relative and ``from package import module`` imports."""
    assert ("amalab.mixers.ama_r", False) in imports("amalab.mixers")
    assert "amalab.training.step" in amalab_edges()["amalab.training.run"]
    assert len(MODULES) > 80


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert cycles(amalab_edges()) == []


def test_no_amalab_import_inside_a_function():
    hidden = sorted((module, name) for module in MODULES for name, inside in imports(module)
                    if inside and name.startswith("amalab")
                    and not any(module.startswith(a) and name.startswith(b) for a, b in LAZY_ALLOWED))
    assert hidden == []


def test_arrows_point_down():
    upward = []
    for module, targets in amalab_edges().items():
        package = _package(module)
        if package is None:
            continue
        allowed = LAYERS[package]
        upward += [(module, t) for t in sorted(targets)
                   if _package(t) != package and t != "amalab"  # the root package: its version
                   and not any(t == a or t.startswith(a + ".") for a in allowed)]
    assert upward == []


@pytest.mark.parametrize("package", NO_TRANSFORMERS)
def test_the_core_imports_no_model_library(package):
    offending = sorted((module, name) for module in MODULES if module == package or module.startswith(package + ".")
                       for name, _ in imports(module) if name.split(".")[0] in ("transformers", "peft", "trl"))
    assert offending == []
