"""API keys: made once and shown once, kept as sha256 digests, checked per request with a short memory."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import threading
import time

from elmreg.registry.entities import ApiKey
from elmreg.registry.store.keys import KeyStore

KEY_PREFIX = "elmreg-"
# How long a checked key is trusted without asking the catalogue again: revoking a key takes this long to bite.
KEY_CACHE_SECONDS = 10.0


def key_digest(key: str) -> str:
    """The hex sha256 the catalogue keeps instead of the key. Keys carry 256 random bits, so a plain hash (no
    salt, no slow KDF) cannot be reversed, and lookups by digest stay one index probe."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(store: KeyStore, name: str) -> tuple[ApiKey, str]:
    """A new key for ``name``: its record and the key itself, which nobody can see again after this."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return store.add_key(name, key_digest(key), key[: len(KEY_PREFIX) + 6]), key


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

    def __init__(self, store: KeyStore, *, cache_seconds: float = KEY_CACHE_SECONDS):
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
