"""Quickstart: retry a flaky call, see what the engine did, and give up cleanly.

Run it: ``python examples/quickstart.py``.  No server needed: the flaky
dependency is simulated, and delays are real but short.
"""

from __future__ import annotations

import asyncio
import random

import datapunk_recovery as dr

rng = random.Random(42)


@dr.retry(dr.RetryConfig(max_attempts=5, base_delay=0.01, max_delay=0.1))
def fetch_price(symbol: str) -> float:
    """A call to a service that drops half of its connections."""
    if rng.random() < 0.5:
        raise ConnectionResetError("peer reset the connection")
    return 42.0


@dr.retry(dr.RetryConfig(max_attempts=3, base_delay=0.01), retry_if_result=lambda s: s >= 500)
async def post_order(order_id: int) -> int:
    """Returns an HTTP status; a 503 is returned, not raised, and still retried."""
    return 503 if dr.current_attempt() < 2 else 201


@dr.retry(dr.RetryConfig(max_attempts=3, base_delay=0.01))
def always_down() -> None:
    raise ConnectionRefusedError("nobody listens on that port")


def main() -> None:
    log: list[str] = []
    unsubscribe = dr.subscribe(lambda event: log.append(f"{event.name}: {event}"))
    try:
        print("price:", fetch_price("DPNK"))
        print("order status:", asyncio.run(post_order(7)))
        try:
            always_down()
        except ConnectionRefusedError as exc:
            print("gave up:", exc, "|", exc.__notes__[-1])
    finally:
        unsubscribe()
    print(f"{len(log)} events, e.g.:", log[1] if len(log) > 1 else log)
    print("fetch_price statistics:", fetch_price.statistics())


if __name__ == "__main__":
    main()
