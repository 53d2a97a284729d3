"""A small fault-injecting TCP proxy (asyncio) for tests.

``FaultProxy`` listens on a free loopback port and forwards every connection to
``target``. Faults can be switched at run time, while connections are open:

* ``set_latency(s)``              - sleep ``s`` seconds before forwarding each chunk
* ``blackhole()``                 - accept and read, never forward, never answer
* ``reset_all()``                 - RST (SO_LINGER 0) every current connection
* ``cut_after_bytes(n)``          - forward exactly ``n`` more client->server bytes, then RST
* ``cut_on_pattern(b"COMMIT")``   - RST when the pattern shows up client->server;
  ``forward=False`` (default): the server never sees the pattern (stops right before it);
  ``forward=True``: the chunk with the pattern *is* delivered, then the client is reset and
  the server side closed gracefully (the server executes it, the client never hears back:
  the "ambiguous commit" case)
* ``stop_listening()`` / ``start_listening()`` - refuse new connections / listen again on
  the same port
* ``clear()``                     - back to passthrough (listening state is left alone)

``FaultProxy`` runs in the *current* asyncio event loop (``await proxy.start()``).
``ThreadedProxy`` runs the same proxy in a background thread with its own loop and
exposes a synchronous API: use it from sync tests, trio tests, or when the proxy
must outlive one test's event loop.

Everything that happens is accounted for in ``stats`` and ``events`` so tests can
wait on facts (``wait_until`` / ``wait_event``) instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, TypeVar

__all__ = ["FaultProxy", "ProxyEvent", "ProxyStats", "ThreadedProxy"]

T = TypeVar("T")
Direction = Literal["both", "up", "down"]
_CHUNK = 65536


@dataclass(frozen=True)
class ProxyEvent:
    """Something that happened in the proxy.

    kind: "open", "close", "upstream_error", "reset", "cut", "blackhole",
    "listen", "unlisten".
    """

    kind: str
    conn_id: int = 0
    detail: str = ""


@dataclass
class ProxyStats:
    connections_opened: int = 0
    connections_active: int = 0
    bytes_up: int = 0  # client -> server, forwarded
    bytes_down: int = 0  # server -> client, forwarded
    delayed_chunks: int = 0
    injected_delay: float = 0.0  # seconds of latency injected, summed over chunks
    blackholed_bytes: int = 0  # bytes read and dropped
    resets: int = 0
    cuts: int = 0


class _Cut(Exception):
    """Internal: the pump cut its connection."""


def _set_rst_on_close(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Conn:
    def __init__(
        self, conn_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.id = conn_id
        self.client_reader = reader
        self.client_writer = writer
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.up_bytes = 0
        self.down_bytes = 0
        self.tail = b""
        self.closed = False
        self.tasks: list[asyncio.Task[None]] = []

    def writers(self) -> list[asyncio.StreamWriter]:
        out = [self.client_writer]
        if self.upstream_writer is not None:
            out.append(self.upstream_writer)
        return out

    def abort(self, *, rst: bool = True) -> None:
        """Close both sides now; with ``rst`` the peers see a TCP reset."""
        self.closed = True
        for writer in self.writers():
            if rst:
                _set_rst_on_close(writer)
            writer.transport.abort()


class FaultProxy:
    """Fault-injecting TCP proxy running in the current asyncio loop."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target = target
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.stats = ProxyStats()
        self._events: list[ProxyEvent] = []
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._changed = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        # faults
        self._latency = 0.0
        self._latency_dir: Direction = "both"
        self._blackhole = False
        self._cut_after: int | None = None
        self._cut_base: dict[int, int] = {}
        self._cut_pattern: bytes | None = None
        self._cut_forward = False
        self._cut_times: int | None = None

    # -- info ----------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def events(self) -> list[ProxyEvent]:
        with self._lock:
            return list(self._events)

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for e in self._events if e.kind == kind)

    def _record(self, kind: str, conn_id: int = 0, detail: str = "") -> None:
        with self._lock:
            self._events.append(ProxyEvent(kind, conn_id, detail))
        self._notify()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()
        self._changed.set()
        self._changed = asyncio.Event()

    # -- waiting (no sleeps) ---------------------------------------------------
    async def wait_until(
        self, predicate: Callable[[FaultProxy], bool], timeout: float = 5.0
    ) -> None:
        """Wait (in the proxy's loop) until ``predicate(proxy)`` holds; TimeoutError after."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"proxy condition not met within {timeout}s: {self.stats}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_event(self, kind: str, count: int = 1, timeout: float = 5.0) -> None:
        await self.wait_until(lambda p: p.count(kind) >= count, timeout)

    def wait_until_sync(
        self, predicate: Callable[[FaultProxy], bool], timeout: float = 5.0
    ) -> None:
        """Blocking variant for *other* threads (never call it from the proxy's loop)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(self), timeout)
        if not ok:
            raise TimeoutError(f"proxy condition not met within {timeout}s: {self.stats}")

    # -- faults ------------------------------------------------------------------
    def set_latency(self, seconds: float, direction: Direction = "both") -> None:
        """Delay every forwarded chunk by ``seconds`` (0 disables)."""
        self._latency = max(0.0, float(seconds))
        self._latency_dir = direction

    def blackhole(self, enabled: bool = True) -> None:
        """Swallow all traffic: new and existing connections stay open, nothing is forwarded."""
        self._blackhole = enabled

    def reset_all(self) -> int:
        """RST every current connection (both sides). Returns how many were reset."""
        conns = [c for c in self._conns.values() if not c.closed]
        for conn in conns:
            self.stats.resets += 1
            self._record("reset", conn.id)
            conn.abort(rst=True)
        return len(conns)

    def cut_after_bytes(self, nbytes: int, *, times: int | None = 1) -> None:
        """Forward ``nbytes`` more client->server bytes on a connection, then RST it.

        Counted per connection from now on. ``times`` connections are cut (None: all).
        """
        self._disarm_cut()
        self._cut_after = nbytes
        self._cut_base = {cid: c.up_bytes for cid, c in self._conns.items()}
        self._cut_times = times

    def cut_on_pattern(
        self, pattern: bytes, *, forward: bool = False, times: int | None = 1
    ) -> None:
        """RST a connection when ``pattern`` appears in client->server traffic.

        ``forward=False``: bytes before the pattern are delivered, the pattern is not.
        ``forward=True``: the whole chunk holding the pattern is delivered to the server,
        then the client is reset and the server side is closed gracefully.
        """
        if not pattern:
            raise ValueError("empty pattern")
        self._disarm_cut()
        self._cut_pattern = pattern
        self._cut_forward = forward
        self._cut_times = times
        for conn in self._conns.values():
            conn.tail = b""

    def _disarm_cut(self) -> None:
        self._cut_after = None
        self._cut_base = {}
        self._cut_pattern = None
        self._cut_forward = False
        self._cut_times = None

    def clear(self) -> None:
        """Back to passthrough: no latency, no blackhole, no armed cut."""
        self._latency = 0.0
        self._latency_dir = "both"
        self._blackhole = False
        self._disarm_cut()

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> FaultProxy:
        self._loop = asyncio.get_running_loop()
        await self.start_listening()
        return self

    async def start_listening(self) -> None:
        """(Re)start accepting connections on the same port."""
        if self._server is not None:
            return
        self._loop = asyncio.get_running_loop()
        server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        self._record("listen", 0, f"{self.host}:{self.port}")

    async def stop_listening(self) -> None:
        """Close the listening socket: new connects are refused; open ones continue."""
        server, self._server = self._server, None
        if server is not None:
            server.close()  # closes the listening sockets at once
            self._record("unlisten")

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        await self.stop_listening()
        tasks: list[asyncio.Task[None]] = []
        for conn in list(self._conns.values()):
            conn.abort(rst=False)
            tasks.extend(conn.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # let handlers run their cleanup
        await self.wait_until(lambda p: p.stats.connections_active == 0, timeout=5.0)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- data path ---------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(next(self._ids), reader, writer)
        self._conns[conn.id] = conn
        self.stats.connections_opened += 1
        self.stats.connections_active += 1
        self._record("open", conn.id)
        try:
            if self._blackhole:
                self._record("blackhole", conn.id, "accepted, not forwarded")
                await self._swallow(conn, reader)
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), self.connect_timeout
                )
            except (TimeoutError, OSError) as exc:
                self._record("upstream_error", conn.id, repr(exc))
                conn.abort(rst=True)
                return
            conn.upstream_writer = up_writer
            if conn.closed:  # reset while we were connecting
                conn.abort(rst=True)
                return
            up = asyncio.ensure_future(self._pump(conn, reader, up_writer, upstream=True))
            down = asyncio.ensure_future(self._pump(conn, up_reader, writer, upstream=False))
            conn.tasks = [up, down]
            done, pending = await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
            failed = any(t.cancelled() or t.exception() is not None for t in done)
            if failed and not conn.closed:
                conn.abort(rst=True)
            if pending:
                # half-closed: give the other direction a bounded time to finish
                _, still = await asyncio.wait(pending, timeout=30.0)
                for task in still:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        except asyncio.CancelledError:
            conn.abort(rst=False)
        except Exception as exc:  # never let a handler error escape into the loop
            self._record("error", conn.id, repr(exc))
            conn.abort(rst=True)
        finally:
            if not conn.closed:
                for w in conn.writers():
                    w.close()
                conn.closed = True
            self._conns.pop(conn.id, None)
            self._cut_base.pop(conn.id, None)
            self.stats.connections_active -= 1
            self._record("close", conn.id)

    async def _swallow(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        while not conn.closed:
            try:
                data = await reader.read(_CHUNK)
            except OSError:
                return
            if not data:
                return
            self.stats.blackholed_bytes += len(data)
            self._notify()

    async def _pump(
        self,
        conn: _Conn,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        while True:
            data = await reader.read(_CHUNK)
            if conn.closed:
                return
            if not data:
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
                    else:
                        writer.close()
                return
            if self._blackhole:
                self.stats.blackholed_bytes += len(data)
                self._notify()
                continue
            if self._latency > 0 and self._latency_dir in ("both", "up" if upstream else "down"):
                delay = self._latency
                await asyncio.sleep(delay)
                self.stats.delayed_chunks += 1
                self.stats.injected_delay += delay
                if conn.closed:
                    return
            cut: str | None = None
            forward_then_close = False
            if upstream:
                data, cut, forward_then_close = self._check_cut(conn, data)
            if data:
                writer.write(data)
                await writer.drain()
                if upstream:
                    conn.up_bytes += len(data)
                    self.stats.bytes_up += len(data)
                else:
                    conn.down_bytes += len(data)
                    self.stats.bytes_down += len(data)
                self._notify()
            if cut is not None:
                self._do_cut(conn, cut, forward_then_close)
                raise _Cut(cut)

    def _check_cut(self, conn: _Conn, data: bytes) -> tuple[bytes, str | None, bool]:
        """Return (bytes to forward, cut reason or None, graceful-upstream flag)."""
        if self._cut_times is not None and self._cut_times <= 0:
            return data, None, False
        if self._cut_after is not None:
            sent = conn.up_bytes - self._cut_base.get(conn.id, 0)
            remaining = self._cut_after - sent
            if len(data) >= remaining:
                self._consume_cut()
                return data[: max(remaining, 0)], f"after {self._cut_after} bytes", False
            return data, None, False
        pattern = self._cut_pattern
        if pattern is not None:
            window = conn.tail + data
            idx = window.find(pattern)
            keep = len(pattern) - 1
            conn.tail = window[-keep:] if keep else b""
            if idx >= 0:
                forward = self._cut_forward
                self._consume_cut()
                reason = f"pattern {pattern!r}" + (" (forwarded)" if forward else "")
                if forward:
                    return data, reason, True
                start = max(idx - (len(window) - len(data)), 0)
                return data[:start], reason, False
        return data, None, False

    def _consume_cut(self) -> None:
        if self._cut_times is not None:
            self._cut_times -= 1
            if self._cut_times <= 0:
                self._disarm_cut()
                self._cut_times = 0

    def _do_cut(self, conn: _Conn, reason: str, graceful_upstream: bool) -> None:
        self.stats.cuts += 1
        self._record("cut", conn.id, reason)
        conn.closed = True
        _set_rst_on_close(conn.client_writer)
        conn.client_writer.transport.abort()
        if conn.upstream_writer is not None:
            if graceful_upstream:
                conn.upstream_writer.close()  # FIN after the forwarded bytes
            else:
                _set_rst_on_close(conn.upstream_writer)
                conn.upstream_writer.transport.abort()


class ThreadedProxy:
    """``FaultProxy`` in a background thread with its own event loop.

    Synchronous API (safe from any thread or event loop, asyncio or trio). From
    async tests use ``await proxy.wait_until_async(...)`` / ``wait_event_async``
    rather than the blocking waits.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.proxy = FaultProxy(target, host=host, port=port, connect_timeout=connect_timeout)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- plumbing ----------------------------------------------------------------
    def _run(self, awaitable: Awaitable[T], timeout: float = 15.0) -> T:
        if self._loop is None:
            raise RuntimeError("ThreadedProxy not started")

        async def wrapper() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout)

    def _call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self._run(wrapper())

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> ThreadedProxy:
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        self._run(self.proxy.start())
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._run(self.proxy.stop())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            if not thread.is_alive():
                loop.close()
            self._loop = None
            self._thread = None

    def __enter__(self) -> ThreadedProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- info ----------------------------------------------------------------------
    @property
    def host(self) -> str:
        return self.proxy.host

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def address(self) -> tuple[str, int]:
        return self.proxy.address

    @property
    def target(self) -> tuple[str, int]:
        return self.proxy.target

    @target.setter
    def target(self, value: tuple[str, int]) -> None:
        self.proxy.target = value  # used by new connections only

    @property
    def stats(self) -> ProxyStats:
        return self.proxy.stats

    @property
    def events(self) -> list[ProxyEvent]:
        return self.proxy.events

    @property
    def listening(self) -> bool:
        return self.proxy.listening

    def count(self, kind: str) -> int:
        return self.proxy.count(kind)

    # -- faults (run in the proxy's loop) ----------------------------------------------
    def set_latency(self, seconds: float, direction: Direction = "both") -> None:
        self._call(lambda: self.proxy.set_latency(seconds, direction))

    def blackhole(self, enabled: bool = True) -> None:
        self._call(lambda: self.proxy.blackhole(enabled))

    def reset_all(self) -> int:
        return self._call(self.proxy.reset_all)

    def cut_after_bytes(self, nbytes: int, *, times: int | None = 1) -> None:
        self._call(lambda: self.proxy.cut_after_bytes(nbytes, times=times))

    def cut_on_pattern(
        self, pattern: bytes, *, forward: bool = False, times: int | None = 1
    ) -> None:
        self._call(lambda: self.proxy.cut_on_pattern(pattern, forward=forward, times=times))

    def clear(self) -> None:
        self._call(self.proxy.clear)

    def stop_listening(self) -> None:
        self._run(self.proxy.stop_listening())

    def start_listening(self) -> None:
        self._run(self.proxy.start_listening())

    # -- waiting -------------------------------------------------------------------------
    def wait_until(self, predicate: Callable[[FaultProxy], bool], timeout: float = 5.0) -> None:
        """Blocking wait (sync tests)."""
        self.proxy.wait_until_sync(predicate, timeout)

    def wait_event(self, kind: str, count: int = 1, timeout: float = 5.0) -> None:
        self.proxy.wait_until_sync(lambda p: p.count(kind) >= count, timeout)

    async def wait_until_async(
        self, predicate: Callable[[FaultProxy], bool], timeout: float = 5.0
    ) -> None:
        """Bounded polling (10 ms) usable from any async framework (asyncio or trio)."""
        import anyio

        deadline = time.monotonic() + timeout
        while not predicate(self.proxy):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"proxy condition not met within {timeout}s: {self.proxy.stats}")
            await anyio.sleep(0.01)

    async def wait_event_async(self, kind: str, count: int = 1, timeout: float = 5.0) -> None:
        await self.wait_until_async(lambda p: p.count(kind) >= count, timeout)
