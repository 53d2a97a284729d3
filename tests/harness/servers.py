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
from typing import IO, Any, Self

__all__ = [
    "APP_PASSWORD",
    "APP_USER",
    "PostgresServer",
    "RedisClusterServers",
    "RedisSentinelServers",
    "RedisServer",
    "ServerError",
    "SlotMigration",
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
            "--repl-diskless-sync-delay",  # a replica (re)syncs at once, not after 5 s
            "0",
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


# ---------------------------------------------------------------------------
# Redis Cluster and Redis Sentinel (groups of redis-server processes)
# ---------------------------------------------------------------------------


def _find_redis_cli() -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        for candidate in ("/usr/bin/redis-cli", "/usr/local/bin/redis-cli"):
            if os.access(candidate, os.X_OK):
                return candidate
        raise ServerUnavailable("redis-cli not found (apt-get install redis-tools)")
    return binary


def _info_field(host: str, port: int, section: str, name: str) -> str | None:
    """One ``field:value`` of ``INFO section`` (or ``CLUSTER INFO``), ``None`` if unreachable."""
    import redis as redis_sync

    try:
        with redis_sync.Redis(host=host, port=port, socket_timeout=1.0) as admin:
            raw = (
                admin.execute_command("CLUSTER", "INFO")
                if section == "cluster-info"
                else admin.execute_command("INFO", section)
            )
    except (OSError, redis_sync.RedisError):
        return None
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if isinstance(raw, dict):  # parsed INFO
        value = raw.get(name)
        return None if value is None else str(value)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _ServerGroup(_ManagedServer):
    """Several redis-server processes handled as one managed server.

    ``port`` is the first node's; ``start()`` starts (or restarts) every
    member and waits until the group is healthy again, so the session's
    ``_servers_back_up`` fixture repairs whatever a drill killed.
    """

    def __init__(self, base_dir: str | os.PathLike[str] | None) -> None:
        self.nodes: list[RedisServer] = []
        #: set by every helper that changes the topology (and by ``touch()``):
        #: ``ensure_running`` then waits until the group is healthy again;
        #: otherwise it only checks the processes (it runs after every test).
        self.touched = False
        super().__init__(0, base_dir)

    def touch(self) -> None:
        """Say that a test changed the topology by hand (a manual failover...)."""
        self.touched = True

    @property
    def is_running(self) -> bool:
        return bool(self.nodes) and all(n.is_running and not n.is_paused for n in self.nodes)

    def _healthy(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def start(self) -> None:
        if self._closed:
            raise ServerError(f"{self.name}: already closed")
        with _LIVE_LOCK:
            _LIVE.add(self)
        if not self.nodes:
            self._start_process()
            return
        for node in self.nodes:
            node.ensure_running()
        _poll_until(self._healthy, START_TIMEOUT, f"{self.name} healthy again", log=self.log_tail)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def ensure_running(self) -> None:
        if self._closed or (self.is_running and not self.touched):
            return
        if not self.is_running or not self._healthy():
            self.start()
        self.touched = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for node in self.nodes:
            node.kill()  # no graceful stop: a master would wait for its replicas (seconds)
            node.close()
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(f"--- {n.port}\n{n.log_tail(lines // 4)}" for n in self.nodes)

    def node_at(self, host: str, port: int) -> RedisServer:
        for node in self.nodes:
            if (node.host, node.port) == (host, int(port)):
                return node
        raise KeyError(f"no node at {host}:{port}")


class RedisClusterServers(_ServerGroup):
    """A real Redis Cluster on loopback: ``masters`` masters, each with ``replicas`` replicas.

    Built with ``redis-cli --cluster create`` and ready once every node says
    ``cluster_state:ok``.  ``node_timeout`` (milliseconds) is short, so a
    killed master is replaced by its replica in about two seconds.
    ``startup_nodes`` / ``url`` are what a ``RedisCluster`` client needs.
    Helpers: :meth:`master_for_key`, :meth:`kill_master_of`,
    :meth:`begin_migration` (a live slot migration, step by step, for ASK).
    """

    name = "redis-cluster"

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        *,
        node_timeout: int = 1000,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.masters = masters
        self.replicas = replicas
        self.node_timeout = node_timeout
        self.cli = _find_redis_cli()
        super().__init__(base_dir)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.nodes[0].port}/0"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [n.address for n in self.nodes]

    def _start_process(self) -> None:
        for _ in range(self.masters * (1 + self.replicas)):
            port = find_free_port()
            node = RedisServer(
                port,
                self.base_dir / f"node-{port}",
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",  # the bus port, free too (not port + 10000)
                    str(find_free_port()),
                    "--cluster-node-timeout",
                    str(self.node_timeout),
                    "--cluster-replica-validity-factor",
                    "0",  # a replica may always take over (tests kill masters at will)
                ],
            )
            self.nodes.append(node)
            node.start()
        self.port = self.nodes[0].port
        create = subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"{n.host}:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        if create.returncode != 0:
            raise ServerError(f"redis-cli --cluster create failed:\n{create.stdout}{create.stderr}")
        _poll_until(self._healthy, START_TIMEOUT, "redis cluster state ok", log=self.log_tail)

    # -- topology ----------------------------------------------------------------
    def _admin(self, node: RedisServer) -> Any:
        import redis as redis_sync

        return redis_sync.Redis(host=node.host, port=node.port, socket_timeout=2.0)

    def view(self, node: RedisServer) -> list[dict[str, Any]]:
        """``CLUSTER NODES`` as seen by ``node``: id, address, flags, master id, slots."""
        with self._admin(node) as admin:
            raw = admin.execute_command("CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else raw
        if isinstance(text, dict):  # redis-py may parse it already
            text = "\n".join(
                f"{v['node_id']} {k} {v['flags']} {v['master_id']} 0 0 0 "
                f"{'connected' if v['connected'] else 'disconnected'} "
                + " ".join("-".join(s) for s in v.get("slots", []))
                for k, v in text.items()
            )
        nodes = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 8:
                continue
            host_port = parts[1].split("@")[0]
            host, _, port = host_port.rpartition(":")
            slots: list[tuple[int, int]] = []
            for spec in parts[8:]:
                if spec.startswith("["):
                    continue  # a slot being migrated/imported
                lo, _, hi = spec.partition("-")
                slots.append((int(lo), int(hi or lo)))
            nodes.append(
                {
                    "id": parts[0],
                    "host": host,
                    "port": int(port),
                    "flags": set(parts[2].split(",")),
                    "master_id": parts[3],
                    "slots": slots,
                }
            )
        return nodes

    def _healthy(self) -> bool:
        for node in self.nodes:
            if (
                not node.ping()
                or _info_field(node.host, node.port, "cluster-info", "cluster_state") != "ok"
            ):
                return False
        # every node agrees: `masters` masters owning every slot, each with its replicas
        try:
            view = self.view(self.nodes[0])
        except Exception:
            return False
        masters = [n for n in view if "master" in n["flags"] and n["slots"]]
        if len(masters) != self.masters or any(
            "fail" in n["flags"] or "fail?" in n["flags"] for n in view
        ):
            return False
        replicas = [n for n in view if "slave" in n["flags"]]
        if len(replicas) != self.masters * self.replicas:
            return False
        if len({self._slot_owners(node) for node in self.nodes}) != 1:
            return False  # the nodes do not agree yet on who serves what
        return all(
            _info_field(n["host"], n["port"], "replication", "master_link_status") == "up"
            for n in replicas
        )

    def _slot_owners(self, node: RedisServer) -> frozenset[tuple[int, int, str, int]]:
        try:
            with self._admin(node) as admin:
                slots = admin.execute_command("CLUSTER", "SLOTS")
        except Exception:
            return frozenset()
        return frozenset(
            (lo, hi, _text(owners[0][0]), int(owners[0][1])) for lo, hi, *owners in slots
        )

    def key_slot(self, key: str) -> int:
        from redis.crc import key_slot

        return int(key_slot(key.encode()))

    def master_of_slot(self, slot: int) -> RedisServer:
        """The node that serves ``slot`` now (asked of a live node)."""
        for node in self.nodes:
            if not node.is_running:
                continue
            with self._admin(node) as admin:
                for lo, hi, *owners in admin.execute_command("CLUSTER", "SLOTS"):
                    if lo <= slot <= hi:
                        host, port = owners[0][0], owners[0][1]
                        host = host.decode() if isinstance(host, bytes) else host
                        return self.node_at(host, int(port))
        raise ServerError("no live node to ask")

    def master_for_key(self, key: str) -> RedisServer:
        return self.master_of_slot(self.key_slot(key))

    def replica_of(self, master: RedisServer) -> RedisServer:
        """A replica of ``master``, as ``master`` sees the cluster (for a manual failover)."""
        master_id = self.node_id(master)
        return next(
            self.node_at(n["host"], n["port"])
            for n in self.view(master)
            if n["master_id"] == master_id
        )

    def node_id(self, node: RedisServer) -> str:
        with self._admin(node) as admin:
            raw = admin.execute_command("CLUSTER", "MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def kill_master_of(self, key: str) -> RedisServer:
        """SIGKILL the master serving ``key``; its replica takes over after ``node_timeout``."""
        self.touched = True
        master = self.master_for_key(key)
        master.kill()
        return master

    def wait_for_new_master(self, key: str, old: RedisServer, timeout: float = 15.0) -> RedisServer:
        """Poll until a node other than ``old`` serves ``key`` and the cluster says ok."""
        found: list[RedisServer] = []

        def promoted() -> bool:
            try:
                master = self.master_for_key(key)
            except Exception:
                return False
            if master is old or not master.is_running:
                return False
            state = _info_field(master.host, master.port, "cluster-info", "cluster_state")
            found[:] = [master]
            return state == "ok"

        _poll_until(promoted, timeout, f"failover of slot {self.key_slot(key)}", log=self.log_tail)
        return found[0]

    def is_master(self, node: RedisServer) -> bool:
        """Whether ``node`` itself says it is a master (``ROLE``), whatever others' gossip says.

        After a failover the other nodes may still call a restarted old master
        a master for a moment; ``CLUSTER SETSLOT`` on it then fails ("only
        with masters"), so roles are asked of the node itself.
        """
        if not node.is_running:
            return False
        try:
            with self._admin(node) as admin:
                role = admin.execute_command("ROLE")
        except Exception:
            return False
        return _text(role[0]) == "master"

    def other_master(self, than: RedisServer) -> RedisServer:
        for entry in self.view(than):
            if "master" in entry["flags"] and entry["slots"] and "fail" not in entry["flags"]:
                node = self.node_at(entry["host"], entry["port"])
                if node is not than and self.is_master(node):
                    return node
        raise ServerError("no other master")

    def begin_migration(self, slot: int, target: RedisServer | None = None) -> SlotMigration:
        """Mark ``slot`` IMPORTING on ``target`` and MIGRATING on its owner (no key moved yet)."""
        self.touched = True
        found: list[SlotMigration] = []

        def begun() -> bool:
            # After a failover a restarted old master still calls itself a
            # master for a moment (ROLE says so) before it turns into a
            # replica and refuses SETSLOT ("only with masters"): such a
            # refusal is not the contract under test, so the migration is
            # set up again on the masters of that moment (bounded).
            try:
                source = self.master_of_slot(slot)
                other = target or self.other_master(source)
                if not (self.is_master(source) and self.is_master(other)):
                    return False
                migration = SlotMigration(self, slot, source, other)
                migration.begin()
            except Exception as exc:
                if "master" not in str(exc):
                    raise
                self._stabilise(slot)
                return False
            found[:] = [migration]
            return True

        _poll_until(begun, 15.0, f"masters for migrating slot {slot}", log=self.log_tail)
        return found[0]

    def _stabilise(self, slot: int) -> None:
        """Clear a half-begun migration of ``slot`` (IMPORTING/MIGRATING) on every live master."""
        for node in self.nodes:
            if self.is_master(node):
                with self._admin(node) as admin, contextlib.suppress(Exception):
                    admin.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")

    def migrate_slot(self, slot: int, target: RedisServer | None = None) -> RedisServer:
        """Move ``slot`` and all of its keys to ``target`` (another master by default)."""
        migration = self.begin_migration(slot, target)
        migration.move_keys()
        migration.finish()
        return migration.target


class SlotMigration:
    """One live slot migration (``CLUSTER SETSLOT`` IMPORTING/MIGRATING, ``MIGRATE``, NODE)."""

    def __init__(
        self, cluster: RedisClusterServers, slot: int, source: RedisServer, target: RedisServer
    ) -> None:
        self.cluster = cluster
        self.slot = slot
        self.source = source
        self.target = target
        self.source_id = cluster.node_id(source)
        self.target_id = cluster.node_id(target)

    def begin(self) -> None:
        with self.cluster._admin(self.target) as admin:
            admin.execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", self.source_id)
        with self.cluster._admin(self.source) as admin:
            admin.execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.target_id)

    def move_keys(self, keys: Sequence[str] | None = None) -> int:
        """``MIGRATE`` ``keys`` (default: every key of the slot) to the target; how many moved."""
        with self.cluster._admin(self.source) as admin:
            if keys is None:
                keys = [
                    k.decode() if isinstance(k, bytes) else k
                    for k in admin.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 100_000)
                ]
            if not keys:
                return 0
            admin.execute_command(
                "MIGRATE", self.target.host, self.target.port, "", 0, 5000, "KEYS", *keys
            )
        return len(keys)

    def finish(self) -> None:
        """Give the slot to the target on every master (ends ASK; clients see MOVED)."""
        for node in (self.target, self.source):
            with self.cluster._admin(node) as admin:
                admin.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.target_id)
        for entry in self.cluster.view(self.target):
            if "master" in entry["flags"] and "fail" not in entry["flags"]:
                node = self.cluster.node_at(entry["host"], entry["port"])
                # (the target's gossip may still call a restarted old master a
                # master: ask the node itself, or SETSLOT is refused)
                if node in (self.target, self.source) or not self.cluster.is_master(node):
                    continue
                with self.cluster._admin(node) as admin:
                    admin.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.target_id)


