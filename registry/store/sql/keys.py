"""API keys on PostgreSQL."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from elmreg.registry.entities import ApiKey
from elmreg.registry.errors import NotFoundError
from elmreg.registry.store.keys import KeyStore
from elmreg.registry.store.models import ApiKeyRow
from elmreg.registry.store.session import ManagedSessions


def _key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        row.id, row.name, row.prefix, row.created_at, row.revoked_at, row.rate_per_second, row.max_concurrent
    )


class SqlKeyStore(KeyStore):
    """:class:`KeyStore` on PostgreSQL."""

    def __init__(self, sessions: ManagedSessions):
        self.sessions = sessions

    def add_key(
        self,
        name: str,
        key_sha256: str,
        prefix: str,
        *,
        rate: float | None = None,
        concurrency: int | None = None,
    ) -> ApiKey:
        with self.sessions() as session:
            row = ApiKeyRow(
                name=name,
                key_sha256=key_sha256,
                prefix=prefix,
                rate_per_second=rate,
                max_concurrent=concurrency,
            )
            session.add(row)
            session.flush()
            session.refresh(row)
            return _key(row)

    def find_key(self, key_sha256: str) -> ApiKey | None:
        with self.sessions() as session:
            row = session.scalar(
                select(ApiKeyRow).where(ApiKeyRow.key_sha256 == key_sha256, ApiKeyRow.revoked_at.is_(None))
            )
            return _key(row) if row is not None else None

    def list_keys(self) -> list[ApiKey]:
        with self.sessions() as session:
            return [_key(row) for row in session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.id))]

    def revoke_key(self, name: str) -> ApiKey:
        with self.sessions() as session:
            row = session.scalar(select(ApiKeyRow).where(ApiKeyRow.name == name))
            if row is None:
                raise NotFoundError(f"no API key '{name}': list them with 'elmreg serve keys list'")
            if row.revoked_at is None:
                row.revoked_at = dt.datetime.now(dt.UTC)
                session.flush()
            return _key(row)
