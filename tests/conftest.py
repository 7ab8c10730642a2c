"""Session fixtures: the real embedded PostgreSQL+pgvector and SeaweedFS S3, started once for the whole run.

With ELMREG_TEST_DATABASE_URL / ELMREG_TEST_S3_ENDPOINT_URL (and the S3 key variables) set, the suite runs against
those servers instead; either way it is the code path users get, never a mock.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.bigbench_tree import write_bigbench_cache
from fixtures.tiny_models import BUILDERS
from sqlalchemy import text

from elmreg.api import Registry
from elmreg.registry.settings import Settings, load_settings
from elmreg.registry.store import schema
from elmreg.runtime.context import RegistryContext
from elmreg.services import services_down


def _test_environ(home: Path) -> dict[str, str]:
    """The environment the tests' settings are built from: the test home, plus any external servers."""
    environ = {"ELMREG_HOME": str(home)}
    for name in ("DATABASE_URL", "S3_ENDPOINT_URL", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"):
        value = os.environ.get(f"ELMREG_TEST_{name}")
        if value:
            environ[f"ELMREG_{name}"] = value
    return environ


@pytest.fixture(scope="session")
def elmreg_home() -> Iterator[Path]:
    # Not under pytest's tmp_path: pytest keeps its root 0700 and prunes old runs, while the embedded
    # PostgreSQL runs as the 'pgserver' user (when tests run as root), which must reach its data directory.
    home = Path(tempfile.mkdtemp(prefix="elmreg-test-home-"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def test_environ(elmreg_home: Path) -> dict[str, str]:
    return _test_environ(elmreg_home)


@pytest.fixture(scope="session")
def settings(test_environ: dict[str, str]) -> Iterator[Settings]:
    settings = load_settings(test_environ)
    yield settings
    services_down(settings)


@pytest.fixture(scope="session")
def registry(settings: Settings) -> Iterator[RegistryContext]:
    """A registry on real services with the schema migrated to head."""
    context = RegistryContext(settings)
    schema.upgrade(context.engine)
    yield context
    context.close()


@pytest.fixture(scope="session")
def artifacts(registry: RegistryContext):
    return registry.artifacts


@pytest.fixture
def unique() -> str:
    """A short unique suffix, so tests sharing the session's catalogue never collide on names."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def fresh_registry(settings: Settings, scratch_database: str) -> Iterator[RegistryContext]:
    """A registry on its own empty, migrated database (same servers): for tests that need an empty queue."""
    context = RegistryContext(settings.replace(database_url=scratch_database))
    schema.upgrade(context.engine)
    yield context
    context.close()


@pytest.fixture
def scratch_database(registry: RegistryContext) -> Iterator[str]:
    """A fresh, empty database on the same server (for migration tests that drop everything)."""
    name = f"elmreg_scratch_{uuid.uuid4().hex[:8]}"
    with registry.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    url = registry.engine.url.set(database=name)
    yield url.render_as_string(hide_password=False)
    with registry.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory):
    return {family: str(build(tmp_path_factory.mktemp(f"bb-{family}"))) for family, build in BUILDERS.items()}


@pytest.fixture
def lab(settings, scratch_database, tmp_path, tiny_backbones):
    """A registry on its own database and bucket prefix, a small BIG-bench cache, a tiny causal default backbone."""
    cache = tmp_path / "cache"
    write_bigbench_cache(cache)
    lab_settings = settings.replace(
        database_url=scratch_database,
        s3_prefix=f"{tmp_path.name}/",
        cache_dir=cache,
        backbone=tiny_backbones["causal"],
        device="cpu",
    )
    registry = Registry(lab_settings)
    schema.upgrade(registry.context.engine)
    yield registry
    registry.close()


def lab_environ(registry: Registry) -> dict[str, str]:
    """The environment that makes an elmreg subprocess (or CliRunner) use the same registry as ``lab``."""
    s = registry.settings
    return {
        "ELMREG_HOME": str(s.home),
        "ELMREG_DATABASE_URL": s.database_url,
        "ELMREG_S3_PREFIX": s.s3_prefix,
        "ELMREG_CACHE_DIR": str(s.cache_path),
        "ELMREG_BACKBONE": s.backbone,
        "ELMREG_DEVICE": "cpu",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }
