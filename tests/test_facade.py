"""The CLI and the server reach the registry through ``Registry`` (elmreg/api.py) only.

Read from the source with ``ast``: an import of the catalogue's stores or of the context that wires them, at module
level or inside a function, or reading an attribute named ``context`` on anything, in any module of cli/ or serve/,
fails the test with its file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FACADE_CLIENTS = ("cli", "serve")
FORBIDDEN_MODULES = ("elmreg.registry.store", "elmreg.runtime.context")


def _modules() -> list[Path]:
    return sorted(p for package in FACADE_CLIENTS for p in (ROOT / package).rglob("*.py"))


def _forbidden(name: str) -> bool:
    return any(name == module or name.startswith(module + ".") for module in FORBIDDEN_MODULES)


def violations(source: str, where: str) -> list[str]:
    """``where:line what`` for each way ``source`` goes around the facade."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute) and node.attr == "context":
            found.append(f"{where}:{node.lineno} reads .context")
            continue
        else:
            continue
        bad = next((name for name in names if _forbidden(name)), None)
        if bad is not None:
            found.append(f"{where}:{node.lineno} imports {bad}")
    return found


def test_the_cli_and_the_server_use_the_registry_only():
    found = []
    for path in _modules():
        found += violations(path.read_text(), path.relative_to(ROOT).as_posix())
    assert not found, "go through elmreg.api.Registry instead:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "from elmreg.registry.store.catalogue import CatalogueStore",
            "imports elmreg.registry.store.catalogue",
        ),
        ("from elmreg.registry.store import schema", "imports elmreg.registry.store"),
        ("import elmreg.runtime.context", "imports elmreg.runtime.context"),
        ("from elmreg.runtime import context", "imports elmreg.runtime.context"),
        ("def f(registry):\n    return registry.context.keys", "reads .context"),
    ],
)
def test_each_way_around_the_facade_is_caught(source, expected):
    assert violations(source, "cli/example.py") == [f"cli/example.py:{source.count(chr(10)) + 1} {expected}"]


def test_the_facade_itself_is_allowed():
    source = "from elmreg.api import Expert, Registry\nfrom elmreg.registry.errors import UserError\n"
    assert violations(source, "serve/example.py") == []
