"""Real HTTP servers on loopback for the network tests, each in its own thread.

A :class:`ScriptedServer` answers every request with the next scripted
:class:`Reply` (then its default one): a status with headers, or a hang
until the server stops.  It records what it received (method, path,
headers), so tests check facts instead of sleeping.  Running in a thread
with its own asyncio loop, it serves asyncio and trio clients alike.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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


class ScriptedServer:
    """An aiohttp server on 127.0.0.1 that answers with ``name`` as the body."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.default = Reply()
        self.script: list[Reply] = []
        self.seen: list[Seen] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"http-{name}")
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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

    def start(self) -> ScriptedServer:
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
