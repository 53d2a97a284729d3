"""Cache warming: which keys to load before readers ask, and how fast.

A cache that just came back from an outage may be empty (a restarted Redis
keeps nothing); the first readers would all miss and stampede the source.
Warming loads chosen keys ahead of them, at a bounded rate so that warming
itself cannot become the stampede.

Which keys: a [`WarmingPolicy`][datapunk_recovery.cache.warming.WarmingPolicy] is any object with
``keys_to_warm(reason, hot) -> iterable of keys``; ``reason`` is ``"start"``
or ``"recovered"``, ``hot`` the [`HotKeySketch`][datapunk_recovery.cache.warming.HotKeySketch] of
recent reads.
Built in: [`WarmKeys`][datapunk_recovery.cache.warming.WarmKeys] (a fixed list) and
[`WarmHottest`][datapunk_recovery.cache.warming.WarmHottest] (the
most read keys, predictive warming).

Hot keys are tracked with a count-min sketch (fixed memory: ``width x depth``
counters) plus a bounded list of the heaviest keys seen; counts halve
periodically so the list follows what is hot now, not what was hot an hour
ago.  Each row hashes the key's UTF-8 bytes with its own slice of a keyed
BLAKE2b digest: rows are independent (the bound below needs it), and every
process, whatever its ``PYTHONHASHSEED``, agrees on which keys are hot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Final, Literal, Protocol, runtime_checkable

from datapunk_recovery._core.validate import check_count

__all__ = ["HotKeySketch", "WarmHottest", "WarmKeys", "WarmReason", "WarmingPolicy"]

WarmReason = Literal["start", "recovered"]

#: Rows per BLAKE2b digest: 8 bytes of its (at most 64-byte) output each.
_ROWS_PER_DIGEST: Final = 8


class HotKeySketch:
    """Approximate read counts per key in fixed memory, and the ``top`` heaviest keys.

    ``width`` x ``depth`` counters.  An estimate never undercounts, and (the
    count-min bound) overcounts by more than ``e / width`` of all reads
    counted, ``N``, with probability at most ``e ** -depth``: with the
    defaults (2048 x 4), at most 0.13 % of ``N`` for 98 % of keys.  Every
    ``decay_every`` records (default ``10 * width``), all counts halve.
    ``seed`` picks the hash functions (each row its own, independent of
    ``PYTHONHASHSEED``): sketches with the same seed agree in every process.
    """

    __slots__ = (
        "_key",
        "_rows",
        "_since_decay",
        "_top",
        "decay_every",
        "depth",
        "seed",
        "top",
        "width",
    )

    def __init__(
        self,
        width: int = 2048,
        depth: int = 4,
        top: int = 100,
        decay_every: int | None = None,
        *,
        seed: int = 0,
    ) -> None:
        self.width = check_count("HotKeySketch", "width", width)
        self.depth = check_count("HotKeySketch", "depth", depth)
        self.top = check_count("HotKeySketch", "top", top)
        self.seed = check_count("HotKeySketch", "seed", seed, minimum=0)
        # BLAKE2b keys are at most 64 bytes; a larger seed folds into them.
        self._key = hashlib.blake2b(str(seed).encode(), digest_size=32).digest()
        self.decay_every = (
            check_count("HotKeySketch", "decay_every", decay_every)
            if decay_every is not None
            else 10 * width
        )
        self._rows = [[0] * width for _ in range(depth)]
        self._top: dict[str, int] = {}
        self._since_decay = 0

    def _slots(self, key: str) -> list[int]:
        # Row i's slot: the i-th 8 bytes of a keyed BLAKE2b digest of the key
        # (one more digest, salted with its number, per 8 rows).  Independent
        # 64-bit hashes; modulo width, the bias is below width / 2**64.
        data = key.encode("utf-8", "surrogatepass")
        width, depth = self.width, self.depth
        slots: list[int] = []
        for block in range(0, depth, _ROWS_PER_DIGEST):
            rows = min(_ROWS_PER_DIGEST, depth - block)
            digest = hashlib.blake2b(
                data,
                digest_size=8 * rows,
                key=self._key,
                salt=(block // _ROWS_PER_DIGEST).to_bytes(16, "little"),
            ).digest()
            slots.extend(
                int.from_bytes(digest[8 * i : 8 * i + 8], "little") % width for i in range(rows)
            )
        return slots

    def record(self, key: str) -> None:
        """Count one read of ``key``."""
        estimate = None
        for row, slot in zip(self._rows, self._slots(key), strict=True):
            count = row[slot] + 1
            row[slot] = count
            estimate = count if estimate is None or count < estimate else estimate
        assert estimate is not None
        top = self._top
        if key in top or len(top) < self.top:
            top[key] = estimate
        else:
            lightest = min(top, key=top.__getitem__)
            if top[lightest] < estimate:
                del top[lightest]
                top[key] = estimate
        self._since_decay += 1
        if self._since_decay >= self.decay_every:
            self._decay()

    def _decay(self) -> None:
        self._since_decay = 0
        self._rows = [[c >> 1 for c in row] for row in self._rows]
        self._top = {k: c >> 1 for k, c in self._top.items() if c >> 1}

    def estimate(self, key: str) -> int:
        """About how many times ``key`` was read (never fewer than it was)."""
        return min(row[slot] for row, slot in zip(self._rows, self._slots(key), strict=True))

    def hottest(self, n: int | None = None) -> list[str]:
        """The heaviest keys, heaviest first (at most ``n``, at most ``top``)."""
        ranked = sorted(self._top, key=self._top.__getitem__, reverse=True)
        return ranked if n is None else ranked[:n]


@runtime_checkable
class WarmingPolicy(Protocol):
    """Chooses the keys to warm; any object with this method will do."""

    def keys_to_warm(self, reason: WarmReason, hot: HotKeySketch) -> Iterable[str]:
        """The keys to load now, most important first."""
        ...


class WarmKeys:
    """Warm a fixed list of keys (at start and after each recovery, or only at ``on``)."""

    __slots__ = ("keys", "on")

    def __init__(self, keys: Iterable[str], on: Iterable[WarmReason] = ("start", "recovered")):
        self.keys = tuple(keys)
        self.on = frozenset(on)

    def keys_to_warm(self, reason: WarmReason, hot: HotKeySketch) -> Iterable[str]:
        """The fixed keys when ``reason`` is one of ``on``."""
        return self.keys if reason in self.on else ()


class WarmHottest:
    """Warm the ``n`` most read keys (predictive): after recovery by default."""

    __slots__ = ("n", "on")

    def __init__(self, n: int = 100, on: Iterable[WarmReason] = ("recovered",)) -> None:
        self.n = check_count("WarmHottest", "n", n)
        self.on = frozenset(on)

    def keys_to_warm(self, reason: WarmReason, hot: HotKeySketch) -> Iterable[str]:
        """The hottest keys when ``reason`` is one of ``on``."""
        return hot.hottest(self.n) if reason in self.on else ()
