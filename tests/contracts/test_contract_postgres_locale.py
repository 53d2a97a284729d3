"""Driver contracts, PostgreSQL in another language: what a login refusal carries then.

PostgreSQL speaks its ``lc_messages`` before authentication too (a client's
``options``/``PGOPTIONS`` apply only once logged in), so a server set to
German refuses a login in German.  asyncpg reads the refusal's SQLSTATE off
the wire; psycopg 3 (libpq) keeps only the text: no ``sqlstate``, no
``diag``, no result (psycopg issue 1188).  The library therefore recognises
psycopg's refusals by libpq's English words only; these tests pin why (see
docs/database.md, "Driver contracts").

The server's German comes from a locale compiled here with ``localedef``
into a private folder (``LOCPATH``); without glibc's locale sources the
module is skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from datapunk_recovery.database import DbErrorKind, classify_database
from tests.harness import PostgresServer, ServerUnavailable

pytestmark = [pytest.mark.anyio, pytest.mark.drill]  # starts a server of its own

_LOCALE = "de_DE.UTF-8"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncpg runs on asyncio only


@pytest.fixture(scope="module")
def german_postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL whose ``lc_messages`` is German."""
    localedef = shutil.which("localedef")
    if localedef is None or not Path("/usr/share/i18n/locales/de_DE").exists():
        pytest.skip("no localedef or no de_DE locale source to compile")
    folder = Path(tempfile.mkdtemp(prefix="datapunk-locale-", dir="/tmp"))
    try:
        made = subprocess.run(
            [localedef, "-i", "de_DE", "-f", "UTF-8", str(folder / _LOCALE)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if not (folder / _LOCALE / "LC_MESSAGES").exists():
            pytest.skip(f"localedef could not build {_LOCALE}: {made.stderr[-200:]!r}")
        for path in (folder, *folder.rglob("*")):  # readable by the server's OS user
            path.chmod(0o755 if path.is_dir() else 0o644)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("LOCPATH", str(folder))  # inherited by the server at its start
            try:
                server = PostgresServer(settings={"lc_messages": _LOCALE})
                server.start()
            except ServerUnavailable as exc:
                pytest.skip(f"PostgreSQL unavailable: {exc}")
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wrong_password(server: PostgresServer) -> str:
    return server.dsn_for(server.app_user, "wrong", server.app_database)


def _missing_database(server: PostgresServer) -> str:
    return server.dsn_for(server.app_user, server.app_password, "no_such_database")


async def test_a_german_server_refuses_a_login_in_german_whatever_the_client_asks(
    german_postgres: PostgresServer,
) -> None:
    """``options`` (what ``PGOPTIONS`` sets) is applied after authentication: too late."""
    with pytest.raises(psycopg.OperationalError) as caught:
        await psycopg.AsyncConnection.connect(
            _wrong_password(german_postgres), options="-c lc_messages=C"
        )
    assert "Passwort-Authentifizierung" in str(caught.value)
    assert "password authentication failed" not in str(caught.value)


@pytest.mark.parametrize(
    ("dsn_of", "german"),
    [(_wrong_password, "Passwort-Authentifizierung"), (_missing_database, "existiert nicht")],
    ids=["wrong password", "missing database"],
)
async def test_psycopgs_login_refusals_carry_no_sqlstate_in_any_language(
    german_postgres: PostgresServer, dsn_of: Callable[[PostgresServer], str], german: str
) -> None:
    """Nothing language-independent to read: no SQLSTATE, no diagnostics, no result."""
    with pytest.raises(psycopg.OperationalError) as caught:
        await psycopg.AsyncConnection.connect(dsn_of(german_postgres))
    error = caught.value
    assert type(error) is psycopg.OperationalError
    assert german in str(error)
    assert error.sqlstate is None
    assert error.diag.sqlstate is None
    assert error.diag.message_primary is None
    assert error.pgresult is None


async def test_asyncpg_reads_the_sqlstate_of_a_german_refusal_and_the_classifier_follows_it(
    german_postgres: PostgresServer,
) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as wrong:
        await asyncpg.connect(_wrong_password(german_postgres))
    assert wrong.value.sqlstate == "28P01"
    assert classify_database(wrong.value).kind is DbErrorKind.AUTH
    with pytest.raises(asyncpg.InvalidCatalogNameError) as missing:
        await asyncpg.connect(_missing_database(german_postgres))
    assert missing.value.sqlstate == "3D000"
    verdict = classify_database(missing.value)
    assert (verdict.kind, verdict.retryable) == (DbErrorKind.FATAL, False)
