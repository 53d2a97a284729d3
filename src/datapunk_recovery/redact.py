"""Redaction of secrets: what may leave the library in a log, label, event or message.

Connection strings and URLs lose their passwords, header maps lose
``Authorization``, cookies and tokens.  Every module that reports something
that came from a user (a DSN, a URL, headers) passes it through here first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit, urlunsplit

__all__ = ["REDACTED", "redact_headers", "redact_text", "redact_url"]

REDACTED: Final = "***"

_SECRET_HEADERS: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "x-auth-token",
        "x-amz-security-token",
    }
)
# scheme://user:password@host  ->  scheme://user:***@host
_URL_PASSWORD: Final = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]*:)[^@\s/]*(?=@)")
# key=value DSNs (libpq style) and query strings: password=..., token=...
_KV_SECRET: Final = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?token|sslpassword)"
    r"\s*=\s*)(?P<value>'[^']*'|\"[^\"]*\"|[^\s&;]+)",
    re.IGNORECASE,
)
_BEARER: Final = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=\-]+", re.IGNORECASE)


def redact_text(text: str) -> str:
    """Remove passwords and tokens from any text: URLs, libpq DSNs, auth headers."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
    text = _KV_SECRET.sub(lambda m: m.group("key") + REDACTED, text)
    return _BEARER.sub(lambda m: m.group(1) + " " + REDACTED, text)


def redact_url(url: str) -> str:
    """A URL or DSN without its password (and without secrets in its query)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    if parts.password is not None:
        user = parts.username or ""
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        parts = parts._replace(netloc=f"{user}:{REDACTED}@{host}")
    return redact_text(urlunsplit(parts))


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``headers`` with credentials replaced by ``***``."""
    return {
        k: (REDACTED if k.lower() in _SECRET_HEADERS else redact_text(str(v)))
        for k, v in headers.items()
    }
