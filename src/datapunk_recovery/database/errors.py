"""What a database failure means, for asyncpg, psycopg 3 and sqlite3 alike.

A database error is worth another try only in a few well-known cases, and the
cure differs by case; [`classify_database()`][datapunk_recovery.database.errors.classify_database]
names the case once:

- ``conflict``: the server rolled the transaction back because of other
  transactions (``40001`` serialization failure, ``40P01`` deadlock, SQLite's
  ``SQLITE_BUSY`` / ``SQLITE_LOCKED``): replay the *whole* transaction.
- ``connection``: the connection is gone or the server is shutting down or
  starting (class ``08``, ``57P01``-``57P03``, a reset socket): discard the
  connection, reconnect and retry what is safe to repeat.
- ``resource``: the server is out of connections or other resources (class
  ``53``, ``53300`` too_many_connections), or the pool had no free
  connection in time: retry, but back off harder (category ``RESOURCE``).
- ``missing``: a function, type, extension or library the statement needs is
  not there (``42883``, ``42704``, ``0A000``, ``58P01``): never retried,
  reported as [`MissingExtensionError`][datapunk_recovery.database.errors.MissingExtensionError]
  naming what is missing.
- ``auth``: the server refused who we are or what we may do (class ``28``:
  a wrong password, an unknown role, no ``pg_hba.conf`` entry; ``42501``
  insufficient privilege; psycopg's connection-time refusals, which carry no
  SQLSTATE and are recognised by libpq's message): never retried, since each
  retry is another failed login that can lock an account (LDAP, PAM).
- ``fatal``: integrity (class ``23``), data (class ``22``), syntax and other
  program errors, and configuration errors such as a database that does not
  exist (``3D000``; psycopg's connection-time message has no SQLSTATE and is
  recognised by libpq's words): never retried.

Importing [`datapunk_recovery.database`][datapunk_recovery.database] registers
[`database_rule()`][datapunk_recovery.database.errors.database_rule]
with [`datapunk_recovery.register_rule()`][datapunk_recovery._core.errors.register_rule], so the
one classifier of
the library (and therefore per-category retry policies) knows these errors.
Driver modules are never imported here: errors are recognised by their
``sqlstate`` attribute and type names, and sqlite3 is in the standard library.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from datapunk_recovery._core.errors import Classification, ErrorCategory, RecoveryError
from datapunk_recovery._core.redact import redact_text

__all__ = [
    "CommitOutcomeUnknown",
    "ConnectionLost",
    "DatabaseError",
    "DatabaseUnavailable",
    "DbErrorKind",
    "DbVerdict",
    "MissingExtensionError",
    "PoolTimeout",
    "TransactionRolledBack",
    "classify_database",
    "database_rule",
    "explain_missing",
    "sqlstate_of",
]


class DbErrorKind(StrEnum):
    """The cure a database failure calls for (see the module documentation)."""

    CONFLICT = "conflict"
    CONNECTION = "connection"
    RESOURCE = "resource"
    MISSING = "missing"
    AUTH = "auth"
    FATAL = "fatal"
    NOT_DATABASE = "not_database"


@dataclass(frozen=True, slots=True)
class DbVerdict:
    """The verdict on one error: its kind, SQLSTATE (or SQLite code name) and retryability.

    ``definite`` is true when the server answered with an error that rolled
    the statement back, so it certainly did not take effect.  It is false
    for every connection failure: a lost socket or a timeout on the client's
    side, and also the server's own "terminating connection" (``57P01``),
    which can come *after* a COMMIT it was processing went through.
    """

    kind: DbErrorKind
    code: str | None
    retryable: bool
    definite: bool


class DatabaseError(RecoveryError):
    """Base of the database recovery's own errors."""

    category = ErrorCategory.DATABASE


class CommitOutcomeUnknown(DatabaseError):
    """The connection died while COMMIT (or an autocommit statement) was in flight.

    The work may or may not have been committed: replaying it blindly could do
    it twice, so nothing above may retry it.  Pass an idempotency check to
    `transaction()` to have the recovery look,
    on a fresh connection, whether the work is there.
    """

    retryable = False
    do_not_retry_above = True


