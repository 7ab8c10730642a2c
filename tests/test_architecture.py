"""The layers hold: every import between elmreg's top-level packages points down, and none forms a cycle.

The graph is read from the source with ``ast``: imports at module level and inside functions alike (an import
deferred for speed is still a dependency), in every .py file of every package pyproject installs.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A package may import packages of lower layers only; packages in one layer are independent.
LAYERS: list[set[str]] = [
    # The catalogue: stores and their entities, settings, names, kinds, errors, artifacts. No model code.
    {"registry"},
    # Backbones, tokenising and the embedder (torch) | dataset sources and the prompt sandbox | the embedded
    # PostgreSQL and SeaweedFS launchers and endpoint resolution.
    {"models", "data", "services"},
    # The context that wires stores, artifacts, endpoints and the backbone cache, with what needs all of them |
    # each kind's weight format and the one loader that puts a stored expert on a backbone.
    {"runtime", "experts"},
    # Reports from packaged templates (benchmark and experiment reports render through it).
    {"reports"},
    # Training loops | routing, the adapter pool, scoring, evaluation, benchmarks.
    {"trainers", "inference"},
    # Merging (its weight tuning evaluates like inference) | the job runner, its handlers and the scheduler.
    {"merging", "jobs"},
    # The Python API (elmreg/api.py), which wires everything below.
    {"elmreg"},
    # The experiment harness | the HTTP server (elmreg serve): clients of the API.
    {"experiments", "serve"},
    {"cli"},
]
# Model code a reader must not meet in these packages: each says what it holds, and none of it is a model.
HEAVY = {"torch", "transformers", "peft", "sentence_transformers", "matplotlib"}
TORCH_FREE: dict[str, set[str]] = {
    # The catalogue also holds no templating and no TLS: those belong to data/, reports/ and services/.
    "registry": HEAVY | {"jinja2", "cryptography"},
    "services": HEAVY,
    "data": HEAVY,
}
# migrations/ holds the registry's Alembic scripts: registry.store.schema points Alembic at the folder and the
# scripts read the registry's models, so it is one package with the registry (as MLflow keeps db_migrations
# inside its store), installed as its own folder only because Alembic wants a script directory.
PART_OF = {"migrations": "registry"}


def _packages() -> dict[str, Path]:
    """Top-level package name (``elmreg.<name>``; ``elmreg`` for the API) -> its folder."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {
        namespace.split(".", 1)[1] if "." in namespace else "elmreg": ROOT / folder
        for namespace, folder in mapping.items()
    }


PACKAGES = _packages()


