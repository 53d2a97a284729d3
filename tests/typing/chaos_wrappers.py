"""Checked by ``mypy --strict`` (tests/test_typing.py): chaos wrappers keep the signature.

Each ``assert_type`` is a claim about the type checker's view; the module
also runs, so every claim is true at run time too.
"""

from __future__ import annotations

import asyncio
from typing import assert_type

from datapunk_recovery import chaos

injector = chaos.Chaos(chaos.Outcome(0), enabled=False, name="typing-chaos")


@injector
def lookup(key: str, /, *, default: int = 0) -> int:
    return len(key) + default


@injector
async def fetch(key: str, attempts: int = 1) -> bytes:
    return key.encode() * attempts


assert_type(lookup("abc", default=1), int)
assert_type(asyncio.run(fetch("ab", 2)), bytes)
assert_type(injector.call(lookup, "x"), int)
assert_type(asyncio.run(injector.call_async(fetch, "y")), bytes)
assert_type(asyncio.run(injector.acall(fetch, "z")), bytes)
assert lookup("abc", default=1) == 4
assert asyncio.run(fetch("ab", 2)) == b"abab"