class TransactionRolledBack(DatabaseError):
    """The transaction did not commit although ``fn`` returned: nothing of it stands.

    PostgreSQL aborts a transaction at its first error; when ``fn`` catches
    that error and carries on, ``COMMIT`` answers ``ROLLBACK`` without
    raising.  SQLite ends the whole transaction on some errors too
    (``SQLITE_FULL``, ``INSERT OR ROLLBACK``), and ``fn`` may have ended it
    itself (``COMMIT`` or ``ROLLBACK`` on ``conn``).  Never replayed, by this
    layer or any above: ``fn`` chose to swallow the error, and running it
    again would swallow it again.  ``code`` is the SQLSTATE of the error that
    aborted the transaction when the recovery saw it go by (asyncpg and
    psycopg statements), else ``None``.
    Recover within a transaction with a savepoint (``async with
    conn.transaction():`` around the statement that may fail).
    """

    retryable = False
    do_not_retry_above = True

    def __init__(self, message: str, *, code: str | None = None, operation: str = "") -> None:
        super().__init__(message, context={"operation": operation, "code": code})
        self.code = code


class DatabaseUnavailable(DatabaseError):
    """The database could not be reached or refused us when a connection was needed.

    The message names the pool and the server's address (host, port and
    database, never the user's password); the driver's error is the cause.
    ``retryable`` follows the cause: a refused or lost connection may be
    cured by waiting, an authentication failure never.
    """

    category = ErrorCategory.NETWORK
    retryable = True


class ConnectionLost(DatabaseError):
    """The connection broke before the work could have taken effect; safe to replay."""

    category = ErrorCategory.NETWORK
    retryable = True


class PoolTimeout(DatabaseError):
    """No pooled connection became free within the acquire timeout."""

    category = ErrorCategory.RESOURCE
    retryable = True


class MissingExtensionError(DatabaseError):
    """A function, type, extension or library the statement needs is not installed.

    ``what`` is what the server could not find (``"function
    gen_random_bytes(integer)"``); ``extension`` the extension known to provide
    it, or ``None`` when unknown; ``code`` the SQLSTATE (or SQLite code name).
    Never retried: installing the extension is a deployment decision.
    """

    retryable = False

    def __init__(self, message: str, *, what: str, extension: str | None, code: str | None):
        super().__init__(message, context={"what": what, "extension": extension, "code": code})
        self.what = what
        self.extension = extension
        self.code = code


# --- SQLSTATE tables ---------------------------------------------------------

_CONFLICT_STATES: Final = frozenset({"40001", "40P01"})
_CONNECTION_STATES: Final = frozenset({"57P01", "57P02", "57P03", "57P05"})
_MISSING_STATES: Final = frozenset({"42883", "42704", "0A000", "58P01"})
#: SQLSTATE class 28 (invalid_authorization_specification, invalid_password)
#: and these states are refusals of who we are or what we may do.
_AUTH_CLASS: Final = "28"
_AUTH_STATES: Final = frozenset({"42501"})
# libpq's words for a refused login: psycopg raises a plain OperationalError
# with no SQLSTATE, diagnostics or result for them, in any language, and the
# server words them in its own lc_messages, even before authentication (pinned
# by tests/contracts/test_contract_postgres.py and test_contract_postgres_locale.py).
# So English only: a refusal in another language reads as a lost connection.
_AUTH_MESSAGE: Final = re.compile(
    r"authentication failed|no pg_hba\.conf entry|pg_hba\.conf rejects|"
    r"no password (?:was )?supplied|role \"[^\"]*\" does not exist|"
    r"permission denied for database|password is required|"
    r"server requested a (?:cleartext )?password|channel binding required",
    re.IGNORECASE,
)
# libpq's words for a database that does not exist (SQLSTATE 3D000, invalid_catalog_name):
# psycopg raises it at connect time as a plain OperationalError with no SQLSTATE.  A
# configuration error, never cured by reconnecting (pinned by the Postgres contract tests).
_MISSING_DATABASE: Final = re.compile(r"database \"[^\"]*\" does not exist")
_MISSING_DATABASE_STATE: Final = "3D000"
_SQLITE_CONFLICT: Final = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
# sqlite3 extended codes keep the primary code in their low byte.
_SQLITE_PRIMARY_MASK: Final = 0xFF
# Errors a driver raises for a socket it lost, by type name (no import needed).
_CLIENT_CONNECTION_TYPES: Final = frozenset(
    {"ConnectionDoesNotExistError", "ConnectionFailureError", "InternalClientError"}
)
_CLOSED_MESSAGE: Final = re.compile(r"connection (?:is|was) closed|underlying connection is closed")

