"""Where the catalogue and the weights live: configured URLs, or the embedded servers started on demand.

With ``ELMREG_DATABASE_URL`` / ``ELMREG_S3_ENDPOINT_URL`` set, elmreg uses those servers and starts nothing.
Otherwise it starts the embedded PostgreSQL (pgserver) and S3 (SeaweedFS) under ``$ELMREG_HOME/services`` the first
time a command needs them; they keep running and are shared by all elmreg processes of the user until
``elmreg services down``.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from filelock import FileLock

from elmreg.registry.endpoints import Endpoints
from elmreg.registry.errors import ServiceError
from elmreg.registry.settings import Settings
from elmreg.services.postgres import EmbeddedPostgres
from elmreg.services.seaweedfs import EmbeddedS3

__all__ = [
    "ServiceStatus",
    "resolve_endpoints",
    "services_down",
    "services_status",
    "services_up",
]


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    embedded: bool
    running: bool
    url: str
    detail: str = ""


def _postgres(settings: Settings) -> EmbeddedPostgres:
    return EmbeddedPostgres(settings.services_dir / "postgres")


def _s3(settings: Settings) -> EmbeddedS3:
    return EmbeddedS3(settings.services_dir / "seaweedfs", settings.services_dir / "seaweedfs.json")


def _lock(settings: Settings) -> FileLock:
    settings.services_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(settings.services_dir / ".lock"), timeout=120)


def embedded_s3_credentials(settings: Settings) -> tuple[str, str]:
    """The embedded server's key pair: the configured one, else one generated at first start and kept 0600."""
    if settings.s3_access_key_id and settings.s3_secret_access_key:
        return settings.s3_access_key_id, settings.s3_secret_access_key
    path = settings.services_dir / "s3-credentials.json"
    if path.exists():
        stored = json.loads(path.read_text())
        return stored["access_key_id"], stored["secret_access_key"]
    settings.services_dir.mkdir(parents=True, exist_ok=True)
    access, secret = "elmreg-" + secrets.token_hex(6), secrets.token_urlsafe(30)
    path.touch(mode=0o600)
    path.write_text(json.dumps({"access_key_id": access, "secret_access_key": secret}))
    return access, secret


def resolve_endpoints(settings: Settings, *, start: bool = True) -> Endpoints:
    """Return where the catalogue and weights are, starting embedded servers if needed and allowed.

    Raises:
        ServiceError: An embedded server is needed but cannot start (or is down and ``start`` is False).
    """
    database_url, s3_url = settings.database_url, settings.s3_endpoint_url
    access, secret = settings.s3_access_key_id, settings.s3_secret_access_key
    if settings.uses_embedded_database or settings.uses_embedded_s3:
        with _lock(settings):
            if settings.uses_embedded_database:
                pg = _postgres(settings)
                state = pg.start() if start else pg.state()
                if not state.running:
                    raise ServiceError(
                        "embedded PostgreSQL is not running: start it with 'elmreg services up'"
                    )
                database_url = state.url() or ""
            if settings.uses_embedded_s3:
                access, secret = embedded_s3_credentials(settings)
                s3 = _s3(settings)
                s3_state = s3.start(access, secret) if start else s3.state()
                if not s3_state.running:
                    raise ServiceError(
                        "embedded S3 server is not running: start it with 'elmreg services up'"
                    )
                s3_url = s3_state.endpoint_url or ""
    return Endpoints(
        database_url=database_url,
        s3_endpoint_url=s3_url,
        s3_access_key_id=access,
        s3_secret_access_key=secret,
        s3_region=settings.s3_region,
        s3_bucket=settings.s3_bucket,
        s3_prefix=settings.s3_prefix,
    )


def services_up(settings: Settings) -> list[ServiceStatus]:
    """Start the embedded servers that the settings call for; configured servers are left alone."""
    resolve_endpoints(settings, start=True)
    return services_status(settings)


def services_down(settings: Settings) -> list[str]:
    """Stop the embedded servers; returns the names of those that were running."""
    stopped = []
    with _lock(settings):
        if _s3(settings).stop():
            stopped.append("s3")
        if _postgres(settings).stop():
            stopped.append("postgres")
    return stopped


def services_status(settings: Settings) -> list[ServiceStatus]:
    """Describe both services without starting anything."""
    rows = []
    if settings.uses_embedded_database:
        pg = _postgres(settings).state()
        rows.append(
            ServiceStatus(
                "postgres", True, pg.running, pg.url() or "", f"pid {pg.pid}" if pg.running else "stopped"
            )
        )
    else:
        rows.append(ServiceStatus("postgres", False, True, _redact(settings.database_url), "configured"))
    if settings.uses_embedded_s3:
        s3 = _s3(settings).state()
        rows.append(
            ServiceStatus(
                "s3", True, s3.running, s3.endpoint_url or "", f"pid {s3.pid}" if s3.running else "stopped"
            )
        )
    else:
        rows.append(ServiceStatus("s3", False, True, settings.s3_endpoint_url, "configured"))
    return rows


def _redact(url: str) -> str:
    """Hide a password in a database URL before printing it."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a malformed URL is reported elsewhere; never echo secrets
        return "<unparseable URL>"
