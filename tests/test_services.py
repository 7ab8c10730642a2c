"""The embedded services, as users get them: started on demand, shared, and locked down."""

from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest

from elmreg.registry.settings import load_settings
from elmreg.services import resolve_endpoints, services_down, services_status, services_up


def test_embedded_postgres_has_pgvector(registry):
    url = registry.endpoints.database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as connection:
        version = connection.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        ).fetchone()[0]
        # A 384-d inner product: the operation that crashes AVX-512 builds of pgvector on AVX2-only machines.
        value = connection.execute(
            "SELECT (array_fill(0.5, ARRAY[384])::vector <#> array_fill(0.5, ARRAY[384])::vector)"
        ).fetchone()[0]
    assert version
    assert value == pytest.approx(-96.0)


def test_unsigned_s3_request_is_rejected(registry):
    if not registry.settings.uses_embedded_s3:
        pytest.skip("only the embedded server's identity configuration is ours to check")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{registry.endpoints.s3_endpoint_url}/{registry.endpoints.s3_bucket}/")
    assert refused.value.code == 403


def test_embedded_s3_listens_on_loopback_only(registry):
    if not registry.settings.uses_embedded_s3:
        pytest.skip("embedded only")
    assert registry.endpoints.s3_endpoint_url.startswith("http://127.0.0.1:")


def test_second_resolve_reuses_running_servers(settings, registry):
    again = resolve_endpoints(settings)
    assert again == registry.endpoints


def test_up_down_cycle_keeps_data():
    home = Path(tempfile.mkdtemp(prefix="elmreg-test-cycle-"))  # see conftest: not under pytest's 0700 root
    settings = load_settings({"ELMREG_HOME": str(home)})
    try:
        rows = {r.name: r for r in services_up(settings)}
        assert rows["postgres"].running and rows["s3"].running
        url = rows["postgres"].url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("CREATE TABLE keep_me (x int)")
        assert sorted(services_down(settings)) == ["postgres", "s3"]
        assert not any(r.running for r in services_status(settings))
        assert services_down(settings) == []
        rows = {r.name: r for r in services_up(settings)}
        with psycopg.connect(
            rows["postgres"].url.replace("postgresql+psycopg://", "postgresql://")
        ) as connection:
            assert connection.execute("SELECT to_regclass('keep_me') IS NOT NULL").fetchone()[0]
    finally:
        services_down(settings)
        shutil.rmtree(home, ignore_errors=True)


def test_configured_servers_are_not_started(tmp_path):
    settings = load_settings(
        {
            "ELMREG_HOME": str(tmp_path),
            "ELMREG_DATABASE_URL": "postgresql+psycopg://u:secret@db.example:5432/x",
            "ELMREG_S3_ENDPOINT_URL": "https://s3.example",
        }
    )
    endpoints = resolve_endpoints(settings)
    assert endpoints.database_url.endswith("db.example:5432/x")
    rows = services_status(settings)
    assert [r.embedded for r in rows] == [False, False]
    assert "secret" not in rows[0].url  # passwords never printed
    assert not (tmp_path / "services" / "postgres").exists()