#: Functions and types of common extensions, to name the one that is missing.
KNOWN_EXTENSION_OBJECTS: Final[Mapping[str, str]] = {
    "gen_random_bytes": "pgcrypto",
    "crypt": "pgcrypto",
    "gen_salt": "pgcrypto",
    "digest": "pgcrypto",
    "hmac": "pgcrypto",
    "pgp_sym_encrypt": "pgcrypto",
    "pgp_sym_decrypt": "pgcrypto",
    "uuid_generate_v1": "uuid-ossp",
    "uuid_generate_v4": "uuid-ossp",
    "similarity": "pg_trgm",
    "word_similarity": "pg_trgm",
    "show_trgm": "pg_trgm",
    "levenshtein": "fuzzystrmatch",
    "soundex": "fuzzystrmatch",
    "metaphone": "fuzzystrmatch",
    "unaccent": "unaccent",
    "hstore": "hstore",
    "akeys": "hstore",
    "citext": "citext",
    "ltree": "ltree",
    "nlevel": "ltree",
    "cube": "cube",
    "earth_distance": "earthdistance",
    "ll_to_earth": "earthdistance",
    "pg_stat_statements": "pg_stat_statements",
    "pg_stat_statements_reset": "pg_stat_statements",
    "vector": "vector (pgvector)",
    "cosine_distance": "vector (pgvector)",
    "l2_distance": "vector (pgvector)",
    "geometry": "postgis",
    "geography": "postgis",
    "postgis_version": "postgis",
    "create_hypertable": "timescaledb",
    "time_bucket": "timescaledb",
}
_ST_PREFIX: Final = "st_"  # PostGIS spatial functions: ST_Distance, ST_MakePoint, ...

_NOT_DATABASE: Final = DbVerdict(DbErrorKind.NOT_DATABASE, None, False, False)


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of an asyncpg or psycopg error (or SQLite's code name), else ``None``."""
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", None)
        return name if isinstance(name, str) else None
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) and len(state) == 5 else None


def _is_driver_error(exc: BaseException) -> bool:
    module = type(exc).__module__
    return module.startswith(("asyncpg", "psycopg"))


def classify_database(exc: BaseException) -> DbVerdict:
    """Name the cure ``exc`` calls for; ``not_database`` for errors of no database driver.

    Cancellation and exit are never database errors (and never retryable).
    """
    if not isinstance(exc, Exception):
        return _NOT_DATABASE
    if isinstance(exc, sqlite3.Error):
        return _classify_sqlite(exc)
    if isinstance(exc, DatabaseError):
        return _classify_own(exc)
    state = sqlstate_of(exc)
    if state is not None:
        return _classify_state(exc, state)
    if _is_driver_error(exc):
        # A driver error without SQLSTATE: the client side lost or refused the
        # connection (psycopg's OperationalError, asyncpg's InterfaceError on a
        # closed connection), or the program misused the driver.
        name = type(exc).__name__
        if _AUTH_MESSAGE.search(str(exc)):
            return DbVerdict(DbErrorKind.AUTH, None, False, True)
        if _MISSING_DATABASE.search(str(exc)):
            return DbVerdict(DbErrorKind.FATAL, _MISSING_DATABASE_STATE, False, True)
        if (
            name in _CLIENT_CONNECTION_TYPES
            or name == "OperationalError"
            or _CLOSED_MESSAGE.search(str(exc))
        ):
            return DbVerdict(DbErrorKind.CONNECTION, None, True, False)
        return DbVerdict(DbErrorKind.FATAL, None, False, False)
    if isinstance(exc, TimeoutError | ConnectionError | EOFError):
        return DbVerdict(DbErrorKind.CONNECTION, None, True, False)
    if isinstance(exc, OSError):
        return DbVerdict(DbErrorKind.CONNECTION, None, True, False)
    return _NOT_DATABASE


