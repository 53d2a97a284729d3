"""Checked by ``mypy --strict`` (tests/test_typing.py): decorators keep what they decorate.

Each ``assert_type`` is a claim about the type checker's view; the module
also runs, so every claim is true at run time too.
"""

from __future__ import annotations

import asyncio
from typing import assert_type

import datapunk_recovery as dr
from datapunk_recovery._core.stats import Statistics

payments = dr.CircuitBreaker("typing-payments")
bulkhead = dr.Bulkhead("typing-pool", dr.BulkheadConfig(max_concurrent=2))


@dr.retry
def plain(x: int) -> str:
    return str(x)


@payments
@dr.retry
def guarded(x: int) -> str:
    return str(x)


@payments
@dr.retry(dr.RetryConfig(max_attempts=2))
async def guarded_async(x: int, *, y: str = "") -> bytes:
    return f"{x}{y}".encode()


@bulkhead
@payments
@dr.retry
def deeply(x: int) -> str:
    return str(x)


assert_type(plain(1), str)
assert_type(plain.statistics(), Statistics)
assert_type(guarded(1), str)
assert_type(guarded.statistics(), Statistics)
assert_type(asyncio.run(guarded_async(1, y="a")), bytes)
assert_type(guarded_async.statistics(), Statistics)
assert_type(deeply.statistics(), Statistics)
assert_type(deeply(2), str)


@payments
def bare(x: int) -> str:
    return str(x)


assert_type(bare(1), str)
