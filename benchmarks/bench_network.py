"""Network recovery: what routing costs per call, and what the HTTP adapter adds.

Run: ``.venv/bin/python benchmarks/bench_network.py --fast`` (pyperf;
``--routing-only`` skips the HTTP rows).

- ``bare call`` / ``router, 1 level`` / ``router, 2 levels of 3``: an
  ``async (endpoint) -> result`` that answers at once, called directly and
  through a :class:`Router` (selection, a breaker permit, the retry engine):
  the difference is the router's own cost on the happy path.
- ``hand-written failover``: a loop over the endpoints that calls the first
  and moves on when one raises ``ConnectionError``: the floor for the router.
- ``router, failover``: every call's first attempt fails (no breaker trips),
  so every call fails over once to the other endpoint: the failure path.
- ``httpx direct`` / ``httpx recovered``: a real GET to a loopback server
  (in a thread), directly and through :class:`HttpxRecovery`; network time
  dominates, the difference is the adapter's share.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pyperf
from _timing import time_async
from aiohttp import web

from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._execution.engine import current_attempt
from datapunk_recovery.breaker import BreakerConfig
from datapunk_recovery.network import Endpoint, Router, RouterConfig
from datapunk_recovery.network.httpx import HttpxRecovery

NO_TRIP = BreakerConfig(consecutive_failures=10**9, keep_window=True, minimum_calls=1)
CONFIG = RouterConfig(retry=RetryConfig(max_attempts=3, base_delay=0.0), breaker=NO_TRIP)


async def answer(endpoint: Endpoint) -> str:
    return endpoint.name


async def first_fails(endpoint: Endpoint) -> str:
    if current_attempt() == 1:
        raise ConnectionResetError
    return endpoint.name


async def hand_failover(endpoints: list[Endpoint]) -> str:
    """A minimal hand-written failover loop: the floor for the router rows."""
    error: Exception | None = None
    for endpoint in endpoints:
        try:
            return await answer(endpoint)
        except ConnectionError as exc:
            error = exc
    assert error is not None
    raise error


def routing_cases() -> dict[str, Callable[[], Awaitable[Any]]]:
    one = Router("one", [Endpoint("a")], CONFIG)
    two = Router(
        "two",
        [Endpoint(n, priority=p) for p, names in enumerate(("abc", "def")) for n in names],
        CONFIG,
    )
    failover = Router("failover", [Endpoint("a"), Endpoint("b")], CONFIG)
    target = Endpoint("a")
    return {
        "bare call": lambda: answer(target),
        "hand-written failover": lambda: hand_failover([target]),
        "router, 1 level": lambda: one.call(answer),
        "router, 2 levels of 3": lambda: two.call(answer),
        "router, failover": lambda: failover.call(first_fails),
    }


def start_server() -> str:
    """A loopback HTTP server in a daemon thread; returns its base URL."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        port.append(site._server.sockets[0].getsockname()[1])
        ready.set()

    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(serve(), loop)
    ready.wait(10)
    return f"http://127.0.0.1:{port[0]}"


def time_http(url: str, recovered: bool) -> Callable[[int], float]:
    def run(loops: int) -> float:
        async def body() -> float:
            router = Router("http", [Endpoint("local", url)], CONFIG)
            async with httpx.AsyncClient() as client:
                api = HttpxRecovery(client, router)
                await client.get(url)  # the connection is open before timing
                timer = pyperf.perf_counter
                start = timer()
                for _ in range(loops):
                    if recovered:
                        await api.get("/")
                    else:
                        await client.get(url + "/")
                return timer() - start

        return asyncio.run(body())

    return run


def _forward(cmd: list[str], args: Any) -> None:
    # pyperf workers get no unknown options unless forwarded.
    if args.routing_only:
        cmd.append("--routing-only")


def main() -> None:
    runner = pyperf.Runner(add_cmdline_args=_forward)
    runner.argparser.add_argument(
        "--routing-only", action="store_true", help="skip the HTTP rows (no server started)"
    )
    args = runner.parse_args()
    for name, afn in routing_cases().items():
        runner.bench_time_func(name, time_async(lambda afn=afn: afn))
    if args.routing_only:
        return
    url = start_server()
    runner.bench_time_func("httpx direct", time_http(url, recovered=False))
    runner.bench_time_func("httpx recovered", time_http(url, recovered=True))


if __name__ == "__main__":
    main()
