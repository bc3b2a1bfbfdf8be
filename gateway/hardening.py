"""What the gateway refuses or adds for safety: no credentials in the query string (URLs
end up in logs and histories), JSON bodies only, X-Forwarded-For believed only from
GATEWAY_TRUSTED_PROXIES (the client's address is an anonymous caller's rate-limit
bucket), X-RateLimit-* and Retry-After, the security headers, CORS for CORS_ORIGINS."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import Scope

from gateway.errors import bad_request, http_only
from services.common.contract.forwarded import TrustedProxies
from services.common.contract.forwarded import client_address as forwarded_client

CREDENTIAL_PARAMETERS = frozenset({"api_key", "apikey", "api-key", "x-api-key", "key", "token", "access_token", "authorization"})
RATE_LIMIT_TRAILERS = {
    "x-ratelimit-limit": "X-RateLimit-Limit",
    "x-ratelimit-remaining": "X-RateLimit-Remaining",
    "x-ratelimit-reset": "X-RateLimit-Reset",
    "retry-after": "Retry-After",
}
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


def refuse_query_credentials(query: bytes) -> None:
    if not query:
        return
    for name, _ in parse_qsl(query.decode("utf-8", "replace"), keep_blank_values=True):
        if name.lower() in CREDENTIAL_PARAMETERS:
            raise bad_request(
                f"credentials are not accepted in the query string ({name!r}): send them in the x-api-key "
                "or authorization header",
                field=name,
                reason="CREDENTIALS_IN_QUERY",
            )


def require_json(scope: Scope) -> None:
    for name, value in scope["headers"]:
        if name == b"content-type":
            media_type = value.split(b";", 1)[0].strip().lower()
            if media_type == b"application/json" or media_type.endswith(b"+json"):
                return
            shown = value.decode("latin-1")
            break
    else:
        shown = "none"
    raise http_only(415, f"request bodies must be application/json, not {shown}")


def client_address(scope: Scope, proxies: TrustedProxies) -> str:
    """The client's address: the peer, or the rightmost untrusted X-Forwarded-For hop."""
    peer = scope["client"][0] if scope.get("client") else ""
    forwarded = [value.decode("latin-1") for name, value in scope["headers"] if name == b"x-forwarded-for"]
    return forwarded_client(peer, forwarded, proxies)


def rate_limit_headers(trailers: Iterable[tuple[str, object]] | None) -> dict[str, str]:
    pairs = trailers or ()
    return {RATE_LIMIT_TRAILERS[key]: value for key, value in pairs if key in RATE_LIMIT_TRAILERS and isinstance(value, str)}


def cors_options(origins_setting: str) -> dict[str, Any] | None:
    origins = [o.strip() for o in origins_setting.split(",") if o.strip()]
    if not origins:
        return None
    return {
        "allow_origins": origins,
        # A wildcard origin must not be combined with credentials.
        "allow_credentials": "*" not in origins,
        "allow_methods": ["GET", "POST", "PATCH", "DELETE"],
        "allow_headers": ["authorization", "x-api-key", "content-type", "x-request-id", "if-none-match", "cache-control", "idempotency-key"],
        "expose_headers": ["x-request-id", "etag", *RATE_LIMIT_TRAILERS.values()],
        "max_age": 600,
    }
