"""API key format and hashing.

A key is "dh_" and 32 random bytes in url-safe base64. Keys carry 256 bits of
entropy, so a plain SHA-256 is the right stored form: it cannot be reversed or
guessed, and it lets a lookup go straight to the unique index.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

PREFIX = "dh_"
_FORMAT = re.compile(r"^dh_[A-Za-z0-9_-]{43}$")
DISPLAY_PREFIX_LENGTH = 10


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def well_formed(key: str) -> bool:
    return bool(_FORMAT.match(key))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def same_key(key: str, other: str) -> bool:
    """Constant-time comparison, for the places that hold a key to compare against."""
    return hmac.compare_digest(key.encode(), other.encode())


def display_prefix(key: str) -> str:
    return key[:DISPLAY_PREFIX_LENGTH]
