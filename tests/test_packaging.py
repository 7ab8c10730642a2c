"""Every code folder installs under the one `elmreg` namespace."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config["package-dir"]
    listed = set(config["packages"])
    found = set()
    for namespace, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([namespace, *relative.parts]) if relative.parts else namespace)
    assert found == listed


def test_no_bare_top_level_modules():
    for bare in (
        "registry",
        "models",
        "data",
        "services",
        "runtime",
        "reports",
        "cli",
        "trainers",
        "inference",
        "migrations",
    ):
        try:
            importlib.import_module(bare)
        except ModuleNotFoundError:
            continue
        raise AssertionError(f"'{bare}' is importable as a top-level module")
