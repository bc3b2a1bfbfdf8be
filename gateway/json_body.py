"""The one JSON encoding every gateway response uses: compact UTF-8, no ASCII escaping."""

from __future__ import annotations

import json
from typing import Any

JSON_MEDIA_TYPE = "application/json"

JsonObject = dict[str, Any]

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode(value: Any) -> bytes:
    return _encoder.encode(value).encode("utf-8")
