"""Fixtures for fault injection on the S3 side: an embedded SeaweedFS of its own, so stopping, freezing or
restarting it never disturbs the rest of the suite (which shares the session's servers)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from elmreg.registry.settings import Settings, load_settings
from elmreg.registry.store import schema
from elmreg.runtime.context import RegistryContext
from elmreg.services import resolve_endpoints, services_down
from elmreg.services.seaweedfs import EmbeddedS3


@pytest.fixture(scope="module")
def own_s3(registry: RegistryContext) -> Iterator[Settings]:
    """Settings whose S3 is a private embedded SeaweedFS (started here), on the session's PostgreSQL server."""
    if registry.settings.s3_endpoint_url:
        pytest.skip("faults are injected into the embedded S3 server only")
    home = Path(
        tempfile.mkdtemp(prefix="elmreg-test-faults-")
    )  # see the root conftest: not under pytest's root
    settings = load_settings({"ELMREG_HOME": str(home)}).replace(database_url=registry.endpoints.database_url)
    resolve_endpoints(settings)
    yield settings
    services_down(settings)
    shutil.rmtree(home, ignore_errors=True)


def embedded_s3(settings: Settings) -> EmbeddedS3:
    return EmbeddedS3(settings.services_dir / "seaweedfs", settings.services_dir / "seaweedfs.json")


@pytest.fixture
def own_context(own_s3: Settings, scratch_database: str, tmp_path: Path) -> Iterator[RegistryContext]:
    """A registry on its own empty database and the private S3 server (a prefix of its own)."""
    context = RegistryContext(
        own_s3.replace(
            database_url=scratch_database, s3_prefix=f"{tmp_path.name}/", cache_dir=tmp_path / "cache"
        )
    )
    schema.upgrade(context.engine)
    yield context
    context.close()