def _classify_own(exc: DatabaseError) -> DbVerdict:
    if isinstance(exc, PoolTimeout):
        return DbVerdict(DbErrorKind.RESOURCE, None, True, False)
    if isinstance(exc, ConnectionLost):
        return DbVerdict(DbErrorKind.CONNECTION, None, True, False)
    if isinstance(exc, MissingExtensionError):
        return DbVerdict(DbErrorKind.MISSING, exc.code, False, True)
    if isinstance(exc, TransactionRolledBack):
        # The server (or fn) ended the transaction: the connection is sound.
        return DbVerdict(DbErrorKind.FATAL, exc.code, False, True)
    if isinstance(exc, DatabaseUnavailable):
        if exc.category is ErrorCategory.AUTH:
            return DbVerdict(DbErrorKind.AUTH, None, False, True)
        return DbVerdict(DbErrorKind.CONNECTION, None, exc.retryable, False)
    return DbVerdict(DbErrorKind.FATAL, None, False, False)


def _classify_state(exc: BaseException, state: str) -> DbVerdict:
    if state in _CONFLICT_STATES:
        return DbVerdict(DbErrorKind.CONFLICT, state, True, True)
    klass = state[:2]
    if klass == "08" or state in _CONNECTION_STATES:
        return DbVerdict(DbErrorKind.CONNECTION, state, True, False)
    if klass == "53":
        return DbVerdict(DbErrorKind.RESOURCE, state, True, True)
    if klass == _AUTH_CLASS or state in _AUTH_STATES:
        return DbVerdict(DbErrorKind.AUTH, state, False, True)
    if state in _MISSING_STATES:
        return DbVerdict(DbErrorKind.MISSING, state, False, True)
    return DbVerdict(DbErrorKind.FATAL, state, False, True)


def _classify_sqlite(exc: sqlite3.Error) -> DbVerdict:
    code = getattr(exc, "sqlite_errorcode", None)
    name = sqlstate_of(exc)
    if isinstance(code, int) and code & _SQLITE_PRIMARY_MASK in _SQLITE_CONFLICT:
        return DbVerdict(DbErrorKind.CONFLICT, name, True, True)
    if isinstance(exc, sqlite3.OperationalError) and str(exc).startswith(
        ("no such function", "no such module")
    ):
        return DbVerdict(DbErrorKind.MISSING, name, False, True)
    return DbVerdict(DbErrorKind.FATAL, name, False, True)


_CATEGORY: Final[Mapping[DbErrorKind, ErrorCategory]] = {
    DbErrorKind.CONFLICT: ErrorCategory.DATABASE,
    DbErrorKind.CONNECTION: ErrorCategory.NETWORK,
    DbErrorKind.RESOURCE: ErrorCategory.RESOURCE,
    DbErrorKind.MISSING: ErrorCategory.VALIDATION,
    DbErrorKind.AUTH: ErrorCategory.AUTH,
    DbErrorKind.FATAL: ErrorCategory.DATABASE,
}


