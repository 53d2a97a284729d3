"""Redaction of secrets: what may leave the library in a log, label, event or message.

Connection strings and URLs lose their passwords, header maps lose
``Authorization``, cookies and tokens.  Every module that reports something
that came from a user (a DSN, a URL, headers) passes it through here first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

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
# scheme://user:password@host  ->  scheme://user:***@host.  The password runs
# to the *last* "@" before the host, so one holding "/", "@" or "?" (unencoded,
# as people do write them) goes whole; at worst a URL without credentials but
# with an "@" later on loses a little more than its password.  Every repeat is
# bounded, so that no text, however hostile, makes the scan quadratic.
_URL_PASSWORD: Final = re.compile(
    r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]{0,31}://[^/\s:@]{0,255}:)"
    r"\S{0,255}?(?=@[^@\s/?#]{0,255}(?:[/?#\s]|$))"
)
# key=value DSNs (libpq style), query strings, env-style and JSON-ish pairs:
# password=..., PGPASSWORD=..., client_secret: ..., "api_key": "...".
_KV_SECRET: Final = re.compile(
    r"(?P<key>\b[\w-]{0,64}?(?:password|passwd|pwd|secret|token|api[_-]?key)[\"']?\s*[=:]\s*)"
    r"(?P<value>'[^']*'|\"[^\"]*\"|[^\s&;,]+)",
    re.IGNORECASE,
)
# A credential header written as text ("Cookie: a=1; b=2", "x-api-key=abc"):
# its value, up to the end of the line or of a quoted value.
_HEADER_LINE: Final = re.compile(
    r"(?P<key>\b(?:authorization|proxy-authorization|cookie|set-cookie|x-api-key|"
    r"x-auth-token|x-amz-security-token)[\"']?\s*[:=]\s*[\"']?)[^\r\n\"']+",
    re.IGNORECASE,
)
_BEARER: Final = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=\-]+", re.IGNORECASE)


def redact_text(text: str) -> str:
    """Remove passwords and tokens from any text: URLs, DSNs, key=value pairs, auth headers."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
    text = _HEADER_LINE.sub(lambda m: m.group("key") + REDACTED, text)
    text = _KV_SECRET.sub(lambda m: m.group("key") + REDACTED, text)
    return _BEARER.sub(lambda m: m.group(1) + " " + REDACTED, text)


def redact_url(url: str) -> str:
    """A URL or DSN without its password (and without secrets in its query).

    Never raises, whatever the text (a malformed URL is redacted as text).
    """
    return redact_text(url)


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``headers`` with credentials replaced by ``***``."""
    return {
        k: (REDACTED if k.lower() in _SECRET_HEADERS else redact_text(str(v)))
        for k, v in headers.items()
    }
