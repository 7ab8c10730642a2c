"""API keys of the HTTP server (``elmreg serve``)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from elmreg.registry.entities import ApiKey


class KeyStore(ABC):
    """Named API keys, kept as sha256 digests: a key is shown once, when it is made, and never again."""

    @abstractmethod
    def add_key(
        self,
        name: str,
        key_sha256: str,
        prefix: str,
        *,
        rate: float | None = None,
        concurrency: int | None = None,
    ) -> ApiKey:
        """Store a new key's digest under ``name``.

        Args:
            name: Who the key is for; stored as ``caller_label`` with every decision made for its requests.
            key_sha256: Hex sha256 of the key.
            prefix: The key's first characters, for listings.
            rate: Requests per second a server takes with the key (None: no limit).
            concurrency: Requests in flight at once with the key (None: no limit).

        Raises:
            AlreadyExistsError: A key of that name exists (revoked ones included: names stay unique in audits).
        """

    @abstractmethod
    def find_key(self, key_sha256: str) -> ApiKey | None:
        """The unrevoked key with this digest, or None."""

    @abstractmethod
    def list_keys(self) -> list[ApiKey]:
        """Every key, revoked ones too, oldest first."""

    @abstractmethod
    def revoke_key(self, name: str) -> ApiKey:
        """Revoke a key: requests with it are refused from now on.

        Raises:
            NotFoundError: No key of that name.
        """