def database_rule(exc: BaseException) -> Classification | None:
    """A rule for `datapunk_recovery._core.errors.classify()`: database errors by SQLSTATE.

    Returns ``None`` for everything that is not a database driver's error, so
    other rules and the built-in knowledge decide those.  Too-many-connections
    and pool timeouts come out as ``RESOURCE`` so that a per-category policy
    backs off harder on them; authentication and authorization failures
    come out as ``AUTH``, never retryable.
    """
    if isinstance(exc, RecoveryError) or not (
        isinstance(exc, sqlite3.Error) or _is_driver_error(exc)
    ):
        return None
    verdict = classify_database(exc)
    if verdict.kind is DbErrorKind.NOT_DATABASE:
        return None
    return Classification(
        _CATEGORY[verdict.kind], verdict.retryable, None, f"database {verdict.kind.value}"
    )


# --- missing extensions ------------------------------------------------------

_FUNCTION: Final = re.compile(r"function (?P<name>[\w.\"]+)\((?P<args>[^)]*)\) does not exist")
_TYPE: Final = re.compile(r"type \"?(?P<name>[\w.]+)\"? does not exist")
_EXTENSION: Final = re.compile(
    r"extension \"(?P<name>[^\"]+)\" (?:is not available|does not exist)"
)
_FILE: Final = re.compile(r"could not (?:access|open extension control) file \"(?P<name>[^\"]+)\"")
_SQLITE_FUNCTION: Final = re.compile(r"no such (?P<kind>function|module): (?P<name>\S+)")


def _message_of(exc: BaseException) -> str:
    # psycopg keeps the server's primary message in diag; asyncpg in .message.
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    if isinstance(primary, str):
        return primary
    message = getattr(exc, "message", None)
    return message if isinstance(message, str) else str(exc).split("\n", 1)[0]


def _extension_for(name: str) -> str | None:
    base = name.rsplit(".", 1)[-1].strip('"').lower()
    known = KNOWN_EXTENSION_OBJECTS.get(base)
    if known is None and base.startswith(_ST_PREFIX):
        return "postgis"
    return known


def explain_missing(exc: BaseException) -> MissingExtensionError:
    """Turn a "does not exist" error into a `MissingExtensionError` that says what.

    The message names the missing function, type, extension or file, the
    extension known to provide it (from `KNOWN_EXTENSION_OBJECTS`) and
    the SQLSTATE; it is redacted like every message the library writes.
    """
    code = sqlstate_of(exc)
    message = _message_of(exc)
    what, extension = message, None
    if (m := _FUNCTION.search(message)) is not None:
        what = f"function {m.group('name')}({m.group('args')})"
        extension = _extension_for(m.group("name"))
    elif (m := _TYPE.search(message)) is not None:
        what = f"type {m.group('name')}"
        extension = _extension_for(m.group("name"))
    elif (m := _EXTENSION.search(message)) is not None:
        what = extension = m.group("name")
        what = f"extension {what}"
    elif (m := _FILE.search(str(exc))) is not None:
        what = f"file {m.group('name')}"
    elif (m := _SQLITE_FUNCTION.search(message)) is not None:
        what = f"{m.group('kind')} {m.group('name')}"
    if extension is not None and what.startswith("extension "):
        advice = (
            f"the extension {extension!r} is not installed on the database server; "
            "install its package there, then run CREATE EXTENSION"
        )
    elif extension is not None:
        advice = (
            f"it is provided by the extension {extension!r}, which is not installed "
            f"in this database (CREATE EXTENSION {extension.split(' ', 1)[0]})"
        )
    else:
        advice = (
            "a missing extension, or a wrong name or argument types; "
            "not retried, since trying again cannot create it"
        )
    text = redact_text(f"{what} does not exist (code {code}): {advice}")
    return MissingExtensionError(text, what=redact_text(what), extension=extension, code=code)


def describe(exc: BaseException) -> str:
    """A short, redacted one-line description of ``exc`` for messages: type and SQLSTATE."""
    code = sqlstate_of(exc)
    suffix = (
        f" (SQLSTATE {code})" if code is not None and not isinstance(exc, sqlite3.Error) else ""
    )
    return f"{type(exc).__name__}{suffix}"
