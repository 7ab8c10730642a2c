"""docker-compose.yml is the production-like path; no docker engine runs here, so check its wiring."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from elmreg.registry.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_images():
    services = _compose()["services"]
    assert services["postgres"]["image"].startswith("pgvector/pgvector:pg18")
    assert services["minio"]["image"].startswith("minio/minio")
    assert {"minio-init", "migrate", "worker", "scheduler"} <= set(services)
    assert services["migrate"]["command"] == ["db", "upgrade"]


def test_elmreg_environment_names_are_settings_and_point_at_the_services():
    compose = _compose()
    known = {"ELMREG_" + name.upper() for name in Settings.model_fields}
    for name in ("worker", "scheduler", "migrate"):
        env = compose["services"][name]["environment"]
        assert set(env) <= known, f"{name} uses unknown settings {set(env) - known}"
        settings = load_settings({k: str(v) for k, v in env.items()})
        assert not settings.uses_embedded_database and not settings.uses_embedded_s3
        assert "@postgres:5432/" in settings.database_url
        assert settings.s3_endpoint_url == "http://minio:9000"


def test_ports_and_credentials_are_consistent():
    compose = _compose()
    services = compose["services"]
    env = services["worker"]["environment"]
    pg = services["postgres"]["environment"]
    assert f"{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@" in env["ELMREG_DATABASE_URL"]
    assert env["ELMREG_DATABASE_URL"].endswith("/" + pg["POSTGRES_DB"])
    assert "5432:5432" in services["postgres"]["ports"]
    minio = services["minio"]["environment"]
    assert (env["ELMREG_S3_ACCESS_KEY_ID"], env["ELMREG_S3_SECRET_ACCESS_KEY"]) == (
        minio["MINIO_ROOT_USER"],
        minio["MINIO_ROOT_PASSWORD"],
    )
    assert "9000:9000" in services["minio"]["ports"]
    init = services["minio-init"]["entrypoint"]
    assert re.search(rf"mc mb --ignore-existing local/{env['ELMREG_S3_BUCKET']}\b", init)
