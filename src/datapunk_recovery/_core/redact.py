"""Redaction of secrets: what may leave the library in a log, label, event or message.

Connection strings and URLs lose their passwords (and a user name that stands
alone, as a token often does: ``https://<token>@host``), ``key=value`` pairs
lose the value of any key that names a secret (``password``, ``token``,
``access_token``, ``sig``, ``X-Amz-Signature``, ``api_key``, ``secret``...),
credential headers written as text lose their value to the end of the line,
and header maps lose ``Authorization``, cookies and tokens.  Every module that
reports something that came from a user (a DSN, a URL, headers) passes it
through here first.

**Any length, linear time.**  No secret is cut at some length: a password of
10,000 characters goes as whole as one of 10.  And no text, however hostile,
makes redaction slow: URLs are scanned by hand, each character a bounded
number of times; key=value pairs are found by one regular-expression search
that moves forward only (a name is tried once, from where no name character
precedes it, and the text after a separator is searched again from there);
and no regular expression has a repeat inside a repeat, except a quoted
string's body ``(?:[^'\\]|\\.)*``, whose two branches can never match at
the same character, so it cannot backtrack into itself.  Every match or
failure costs time linear in what it reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

__all__ = [
    "REDACTED",
    "is_secret_name",
    "redact_headers",
    "redact_text",
    "redact_url",
    "safe_repr",
]

REDACTED: Final = "***"

# Header names whose value is a credential, whatever it looks like.
_SECRET_HEADERS: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "x-auth-token",
        "x-amz-security-token",
        "x-csrf-token",
        "x-xsrf-token",
    }
)
# A name is a secret's when its last word (split at "-", "_", ".", and at
# lower-to-upper case changes: apiKey, X-Amz-Signature) is one of these
# (access_token, api_key, X-Auth-Token, sig; not token_ratio or key_ttl) ...
_SECRET_WORDS: Final = frozenset(
    {
        "apikey",
        "auth",
        "authorization",
        "bearer",
        "cookie",
        "credential",
        "credentials",
        "jwt",
        "key",
        "pass",
        "passphrase",
        "passwd",
        "password",
        "pwd",
        "secret",
        "session",
        "sessionid",
        "sig",
        "signature",
        "token",
    }
)
# ... or when it holds one of these anywhere (PGPASSWORD, clientsecret, X-Amz-Credential),
_SECRET_PARTS: Final = ("password", "passwd", "secret", "apikey", "signature", "credential")
# ... or ends with one of these (accesstoken, JSESSIONID, session_id).
_SECRET_ENDINGS: Final = ("token", "sessionid", "session_id", "sessid")
_WORD_SPLIT: Final = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


def is_secret_name(name: str) -> bool:
    """Whether a key, parameter or header ``name`` names a secret (its value must be hidden)."""
    lower = name.lower()
    if lower in _SECRET_HEADERS or lower.endswith(_SECRET_ENDINGS):
        return True
    if any(part in lower for part in _SECRET_PARTS):
        return True
    words = [word for word in _WORD_SPLIT.split(name) if word]
    return bool(words) and words[-1].lower() in _SECRET_WORDS


# A name then a separator: ``password=``, ``"api_key": ``, ``X-Auth-Token: ``.
# The name starts where no name character precedes it, so a long run of name
# characters is tried once (not from each of its characters).
_NAME_THEN_SEPARATOR: Final = re.compile(r"(?<![\w.\-])([\w.\-]+)([\"']?[ \t]*([=:])[ \t]*)")
# The value after a secret's name: a quoted string (backslash escapes kept
# inside, as libpq writes them), or everything up to white space or "&".
_QUOTED: Final = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", re.DOTALL)
_PLAIN: Final = re.compile(r"[^\s&]+")
# A credential header's value that is not a quoted string runs to the end of the
# line, quotes included (a quote inside a token must not end what is hidden).
_LINE: Final = re.compile(r"[^\r\n]*")
# "Bearer <token>" and friends, wherever they appear.
_SCHEME_TOKEN: Final = re.compile(
    r"\b(Bearer|Basic|Token|Digest|Negotiate)[ \t]+[A-Za-z0-9._~+/=\-]+", re.IGNORECASE
)
_SPACE: Final = re.compile(r"\s")


def _redact_userinfo(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host``; ``://token@`` -> ``://***@``.

    The password runs to the last ``@`` of the word (the text up to white
    space), so one holding ``/``, ``@``, ``?`` or ``#`` (unencoded, as people do
    write them) goes whole; at worst a URL with an ``@`` later on (an e-mail
    address in its query) loses more than its password, never less.  Each
    character is looked at a bounded number of times: a word whose password
    was hidden is read on from its last ``@``, one without any ``@`` is done.
    """
    if "://" not in text:
        return text
    out: list[str] = []
    done = 0  # text[:done] is in out
    word_end = -1  # the end of the whitespace-delimited word being scanned
    i = text.find("://")
    while i != -1:
        start = i + 3
        if start > word_end:
            space = _SPACE.search(text, start)
            word_end = len(text) if space is None else space.start()
        colon = at = -1
        j = start
        # The user name: up to the first ":", "@" or "/?#".
        while j < word_end:
            c = text[j]
            if c == ":":
                colon = j
                break
            if c == "@":
                at = j
                break
            if c in "/?#":
                break
            j += 1
        resume = j
        if colon != -1:  # user:password: find the "@" that ends the password
            last_at = text.rfind("@", colon + 1, word_end)
            if last_at == -1:  # no "@" to the end of the word: no credentials in it
                resume = word_end
            else:
                out.append(text[done : colon + 1])
                out.append(REDACTED)
                done = resume = last_at
        elif at != -1 and at > start:  # a lone user name: often a token
            out.append(text[done:start])
            out.append(REDACTED)
            done = resume = at
        i = text.find("://", max(resume, start))
    out.append(text[done:])
    return "".join(out)


