"""Real HTTP servers on loopback for the network tests, each in its own thread.

A :class:`ScriptedServer` answers every request with the next scripted
:class:`Reply` (then its default one): a status with headers, or a hang
until the server stops.  It records what it received (method, path,
headers), so tests check facts instead of sleeping.  Running in a thread
with its own asyncio loop, it serves asyncio and trio clients alike.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Self

from aiohttp import web


@dataclass(frozen=True)
class Reply:
    """One scripted answer: ``status`` and ``headers``, or ``hang`` until the server stops."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False


@dataclass(frozen=True)
class Seen:
    """A request the server received."""

    method: str
    path: str
    headers: dict[str, str]


class _ThreadedLoop:
    """A server whose asyncio loop runs in its own thread, started and stopped from outside.

    Subclasses define ``_start`` (bind, set ``port``) and ``_stop`` (close),
    run on that loop; ``start``/``stop`` wait at most 10 s for each.
    """

    def __init__(self, thread_name: str) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=thread_name)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


class ScriptedServer(_ThreadedLoop):
    """An aiohttp server on 127.0.0.1 that answers with ``name`` as the body."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.default = Reply()
        self.script: list[Reply] = []
        self.seen: list[Seen] = []
        super().__init__(f"http-{name}")
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def answer(self, *replies: Reply, default: Reply | None = None) -> ScriptedServer:
        """Answer the next requests with ``replies``, then with ``default`` (if given)."""
        self.script.extend(replies)
        if default is not None:
            self.default = default
        return self

    async def _handle(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.method, request.path, dict(request.headers)))
        reply = self.script.pop(0) if self.script else self.default
        if reply.hang:
            assert self._stopping is not None
            await self._stopping.wait()
        return web.Response(status=reply.status, headers=reply.headers, text=self.name)

    async def _start(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._stopping is not None and self._runner is not None
        self._stopping.set()
        await self._runner.cleanup()


@contextmanager
def scripted_servers(*names: str) -> Iterator[dict[str, ScriptedServer]]:
    """Start one server per name; stop them all at the end."""
    servers: dict[str, ScriptedServer] = {}
    try:
        for name in names:
            servers[name] = ScriptedServer(name).start()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


class DroppingServer(_ThreadedLoop):
    """A raw HTTP/1.1 server on 127.0.0.1 that drops connections, counting every request.

    On each connection it answers the first ``answered`` requests with a
    keep-alive ``200`` (so the client pools the connection), then reads the
    next request whole and closes without a word (``reset=True``: with a TCP
    reset).  ``requests`` counts every request received, server-side, which is
    what a client's hidden re-sends cannot hide from.
    """

    def __init__(self, answered: int = 0, *, reset: bool = False) -> None:
        self.answered = answered
        self.reset = reset
        self.requests = 0
        self.dropped = 0
        self.connections = 0
        super().__init__("http-dropping")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        served = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                if length:
                    await reader.readexactly(length)
                self.requests += 1
                if served >= self.answered:
                    self.dropped += 1
                    if self.reset:
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    writer.transport.abort() if self.reset else writer.close()
                    return
                served += 1
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
                )
                await writer.drain()
        finally:
            self._writers.discard(writer)
            if not writer.is_closing():
                writer.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()


@contextmanager
def dropping_server(answered: int = 0, *, reset: bool = False) -> Iterator[DroppingServer]:
    """A started :class:`DroppingServer`, stopped at the end."""
    server = DroppingServer(answered, reset=reset).start()
    try:
        yield server
    finally:
        server.stop()


def refused_address() -> str:
    """A loopback base URL where nothing listens (a port just bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
