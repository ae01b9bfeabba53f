"""The integration's modules import each other without cycles (a static check with `ast`, no Home Assistant).

A cycle (`__init__` ↔ `config_flow` once) works only as long as one side imports lazily, and it hides which
module owns what. Every import counts: module level, inside functions and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

INTEGRATION = REPO_ROOT / "custom_components" / "rkllm"
PACKAGE = "custom_components.rkllm"


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    """Module name (`__init__`, `entity`, …) → the package's modules it imports."""
    modules = {path.stem for path in package_dir.glob("*.py")}
    modules |= {path.name for path in package_dir.iterdir() if (path / "__init__.py").is_file()}
    graph: dict[str, set[str]] = {}
    for path in sorted(package_dir.glob("*.py")):
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    base = node.module or ""
                elif node.level == 0 and node.module and (node.module + ".").startswith(package + "."):
                    base = node.module[len(package) + 1 :]
                else:
                    continue
                if base:
                    targets.append(base.split(".")[0])
                else:  # `from . import x`: a module of the package, or a name of its __init__
                    targets.extend(alias.name if alias.name in modules else "__init__" for alias in node.names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(package + "."):
                        targets.append(alias.name[len(package) + 1 :].split(".")[0])
            edges.update(target for target in targets if target in modules and target != path.stem)
        graph[path.stem] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (`a → b → a`), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def test_the_integration_has_no_import_cycle() -> None:
    graph = import_graph(INTEGRATION, PACKAGE)
    assert {"__init__", "config_flow", "entity"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_the_check_finds_a_cycle_through_a_lazy_import(tmp_path: Path) -> None:
    """The shape the integration had: `__init__` imports config_flow, which imports `__init__` in a function."""
    (tmp_path / "__init__.py").write_text("from .config_flow import model_file_problem\n")
    (tmp_path / "config_flow.py").write_text("def step():\n    from . import engine_config_from_entry\n")
    (tmp_path / "const.py").write_text("import custom_components.rkllm.config_flow\n")
    graph = import_graph(tmp_path, PACKAGE)
    assert graph == {"__init__": {"config_flow"}, "config_flow": {"__init__"}, "const": {"config_flow"}}
    assert find_cycle(graph) == ["__init__", "config_flow", "__init__"]
