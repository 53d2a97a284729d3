"""Helpers shared by the breaker's test modules.

The error a dependency raises (``Boom``), the calls that fail or succeed
through a breaker, and a result type carrying a server-given delay.  The
fake clock (``fake``) and the event list (``seen``) are fixtures in
``tests/conftest.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from datapunk_recovery.breaker import CircuitBreaker


class Boom(Exception):
    pass


def boom() -> None:
    raise Boom("down")


def ok() -> str:
    return "ok"


def _raise(exc: BaseException) -> None:
    raise exc


def fail(b: CircuitBreaker, times: int = 1) -> None:
    """Make ``times`` calls through ``b`` that each fail with ``Boom``."""
    for _ in range(times):
        with pytest.raises(Boom):
            b.call(boom)


@dataclass
class Response:
    status: int
    retry_after: object = None


def _delay(r: Response) -> object:
    """The server-given delay (seconds) of a 429 or 503 response, else none."""
    return r.retry_after if r.status in (429, 503) else None