def _module_name(package: str, path: Path) -> str:
    parts = list(path.relative_to(PACKAGES[package]).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    prefix = ["elmreg"] if package == "elmreg" else ["elmreg", package]
    return ".".join(prefix + parts)


def _imported(module: str, is_package: bool, tree: ast.AST) -> Iterator[tuple[str, int]]:
    """Absolute names of what a module imports (each ``from a import b`` also as ``a.b``), with line numbers."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:
                yield f"{target}.{alias.name}", node.lineno


def _top_level(name: str) -> str | None:
    """The elmreg top-level package a module name belongs to (None: not elmreg's)."""
    parts = name.split(".")
    if parts[0] != "elmreg":
        return None
    package = parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "elmreg"
    return PART_OF.get(package, package)


def _modules() -> dict[str, Path]:
    """Every module of every package, by its ``elmreg.`` name."""
    return {
        _module_name(package, path): path
        for package, folder in PACKAGES.items()
        for path in sorted(folder.rglob("*.py"))
    }


def import_edges() -> dict[tuple[str, str], list[str]]:
    """(importer package, imported package) -> where ("file:line") for every cross-package import."""
    edges: dict[tuple[str, str], list[str]] = {}
    for package, folder in PACKAGES.items():
        importer = PART_OF.get(package, package)
        for path in sorted(folder.rglob("*.py")):
            module = _module_name(package, path)
            tree = ast.parse(path.read_text(), filename=str(path))
            for name, line in _imported(module, path.name == "__init__.py", tree):
                target = _top_level(name)
                if target is not None and target != importer:
                    where = f"{path.relative_to(ROOT)}:{line}"
                    if where not in edges.setdefault((importer, target), []):
                        edges[(importer, target)].append(where)
    return edges


def _layer(package: str) -> int:
    for index, layer in enumerate(LAYERS):
        if package in layer:
            return index
    raise AssertionError(f"package {package} is in no layer of tests/test_architecture.py; add it to LAYERS")


def test_every_package_has_a_layer():
    for package in PACKAGES:
        _layer(PART_OF.get(package, package))


def test_imports_point_down_the_layers():
    wrong = [
        f"{importer} -> {target} ({', '.join(where)})"
        for (importer, target), where in sorted(import_edges().items())
        if _layer(target) >= _layer(importer)
    ]
    assert wrong == [], "imports that break the layers:\n" + "\n".join(wrong)


def test_no_cycles_between_packages():
    graph: dict[str, set[str]] = {}
    for importer, target in import_edges():
        graph.setdefault(importer, set()).add(target)
    visiting: list[str] = []
    done: set[str] = set()

    def visit(package: str) -> None:
        if package in visiting:
            cycle = visiting[visiting.index(package) :] + [package]
            pytest.fail(f"import cycle between packages: {' -> '.join(cycle)}")
        if package in done:
            return
        visiting.append(package)
        for target in sorted(graph.get(package, ())):
            visit(target)
        visiting.pop()
        done.add(package)

    for package in sorted(graph):
        visit(package)


def test_no_cycles_between_modules():
    """Inside a package too (merging's pipeline and tuning once imported each other from inside functions)."""
    modules = _modules()
    graph = {module: set() for module in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, _ in _imported(module, path.name == "__init__.py", tree):
            if name in modules and name != module:
                graph[module].add(name)
    state: dict[str, str] = {}  # "visiting" or "done"
    trail: list[str] = []

    def visit(module: str) -> None:
        if state.get(module) == "done":
            return
        if state.get(module) == "visiting":
            cycle = trail[trail.index(module) :] + [module]
            pytest.fail(f"import cycle between modules: {' -> '.join(cycle)}")
        state[module] = "visiting"
        trail.append(module)
        for target in sorted(graph[module]):
            visit(target)
        trail.pop()
        state[module] = "done"

    for module in sorted(graph):
        visit(module)


def test_the_graph_sees_imports_inside_functions():
    """A guard on the test itself: a deferred import (api.py defers nearly all of its own) is an edge too."""
    assert ("elmreg", "merging") in import_edges()


def test_torch_free_packages_import_no_model_code():
    """Imports inside functions count: a deferred ``import torch`` still makes the package need torch."""
    found = []
    for package, folder in PACKAGES.items():
        owner = PART_OF.get(package, package)
        if owner not in TORCH_FREE:
            continue
        for path in sorted(folder.rglob("*.py")):
            module = _module_name(package, path)
            tree = ast.parse(path.read_text(), filename=str(path))
            for name, line in _imported(module, path.name == "__init__.py", tree):
                if name.split(".")[0] in TORCH_FREE[owner]:
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert found == [], (
        f"model code in packages that must not hold it ({', '.join(TORCH_FREE)}):\n"
        + "\n".join(sorted(set(found)))
    )


def test_the_torch_free_check_sees_imports_inside_functions():
    """A guard on the check itself: models/backbones.py imports torch only inside functions."""
    path = PACKAGES["models"] / "backbones.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    module_level = {
        alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names
    } | {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    seen = {name.split(".")[0] for name, _ in _imported("elmreg.models.backbones", False, tree)}
    assert "torch" not in module_level and "torch" in seen
