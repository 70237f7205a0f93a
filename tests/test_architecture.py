"""The project's modules form no import cycle: every import statement (also inside functions
and ``TYPE_CHECKING`` blocks) of mlx_smolvlm, router and benchmarks points one way."""

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("mlx_smolvlm", "router", "benchmarks")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


def imported(node: ast.AST, name: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The project modules one import statement of module ``name`` names."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = name.split(".")
            package = package if is_package else package[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        # `from package import submodule` names the submodule; other names the module itself.
        targets = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
            for alias in node.names
        ]
    else:
        return []
    return [t for t in targets if t in modules]


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        graph[name] = {
            target
            for node in ast.walk(tree)
            for target in imported(node, name, is_package, modules)
            if target != name
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_relative_absolute_and_submodule_imports():
    graph = import_graph()
    assert "mlx_smolvlm.model" in graph["mlx_smolvlm.load"]  # from .model import Model
    assert "router.ir" in graph["router.fallback"]  # from . import ir
    assert "mlx_smolvlm.engine" in graph["router.providers.mlx"]  # from mlx_smolvlm.engine ...


def test_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_between_the_projects_modules():
    assert cycles(import_graph()) == []


def main_dependencies() -> set[str]:
    """Distribution names of pyproject's main ``dependencies`` (no extras)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = (re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0] for spec in project["dependencies"])
    return {name.lower().replace("_", "-") for name in names}


def top_level_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports a module makes outside ``try`` blocks (those
    guard optional extras)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for n in ast.walk(t)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_library_imports_only_its_main_dependencies():
    """`pip install .` (no extras) must be enough for every library module: a package that only a
    test extra brings once broke README's main command on a fresh machine."""
    from importlib.metadata import packages_distributions

    declared = main_dependencies()
    distributions = packages_distributions()
    missing = {}
    for package in ("mlx_smolvlm", "router"):
        for path in (ROOT / package).rglob("*.py"):
            for name in top_level_imports(path):
                if name in sys.stdlib_module_names or name in PACKAGES:
                    continue
                dists = {d.lower().replace("_", "-") for d in distributions.get(name, [name])}
                if not dists & declared:
                    missing.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert missing == {}