def _redact_pairs(text: str) -> str:
    """The value after every secret's name (``password=...``, ``Authorization: ...``) hidden."""
    out: list[str] = []
    done = 0
    pos = 0
    while True:
        m = _NAME_THEN_SEPARATOR.search(text, pos)
        if m is None:
            break
        name, separator_end = m.group(1), m.end()
        if not is_secret_name(name):
            pos = m.end(1)  # the value may itself hold a name: read on from the separator
            continue
        quoted = _QUOTED.match(text, separator_end)
        if quoted is not None:
            end = quoted.end()
        elif m.group(3) == ":" or name.lower() in _SECRET_HEADERS:
            line = _LINE.match(text, separator_end)
            end = separator_end if line is None else line.end()
        else:
            plain = _PLAIN.match(text, separator_end)
            end = separator_end if plain is None else plain.end()
        if end == separator_end:  # nothing after the separator: nothing to hide
            pos = separator_end
            continue
        out.append(text[done:separator_end])
        out.append(REDACTED)
        done = pos = end
    out.append(text[done:])
    return "".join(out)


def redact_text(text: str) -> str:
    """Remove passwords and tokens from any text: URLs, DSNs, key=value pairs, auth headers.

    Works for secrets of any length, in time linear in ``len(text)``.
    """
    text = _redact_userinfo(text)
    text = _redact_pairs(text)
    return _SCHEME_TOKEN.sub(lambda m: m.group(1) + " " + REDACTED, text)


def redact_url(url: str) -> str:
    """A URL or DSN without its password (and without secrets in its query).

    Never raises, whatever the text (a malformed URL is redacted as text).
    """
    return redact_text(url)


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``headers`` with credentials replaced by ``***``.

    A header is a credential when its name is (``Authorization``, ``Cookie``,
    ``X-Api-Key``...) or names a secret (``X-Vault-Token``, ``X-Signature``);
    every other value is redacted as text.
    """
    return {
        k: (REDACTED if is_secret_name(str(k)) else redact_text(str(v))) for k, v in headers.items()
    }


# A quoted text that looks like a token (an API key, a bearer token): one word of 16 or more
# token characters, with letters and digits; a URL is redacted by redact_text instead.
_TOKEN_LIKE: Final = re.compile(r"""(['"])([A-Za-z0-9_.+/=~-]{16,})\1""")


def _mask_token(match: re.Match[str]) -> str:
    body = match.group(2)
    if any(c.isdigit() for c in body) and any(c.isalpha() for c in body):
        quote = match.group(1)
        return f"{quote}{REDACTED}{quote}"
    return match.group(0)


def safe_repr(value: object, limit: int = 40) -> str:
    """``repr(value)`` redacted, then cut to ``limit`` characters: a garbage value in an event.

    Passwords in URLs and ``key=value`` pairs are redacted (`redact_text`), and so is
    a quoted text that looks like a bare token: a garbage value is often a token given
    in the wrong place.  Redacted before it is cut, so that no part of a secret is shown either.
    """
    text = _TOKEN_LIKE.sub(_mask_token, redact_text(repr(value)))
    return text if len(text) <= limit else text[: limit - 3] + "..."