class RedisSentinelServers(_ServerGroup):
    """A master, ``replicas`` replicas and ``sentinels`` ``redis-server --sentinel`` processes.

    The service is named ``service`` (``"mymaster"``); ``sentinel_addresses``
    is what ``redis.asyncio.sentinel.Sentinel`` needs.  ``down_after``
    (milliseconds) is short so a killed master is replaced in a few seconds.
    """

    name = "redis-sentinel"
    service = "mymaster"

    def __init__(
        self,
        replicas: int = 1,
        sentinels: int = 3,
        *,
        down_after: int = 500,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.down_after = down_after
        self.data_nodes: list[RedisServer] = []
        self.sentinels: list[RedisServer] = []
        super().__init__(base_dir)

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [s.address for s in self.sentinels]

    def _start_process(self) -> None:
        master = RedisServer(base_dir=self.base_dir / "master")
        master.start()
        self.data_nodes.append(master)
        for i in range(self.replica_count):
            replica = RedisServer(
                base_dir=self.base_dir / f"replica-{i}",
                extra_args=["--replicaof", master.host, str(master.port)],
            )
            replica.start()
            self.data_nodes.append(replica)
        self.nodes.extend(self.data_nodes)
        self.port = master.port
        _poll_until(
            self._replicas_synced, START_TIMEOUT, "sentinel replicas synced", log=self.log_tail
        )
        quorum = self.sentinel_count // 2 + 1
        for i in range(self.sentinel_count):
            port = find_free_port()
            config = (
                f"port {port}\nbind {HOST}\nprotected-mode no\n"
                f"sentinel monitor {self.service} {master.host} {master.port} {quorum}\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after}\n"
                f"sentinel failover-timeout {self.service} 3000\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            sentinel = RedisSentinelProcess(config, port, self.base_dir / f"sentinel-{i}")
            self.sentinels.append(sentinel)
            sentinel.start()
        self.nodes.extend(self.sentinels)
        _poll_until(self._healthy, START_TIMEOUT, "sentinels agree", log=self.log_tail)

    def start(self) -> None:
        """Start, or bring back what a drill killed: a dead data node rejoins as a replica.

        (A killed master restarted as a master would wait for the sentinels'
        next scan, about ten seconds, to be turned into a replica.)
        """
        if self.nodes and not self._closed:
            address = self.master_address()
            for node in self.data_nodes:
                if not node.is_running and address is not None and node.address != address:
                    node.extra_args = ["--replicaof", address[0], str(address[1])]
        super().start()

    def _named_by(self, sentinel: RedisServer) -> tuple[str, int] | None:
        """The master ``sentinel`` names (``None`` if it does not answer)."""
        import redis as redis_sync

        if not sentinel.is_running:
            return None
        try:
            with redis_sync.Redis(host=sentinel.host, port=sentinel.port, socket_timeout=1.0) as s:
                host, port = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        except Exception:
            return None
        return (_text(host), int(port))

    def master_address(self) -> tuple[str, int] | None:
        """The master the first answering sentinel names."""
        for sentinel in self.sentinels:
            address = self._named_by(sentinel)
            if address is not None:
                return address
        return None

    def master(self) -> RedisServer:
        address = self.master_address()
        if address is None:
            raise ServerError("no sentinel answers")
        return self.node_at(*address)

    def _replicas_synced(self) -> bool:
        master = self.data_nodes[0] if not self.sentinels else self.master()
        return _info_field(master.host, master.port, "replication", "connected_slaves") == str(
            self.replica_count
        ) and all(
            _info_field(n.host, n.port, "replication", "master_link_status") == "up"
            for n in self.data_nodes
            if n is not master
        )

    def _healthy(self) -> bool:
        import redis as redis_sync

        if not all(n.is_running for n in self.nodes):
            return False
        addresses = set()
        for sentinel in self.sentinels:
            try:
                with redis_sync.Redis(
                    host=sentinel.host, port=sentinel.port, socket_timeout=1.0
                ) as s:
                    state = s.execute_command("SENTINEL", "MASTER", self.service)
            except Exception:
                return False
            if isinstance(state, list):
                state = dict(zip(state[::2], state[1::2], strict=False))
            state = {_text(k): _text(v) for k, v in state.items()}
            flags = str(state.get("flags", ""))
            if flags != "master":
                return False
            if int(state.get("num-other-sentinels", 0)) != self.sentinel_count - 1:
                return False
            if int(state.get("num-slaves", 0)) < self.replica_count:
                return False
            addresses.add((str(state.get("ip")), int(state.get("port", 0))))
        if len(addresses) != 1:
            return False
        host, port = addresses.pop()
        master = self.node_at(host, port)
        if _info_field(master.host, master.port, "replication", "role") != "master":
            return False
        return self._replicas_synced()

    def kill_master(self) -> RedisServer:
        """SIGKILL the current master; the sentinels promote a replica after ``down_after``."""
        self.touched = True
        master = self.master()
        master.kill()
        return master

    def wait_for_new_master(self, old: RedisServer, timeout: float = 15.0) -> RedisServer:
        """Poll until the sentinels name a master other than ``old`` that says it is one."""

        def promoted() -> bool:
            named = {self._named_by(sentinel) for sentinel in self.sentinels}
            if len(named) != 1:
                return False  # not every sentinel names the same master yet
            address = named.pop()
            if address is None or address == old.address:
                return False
            node = self.node_at(*address)
            return _info_field(node.host, node.port, "replication", "role") == "master"

        _poll_until(promoted, timeout, "sentinel failover", log=self.log_tail)
        return self.master()


class RedisSentinelProcess(RedisServer):
    """One ``redis-server <conf> --sentinel`` (it rewrites its config file: kept in its folder)."""

    name = "redis-sentinel"

    def __init__(self, config: str, port: int, base_dir: str | os.PathLike[str]) -> None:
        super().__init__(port, base_dir)
        self.config_path = self.base_dir / "sentinel.conf"
        self.config_path.write_text(config)

    def _start_process(self) -> None:
        argv = [self.binary, str(self.config_path), "--sentinel", "--loglevel", "warning"]
        self._proc = self._spawn(argv)
        _poll_until(
            self.ping,
            START_TIMEOUT,
            f"redis sentinel on port {self.port}",
            alive=lambda: self.is_running,
            log=self.log_tail,
        )
