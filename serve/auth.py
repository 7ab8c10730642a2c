"""API keys checked per request, with a short memory; and which listen addresses are this machine's."""

from __future__ import annotations

import ipaddress
import threading
import time
from typing import Protocol

from elmreg.api import ApiKey
from elmreg.api_keys import KEY_PREFIX, key_digest

# How long a checked key is trusted without asking the catalogue again: revoking a key takes this long to bite.
KEY_CACHE_SECONDS = 10.0


class KeyLookup(Protocol):
    """Where a checker finds keys by digest (the catalogue's key store)."""

    def find_key(self, key_sha256: str) -> ApiKey | None: ...


def is_loopback(host: str) -> bool:
    """Whether a listen address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class KeyChecker:
    """Answers "whose key is this?" for ``Authorization: Bearer <key>`` headers."""

    def __init__(self, store: KeyLookup, *, cache_seconds: float = KEY_CACHE_SECONDS):
        self.store = store
        self.cache_seconds = cache_seconds
        self._known: dict[str, tuple[ApiKey, float]] = {}
        self._lock = threading.Lock()

    def check(self, authorization: str | None) -> ApiKey | None:
        """The key's record, or None for a missing, malformed, unknown or revoked key."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip().startswith(KEY_PREFIX):
            return None
        digest = key_digest(key.strip())
        now = time.monotonic()
        with self._lock:
            known = self._known.get(digest)
        if known is not None and now - known[1] < self.cache_seconds:
            return known[0]
        found = self.store.find_key(digest)
        with self._lock:
            if found is None:
                self._known.pop(digest, None)
            else:
                self._known[digest] = (found, now)
        return found
