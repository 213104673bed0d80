"""The package layers import only downward, and no module hides an import in a function.

Layers, bottom to top (docs/architecture.md has the picture):

    errors < compiler < backends < passes < config < driver < reports < tools < cli

A module may import its own layer and the layers below it. Inside a layer the import graph
has no cycles. `memopt` imports inside functions are a sign that a module sits in the wrong
layer; only the command line (`memopt.cli`, for start-up time) has them. Imports under
`if TYPE_CHECKING:` never run and are not counted.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "memopt"

LAYERS = [
    "memopt.errors",
    "memopt.compiler",
    "memopt.backends",
    "memopt.passes",
    "memopt.config",
    "memopt.driver",
    "memopt.reports",
    "memopt.tools",
    "memopt.cli",
]
# Modules outside the layers: the package's own facade (lazy attributes) and `python -m`.
TOP = {"memopt", "memopt.__main__"}
# The built-in example programs (examples/, shipped as memopt.examples) import only torch:
# data at the bottom, which the driver loads by name.
BOTTOM = {"memopt.examples"}
# May import memopt modules inside functions: the CLI loads the compiler only when a
# command needs it, so `memopt --help` and bad-usage errors answer fast.
LAZY_IMPORTS_ALLOWED = {"memopt.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    if module in TOP:
        return len(LAYERS)
    if module in BOTTOM:
        return 0
    for index, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def memopt_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every memopt import that runs."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int, bool]] = []
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    )

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "memopt":
                    found.append((alias.name, node.lineno, in_function))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] == "memopt":
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    is_module = (ROOT / Path(*candidate.split("."))).with_suffix(
                        ".py"
                    ).exists() or (ROOT / Path(*candidate.split(".")) / "__init__.py").exists()
                    found.append((candidate if is_module else base, node.lineno, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer() -> None:
    for path in SOURCES:
        layer_of(module_name(path))


def test_imports_point_down() -> None:
    wrong = []
    for path in SOURCES:
        importer = module_name(path)
        for imported, line, _ in memopt_imports(path):
            if imported == "memopt":
                continue  # the facade's lazy attributes
            if layer_of(imported) > layer_of(importer):
                wrong.append(
                    f"{path.relative_to(ROOT)}:{line}: {importer} imports {imported}, a layer above"
                )
    assert not wrong, "\n".join(wrong)


def test_no_memopt_imports_inside_functions() -> None:
    hidden = [
        f"{path.relative_to(ROOT)}:{line}: imports {imported} inside a function"
        for path in SOURCES
        if module_name(path) not in LAZY_IMPORTS_ALLOWED
        for imported, line, in_function in memopt_imports(path)
        if in_function
    ]
    assert not hidden, "\n".join(hidden)


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for path in SOURCES:
        graph[module_name(path)] = {
            imported for imported, _, in_function in memopt_imports(path) if not in_function
        }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            pytest.fail("import cycle: " + " -> ".join(cycle))


@pytest.mark.slow
def test_each_layer_imports_alone() -> None:
    """Importing every module of a layer loads nothing from the layers above it (each layer
    in a fresh interpreter; the interpreters run side by side)."""
    running = {}
    for index, layer in enumerate(LAYERS[:-1]):
        modules = [module_name(p) for p in SOURCES if layer_of(module_name(p)) == index]
        above = LAYERS[index + 1 :]
        script = (
            "import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            f"above = {above!r}\n"
            "loaded = sorted(m for m in sys.modules"
            " if any(m == a or m.startswith(a + '.') for a in above))\n"
            "print('\\n'.join(loaded))\n"
        )
        running[layer] = subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for layer, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"importing {layer}: {err}"
        assert out.strip() == "", f"importing {layer} loaded: {out}"
