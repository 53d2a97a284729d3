"""Throwaway real Redis and PostgreSQL servers for tests.

Each server runs as a child process in its own process group (session), on a
free loopback port, with all of its files under a private temporary folder.
``stop()`` / ``kill()`` / ``restart()`` keep the port (and, for PostgreSQL, the
data), so fault drills can take a server away and bring it back mid-test.
Everything still running is stopped at interpreter exit (``atexit``); on Linux
the servers also get a parent-death signal (``setpriv --pdeathsig``) so a
hard-killed test run leaves nothing behind.

Readiness is always detected by bounded polling (every 50 ms, 30 s at most),
never by a fixed sleep.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = [
    "APP_PASSWORD",
    "APP_USER",
    "PostgresServer",
    "RedisServer",
    "ServerError",
    "ServerUnavailable",
    "find_free_port",
    "find_postgres_bin_dir",
]

HOST = "127.0.0.1"
POLL_INTERVAL = 0.05
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

#: Password-authenticated (scram-sha-256) PostgreSQL role created by the harness.
APP_USER = "app"
APP_PASSWORD = "app-secret-password"


class ServerUnavailable(RuntimeError):
    """The server software is not installed (binary not found)."""


class ServerError(RuntimeError):
    """The server could not be started / did not become ready."""


def find_free_port(host: str = HOST) -> int:
    """Return a currently free TCP port on ``host`` (bind to port 0 and release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _is_root() -> bool:
    return os.geteuid() == 0


def _pdeathsig_prefix(signame: str) -> list[str]:
    """``setpriv --pdeathsig SIG`` prefix if available (Linux util-linux), else nothing."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    if _PDEATHSIG_SUPPORTED.get(setpriv) is None:
        try:
            out = subprocess.run(
                [setpriv, "--help"], capture_output=True, text=True, timeout=5, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        _PDEATHSIG_SUPPORTED[setpriv] = "--pdeathsig" in out
    if not _PDEATHSIG_SUPPORTED[setpriv]:
        return []
    return [setpriv, "--pdeathsig", signame, "--"]


_PDEATHSIG_SUPPORTED: dict[str, bool] = {}


def _poll_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    alive: Callable[[], bool] | None = None,
    log: Callable[[], str] | None = None,
) -> None:
    """Call ``check`` every POLL_INTERVAL until it returns True, at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if alive is not None and not alive():
            raise ServerError(f"{what}: process exited during startup\n{log() if log else ''}")
        if time.monotonic() >= deadline:
            raise ServerError(f"{what}: not ready after {timeout:.0f}s\n{log() if log else ''}")
        time.sleep(POLL_INTERVAL)


def _tcp_connectable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Common process management
# ---------------------------------------------------------------------------

_LIVE: set[_ManagedServer] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.close()


atexit.register(_stop_all_at_exit)


class _ManagedServer:
    """Process handling shared by the servers (one child = one process group)."""

    name = "server"
    #: signal for a graceful stop
    stop_signal = signal.SIGTERM
    #: signal delivered if the test process dies (``setpriv --pdeathsig``)
    death_signal = "TERM"

    def __init__(self, port: int | None, base_dir: str | os.PathLike[str] | None) -> None:
        self.host = HOST
        self.port = port if port is not None else find_free_port()
        self._owns_dir = base_dir is None
        if base_dir is None:
            base_dir = tempfile.mkdtemp(prefix=f"datapunk-{self.name}-", dir=self._tmp_parent())
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.base_dir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._paused = False
        self._closed = False

    # -- helpers -----------------------------------------------------------
    @staticmethod
    def _tmp_parent() -> str | None:
        return None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        """True while the server process is alive (even if paused)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def is_paused(self) -> bool:
        return self._paused and self.is_running

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _spawn(
        self, argv: Sequence[str], *, as_user: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        if self._log_file is None or self._log_file.closed:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child
        cmd = [*_pdeathsig_prefix(self.death_signal), *argv]
        kwargs: dict[str, object] = {}
        if as_user is not None:
            pw = pwd.getpwnam(as_user)
            kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=str(self.base_dir),
            env=env,
            start_new_session=True,  # own process group: killpg on stop
            close_fds=True,
            **kwargs,
        )

    def _signal_group(self, sig: int) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def _reap(self) -> None:
        """Kill whatever is left of the process group and forget the process."""
        if self._proc is None:
            return
        if self._paused:
            self._signal_group(signal.SIGCONT)
            self._paused = False
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=STOP_TIMEOUT)
        self._proc = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    # -- lifecycle -----------------------------------------------------------
    def _start_process(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def start(self) -> None:
        """Start the server (no-op if it is already running) and wait until ready."""
        if self._closed:
            raise ServerError(f"{self.name}: already closed")
        if self.is_running:
            return
        self._reap()
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._start_process()
        except BaseException:
            self._reap()
            raise

    def stop(self) -> None:
        """Graceful stop (escalates to SIGKILL after a bound); port/data are kept."""
        if self._proc is None:
            return
        if self._paused:
            self._signal_group(signal.SIGCONT)
            self._paused = False
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=STOP_TIMEOUT)
        self._reap()

    def kill(self) -> None:
        """Crash the server: SIGKILL the whole process group (no clean shutdown)."""
        self._reap()

    def restart(self) -> None:
        """Stop (gracefully) and start again on the same port."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open but nothing is answered."""
        if self.is_running and not self._paused:
            self._signal_group(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._signal_group(signal.SIGCONT)
            self._paused = False

    def ensure_running(self) -> None:
        """Undo whatever a drill left behind: resume if paused, start if down."""
        self.resume()
        if not self.is_running:
            self.start()

    def close(self) -> None:
        """Stop for good and remove the temporary folder (if the harness created it)."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        if self._log_file is not None:
            self._log_file.close()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "paused" if self.is_paused else ("running" if self.is_running else "stopped")
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"


# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------


def _redis_command(host: str, port: int, *args: str, timeout: float = 2.0) -> bytes:
    """Send one RESP command over a fresh socket and return the first reply line."""
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        raw = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(raw), raw)
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(payload)
        buf = b""
        while b"\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    return buf.split(b"\r\n", 1)[0]


class RedisServer(_ManagedServer):
    """A private ``redis-server`` (no persistence) on a free loopback port.

    ``url`` is ``redis://127.0.0.1:PORT/0``. ``restart()`` loses the data (like a
    crashed cache) unless ``restart(keep_data=True)``, which issues SAVE first.
    """

    name = "redis"
    stop_signal = signal.SIGTERM
    death_signal = "TERM"

    def __init__(
        self,
        port: int | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        redis_server_bin: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        binary = redis_server_bin or shutil.which("redis-server")
        if binary is None:
            for candidate in ("/usr/bin/redis-server", "/usr/local/bin/redis-server"):
                if os.access(candidate, os.X_OK):
                    binary = candidate
                    break
        if binary is None:
            raise ServerUnavailable("redis-server not found (apt-get install redis-server)")
        self.binary = binary
        self.extra_args = list(extra_args)
        super().__init__(port, base_dir)

    @property
    def url(self) -> str:
        return self.url_for(0)

    def url_for(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def ping(self) -> bool:
        try:
            return _redis_command(self.host, self.port, "PING", timeout=0.5) == b"+PONG"
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Run one command on a fresh connection; return the first reply line."""
        return _redis_command(self.host, self.port, *args)

    def flushall(self) -> None:
        reply = self.command("FLUSHALL")
        if reply != b"+OK":
            raise ServerError(f"FLUSHALL failed: {reply!r}")

    def _start_process(self) -> None:
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.base_dir),
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--loglevel",
            "warning",
            *self.extra_args,
        ]
        self._proc = self._spawn(argv)
        _poll_until(
            self.ping,
            START_TIMEOUT,
            f"redis-server on port {self.port}",
            alive=lambda: self.is_running,
            log=self.log_tail,
        )

    def restart(self, keep_data: bool = False) -> None:
        if keep_data and self.is_running and not self.is_paused:
            reply = self.command("SAVE")
            if reply != b"+OK":
                raise ServerError(f"SAVE failed: {reply!r}")
        elif not keep_data:
            with contextlib.suppress(FileNotFoundError):
                (self.base_dir / "dump.rdb").unlink()
        self.stop()
        self.start()


# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------


def _version_key(path: str) -> tuple[int, ...]:
    match = re.search(r"/postgresql/([\d.]+)/bin", path)
    if not match:
        return (0,)
    return tuple(int(p) for p in match.group(1).split(".") if p)


def find_postgres_bin_dir(preferred_major: int = 15) -> Path:
    """Directory with ``initdb``/``postgres``/``psql``.

    ``$DATAPUNK_PG_BIN`` wins; then /usr/lib/postgresql/<preferred>/bin, then the
    newest /usr/lib/postgresql/*/bin, then ``initdb`` on PATH.
    """
    env = os.environ.get("DATAPUNK_PG_BIN")
    if env:
        if (Path(env) / "initdb").exists():
            return Path(env)
        raise ServerUnavailable(f"DATAPUNK_PG_BIN={env} has no initdb")
    preferred = Path(f"/usr/lib/postgresql/{preferred_major}/bin")
    if (preferred / "initdb").exists():
        return preferred
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    if candidates:
        return Path(candidates[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise ServerUnavailable(
        "PostgreSQL initdb not found in /usr/lib/postgresql/*/bin or PATH "
        "(apt-get install postgresql)"
    )


class PostgresServer(_ManagedServer):
    """A private PostgreSQL cluster (initdb'd on first start) on a free loopback port.

    * superuser ``postgres``, trust auth: ``dsn`` =
      ``postgresql://postgres@127.0.0.1:PORT/postgres``
    * role ``app`` (password ``APP_PASSWORD``, scram-sha-256 over TCP) owning
      database ``app``: ``app_dsn`` =
      ``postgresql://app:PASSWORD@127.0.0.1:PORT/app``

    When the test process is root, initdb and postgres run as the ``postgres``
    OS user (PostgreSQL refuses to run as root) and the folder is chowned to it.
    Tuned for tests: fsync/synchronous_commit/full_page_writes off,
    deadlock_timeout=100ms.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: roll back and disconnect clients
    death_signal = "INT"

    superuser = "postgres"
    database = "postgres"
    app_user = APP_USER
    app_password = APP_PASSWORD
    app_database = "app"

    def __init__(
        self,
        port: int | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        bin_dir: str | os.PathLike[str] | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.bin_dir = Path(bin_dir) if bin_dir is not None else find_postgres_bin_dir()
        for tool in ("initdb", "postgres", "psql"):
            if not (self.bin_dir / tool).exists():
                raise ServerUnavailable(f"{self.bin_dir / tool} not found")
        self.os_user: str | None = None
        if _is_root():
            try:
                pwd.getpwnam("postgres")
            except KeyError as exc:
                raise ServerUnavailable(
                    "running as root but there is no 'postgres' OS user to run PostgreSQL"
                ) from exc
            self.os_user = "postgres"
        self.settings: dict[str, str] = {
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "deadlock_timeout": "100ms",
            "max_connections": "200",
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        if settings:
            self.settings.update(settings)
        super().__init__(port, base_dir)
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "socket"
        self.socket_dir.mkdir(exist_ok=True)
        if self.os_user is not None:
            pw = pwd.getpwnam(self.os_user)
            self.log_path.touch(exist_ok=True)
            for path in (self.base_dir, self.socket_dir, self.log_path):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        self._initialized = False

    @staticmethod
    def _tmp_parent() -> str | None:
        # When root, TMPDIR may be a folder the postgres user cannot traverse.
        if _is_root():
            return "/tmp"
        return None

    # -- DSNs ----------------------------------------------------------------
    @property
    def dsn(self) -> str:
        return self.dsn_for(self.superuser, None, self.database)

    @property
    def app_dsn(self) -> str:
        return self.dsn_for(self.app_user, self.app_password, self.app_database)

    def dsn_for(
        self,
        user: str,
        password: str | None = None,
        database: str | None = None,
        *,
        port: int | None = None,
        host: str | None = None,
    ) -> str:
        """DSN for any role/database; ``port``/``host`` override, e.g. to go through a proxy."""
        auth = user if password is None else f"{user}:{password}"
        return (
            f"postgresql://{auth}@{host or self.host}:{port or self.port}/"
            f"{database or self.database}"
        )

    # -- admin helpers ---------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        return env

    def psql(self, sql: str, database: str | None = None) -> str:
        """Run SQL as the superuser over the unix socket; return unaligned output."""
        result = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                self.superuser,
                "-d",
                database or self.database,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=self._env(),
            check=False,
        )
        if result.returncode != 0:
            raise ServerError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout.strip()

    def create_database(self, name: str, owner: str | None = None) -> str:
        """Create a fresh database (dropping any previous one); return its superuser DSN."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"bad database name {name!r}")
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        owner_sql = f" OWNER {owner}" if owner else ""
        self.psql(f"CREATE DATABASE {name}{owner_sql}")
        return self.dsn_for(self.superuser, None, name)

    # -- lifecycle -------------------------------------------------------------
    def _initdb(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            self._initialized = True
            return
        argv = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            self.superuser,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]
        proc = self._spawn(argv, as_user=self.os_user, env=self._env())
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise ServerError(f"initdb timed out\n{self.log_tail()}") from None
        if rc != 0:
            raise ServerError(f"initdb failed with exit code {rc}\n{self.log_tail()}")
        hba = (
            "# written by the datapunk test harness\n"
            "local   all  all                      trust\n"
            f"host    all  {self.app_user}  127.0.0.1/32  scram-sha-256\n"
            f"host    all  {self.app_user}  ::1/128       scram-sha-256\n"
            "host    all  all  127.0.0.1/32  trust\n"
            "host    all  all  ::1/128       trust\n"
        )
        (self.data_dir / "pg_hba.conf").write_text(hba)

    def _ready(self) -> bool:
        """postmaster.pid of *our* process says "ready" and TCP connects."""
        if self._proc is None:
            return False
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        if len(lines) < 8 or lines[0].strip() != str(self._proc.pid):
            return False
        if lines[7].strip() != "ready":
            return False
        return _tcp_connectable(self.host, self.port)

    def _start_process(self) -> None:
        self._initdb()
        argv = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-k",
            str(self.socket_dir),
            "-c",
            f"listen_addresses={self.host}",
        ]
        for key, value in self.settings.items():
            argv += ["-c", f"{key}={value}"]
        self._proc = self._spawn(argv, as_user=self.os_user, env=self._env())
        _poll_until(
            self._ready,
            START_TIMEOUT,
            f"postgres on port {self.port}",
            alive=lambda: self.is_running,
            log=self.log_tail,
        )
        if not self._initialized:
            # Stored as a SCRAM verifier whatever the server's default (md5
            # before PostgreSQL 14), so the scram-sha-256 hba lines accept it.
            self.psql(
                "SET password_encryption = 'scram-sha-256'; "
                f"CREATE ROLE {self.app_user} LOGIN PASSWORD '{self.app_password}'"
            )
            self.psql(f"CREATE DATABASE {self.app_database} OWNER {self.app_user}")
            self._initialized = True
