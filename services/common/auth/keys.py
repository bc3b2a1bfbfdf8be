"""API key format and hashing, and the services' key a local run keeps.

A key is "dh_" and 32 random bytes in url-safe base64. Keys carry 256 bits of
entropy, so a plain SHA-256 is the right stored form: it cannot be reversed or
guessed, and it lets a lookup go straight to the unique index.

`make run` keeps the services' key (SERVICE_API_KEY when it is not set) in
SERVICE_KEY_FILE, so every run uses the same one and `make key` can present it.
"""

from __future__ import annotations

import hashlib
import hmac
import pathlib
import re
import secrets

PREFIX = "dh_"
_FORMAT = re.compile(r"^dh_[A-Za-z0-9_-]{43}$")
DISPLAY_PREFIX_LENGTH = 10
SERVICE_KEY_FILE = "var/service.key"


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


def kept_service_key() -> str:
    path = pathlib.Path(SERVICE_KEY_FILE)
    key = path.read_text().strip() if path.exists() else ""
    return key if well_formed(key) else ""


def local_service_key() -> str:
    """The kept services' key, made and kept first if there is none (readable by its owner only)."""
    key = kept_service_key()
    if key:
        return key
    path = pathlib.Path(SERVICE_KEY_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = new_key()
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key
