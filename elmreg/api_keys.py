"""API keys of the HTTP server: made once and shown once, kept in the catalogue as sha256 digests."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "elmreg-"
# Characters of a key kept in the clear, so that listings can tell keys apart.
SHOWN_CHARACTERS = len(KEY_PREFIX) + 6


def key_digest(key: str) -> str:
    """The hex sha256 the catalogue keeps instead of the key. Keys carry 256 random bits, so a plain hash (no
    salt, no slow KDF) cannot be reversed, and lookups by digest stay one index probe."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh key: the prefix and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)
