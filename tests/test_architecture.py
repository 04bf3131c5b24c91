"""The package layering, checked on the source: imports point down, never sideways or in a circle.

Every import counts, also those inside functions and under TYPE_CHECKING: a function-level import
hides a dependency from the reader, it does not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository root (this file is tests/test_architecture.py)
PACKAGES = ("fedasls", "wire", "clients", "server", "simulations")

# Lowest first. A module may import its own group and any group on a lower level, nothing else.
LEVELS: tuple[tuple[str, ...], ...] = (
    ("fedasls", "fedasls.errors", "fedasls.files", "fedasls.interaction", "fedasls.model_folder", "fedasls.recording",
     "fedasls.stats"),  # "fedasls": the package root
    ("fedasls.federated", "fedasls.sim"),  # pure aggregation maths; the simulated world's devices
    ("fedasls.config",),
    ("fedasls.scenarios", "fedasls.data", "fedasls.privacy"),
    ("fedasls.lm",),
    ("fedasls.pipeline",),
    ("fedasls.device",),
    ("wire",),  # Flower messages both sides import
    ("clients", "server"),  # the ClientApp and the ServerApp never import each other
    ("simulations",),  # the CLI, runners, reports
)


def group_of(module: str) -> str:
    if module == "fedasls":
        return module
    for level in LEVELS:
        for group in level:
            if group != "fedasls" and (module == group or module.startswith(group + ".")):
                return group
    raise AssertionError(f"module {module} belongs to no group in LEVELS; add it there")


def level_of(group: str) -> int:
    return next(i for i, level in enumerate(LEVELS) if group in level)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, module: str | None = None) -> set[str]:
    """Every module the file imports (absolute names), wherever the import statement stands."""
    module = module or module_name(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if path.name == "__init__.py" else base[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def project_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (names that are not modules, e.g. functions, drop out)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {mod: {t for t in imports_of(path) if t in files and t != mod} for mod, path in files.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in graph.items():
        group = group_of(module)
        for target in targets:
            other = group_of(target)
            if other != group and level_of(other) >= level_of(group):
                found.append(f"{module} imports {target} ({other} is not below {group})")
    return sorted(found)


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
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
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return circles


def test_imports_point_down_only():
    upward = upward_imports(project_graph())
    assert not upward, "imports that run upward or sideways:\n" + "\n".join(upward)


def test_no_import_circles():
    circles = import_circles(project_graph())
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("package, forbidden", [
    ("fedasls", ("flwr", "ray", "clients", "server", "simulations", "wire")),
    ("wire", ("clients", "server", "simulations")),
    ("server", ("clients", "simulations")),
    ("clients", ("server", "simulations")),
])
def test_package_never_imports(package, forbidden):
    bad = sorted(f"{module_name(p)} imports {t}" for p in (ROOT / package).rglob("*.py") for t in imports_of(p)
                 if t.split(".")[0] in forbidden)
    assert not bad, "\n".join(bad)


def test_the_checker_finds_planted_violations(tmp_path):
    """The checks themselves can fail: a function-level upward import, a sideways import and a circle."""
    source = tmp_path / "planted.py"
    source.write_text("def f():\n    from fedasls.device.worker import DeviceRuntime\n")
    assert "fedasls.device.worker" in imports_of(source, "fedasls.data.planted")
    assert upward_imports({"fedasls.data.planted": {"fedasls.device.worker"}})
    assert upward_imports({"server.rounds": {"clients.app"}})
    assert not upward_imports({"fedasls.device.worker": {"fedasls.data.population"}})
    assert import_circles({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}}) == [["a.x", "a.y", "a.z"]]
