"""The layering, checked on the source: imports point tui -> pipeline -> vectors, db; the
core never names the front end; no pipeline modules import each other in a circle; the
dashboard starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level names its modules must never import (at module level or inside a
# function: a lazy import points the wrong way just as much).
FORBIDDEN = {
    "db": {"pipeline", "vectors", "tui", "textual"},
    "vectors": {"db", "pipeline", "tui", "textual"},
    "pipeline": {"tui", "textual"},
}
# The front end calls pipeline functions; the engine and the tensor code stay behind them.
FRONT_END_FORBIDDEN = ("vectors", "pipeline.engine")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import statement in a file, relative ones resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    return imports_in(path.read_text(encoding="utf-8"), package)


def imports_in(source: str, package: str) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_the_core_imports_point_one_way(package: str) -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sources(package)
        for line, module in imported_modules(path)
        if module.split(".")[0] in FORBIDDEN[package]
    ]
    assert not wrong, "imports that point the wrong way:\n" + "\n".join(wrong)


def test_the_front_end_reaches_the_core_through_the_pipeline() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sources("tui")
        for line, module in imported_modules(path)
        if any(module == name or module.startswith(name + ".") for name in FRONT_END_FORBIDDEN)
    ]
    assert not wrong, "front-end imports that bypass the pipeline:\n" + "\n".join(wrong)


def test_the_pipeline_never_names_a_front_end_module() -> None:
    """Not even as text: ``python -m tui.cli worker`` made the pipeline start the front end."""
    named = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}"
        for path in sources("pipeline")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.split(".")[0] in ("tui", "textual")
        and " " not in node.value
    ]
    assert not named, "\n".join(named)


def test_the_import_walk_sees_lazy_and_relative_imports() -> None:
    """The checker itself: an import inside a function and a relative one are both seen."""
    source = "def f():\n    from tui.app import PersonaApp\n\nfrom .jobs import run_job\n"
    assert sorted(name for _, name in imports_in(source, "pipeline")) == [
        "pipeline.jobs",
        "tui.app",
    ]


def import_graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports, at module level or inside a function
    (a lazy import still ties the two modules together; it only hides the circle from
    Python's import machinery). Imports under ``TYPE_CHECKING`` count too."""
    names = {}
    for path in sources(package):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        names[module.removesuffix(".__init__")] = path
    return {
        module: {name for _, name in imported_modules(path) if name in names and name != module}
        for module, path in names.items()
    }


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a path that comes back to its start) for every module on one."""
    cycles: list[list[str]] = []
    seen_on_cycle: set[str] = set()
    for start in sorted(graph):
        if start in seen_on_cycle:
            continue
        # Depth-first from ``start``, looking for a way back to it.
        stack = [(start, [start])]
        visited = set()
        while stack:
            module, path = stack.pop()
            for target in sorted(graph[module]):
                if target == start:
                    cycles.append([*path, start])
                    seen_on_cycle.update(path)
                    stack.clear()
                    break
                if target not in visited:
                    visited.add(target)
                    stack.append((target, [*path, target]))
    return cycles


def test_pipeline_modules_import_no_circle() -> None:
    """extract and generate imported each other (both lazily, so Python never complained):
    no two pipeline modules may depend on each other, through any number of steps."""
    cycles = import_cycles(import_graph("pipeline"))
    assert not cycles, "import circles among pipeline modules:\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_the_circle_check_finds_a_circle_through_lazy_imports() -> None:
    """The checker itself, on a made-up graph: a long circle and a two-module one are found,
    a diamond (two paths to one module) is not a circle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"g", "h"}}
    graph |= {"g": {"i"}, "h": {"i"}, "i": set()}
    assert import_cycles(graph) == [["a", "b", "c", "a"], ["d", "e", "d"]]
    lazy = imports_in("def f():\n    from pipeline.generate import plan_rows\n", "pipeline")
    assert [name for _, name in lazy] == ["pipeline.generate"]


def heavy_modules_after(statement: str, heavy: tuple[str, ...] = ("torch", "transformers")):
    """Which of ``heavy`` a fresh interpreter has loaded after ``statement``."""
    code = f"import sys; {statement}; print(*(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return result.stdout.split()


def test_the_dashboard_starts_without_torch() -> None:
    """torch costs about a second to import; the dashboard's screens load it in workers."""
    assert heavy_modules_after("import tui.app") == []


def test_the_dashboard_starts_without_pandas() -> None:
    """sqlite_utils loads pandas (about 0.3 s): the store imports it when it first opens a
    database, in a worker, not when the dashboard's modules load."""
    assert heavy_modules_after("import tui.app", ("sqlite_utils", "pandas")) == []


def test_the_command_line_starts_without_torch() -> None:
    """`persona --help` and the parser build without the model stack."""
    assert heavy_modules_after("from tui.cli import build_parser; build_parser()") == []
