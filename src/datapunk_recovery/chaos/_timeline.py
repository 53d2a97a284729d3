"""``Timeline``: faults scripted over time, as windows read against the library clock.

A drill that breaks the cache from second 10 to 20 and the primary after that
is written as windows here; each dependency takes its own injector of the
timeline, and a fake clock plays the script deterministically.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from .._core import clock
from .._core.validate import check_fraction, check_number, check_seconds, shown
from ._injections import Injection, Latency, _check_injection
from ._injector import Injector, _rng_of


@dataclass(frozen=True, slots=True)
class Window:
    """Inject ``injection`` into a fraction ``rate`` of calls from ``start`` to ``end``.

    ``start`` and ``end`` are seconds since the timeline started (``end``
    excluded; ``None`` for "until the end").  ``target`` names the dependency
    it breaks (``"cache"``, ``"primary"``): a timeline's injector for one
    target applies that target's windows and the windows without a target.
    """

    start: float = field(metadata={"unit": "seconds"})
    end: float | None = field(metadata={"unit": "seconds"})
    injection: Injection
    rate: float = 1.0
    target: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", check_seconds("Window", "start", self.start))
        if self.end is not None:
            end = check_seconds("Window", "end", self.end)
            if end <= self.start:
                raise ValueError(
                    f"Window.end: must be > start ({self.start!r}), got {shown(self.end)}"
                )
            object.__setattr__(self, "end", end)
        _check_injection("Window.injection", self.injection)
        object.__setattr__(self, "rate", check_fraction("Window", "rate", self.rate))
        if self.target is not None and not isinstance(self.target, str):
            raise TypeError(f"Window.target: expected a str or None, got {shown(self.target)}")

    def covers(self, elapsed: float) -> bool:
        """Whether the window is open ``elapsed`` seconds after the timeline started."""
        return self.start <= elapsed and (self.end is None or elapsed < self.end)


class Timeline:
    """A script of faults over time: `Window`\\ s read against the library clock.

    Build it, take one injector per dependency with
    [`injector()`][datapunk_recovery.chaos.Timeline.injector], and
    [`start()`][datapunk_recovery.chaos.Timeline.start] it when the load begins; before that nothing
    is injected.
    Overlapping windows apply together (a latency and a fault, say).  One
    seeded RNG serves all of the timeline's injectors, so a run with the same
    seed and the same order of calls injects the same faults.
    """

    __slots__ = ("_origin", "_rng", "name", "windows")

    def __init__(
        self,
        windows: Iterable[Window],
        *,
        seed: int | None = None,
        rng: random.Random | None = None,
        name: str = "timeline",
    ) -> None:
        checked = tuple(windows)
        for window in checked:
            if not isinstance(window, Window):
                raise TypeError(f"Timeline.windows: expected Window items, got {shown(window)}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"Timeline.name: expected a non-empty str, got {shown(name)}")
        self.windows = tuple(sorted(checked, key=lambda w: w.start))
        self.name = name
        self._rng = _rng_of("Timeline", seed, rng)
        self._origin: float | None = None

    def start(self, at: float | None = None) -> None:
        """Start (or restart) the script at library time ``at`` (default: now)."""
        # A reading of the library clock, not a duration: any finite time >= 0.
        self._origin = clock.now() if at is None else check_number("Timeline", "at", at)

    def stop(self) -> None:
        """End the script: nothing is injected until it is started again."""
        self._origin = None

    def elapsed(self) -> float | None:
        """Seconds since `start()`, or ``None`` when not started."""
        origin = self._origin
        return None if origin is None else clock.now() - origin

    @property
    def duration(self) -> float | None:
        """When the last window closes, in seconds from the start (``None``: never)."""
        if not self.windows:
            return 0.0
        ends = [w.end for w in self.windows]
        return None if any(e is None for e in ends) else max(cast(list[float], ends))

    def active(self, target: str | None = None) -> tuple[Window, ...]:
        """The windows open now that apply to ``target`` (all of them for ``None``)."""
        elapsed = self.elapsed()
        if elapsed is None:
            return ()
        return tuple(
            w
            for w in self.windows
            if w.covers(elapsed) and (target is None or w.target in (None, target))
        )

    def injector(self, target: str | None = None, *, enabled: bool = True) -> Injector:
        """An injector applying the windows for ``target`` (every window for ``None``)."""
        if target is not None and not isinstance(target, str):
            raise TypeError(f"Timeline.injector: target must be a str or None, got {shown(target)}")
        windows = tuple(w for w in self.windows if target is None or w.target in (None, target))
        name = self.name if target is None else f"{self.name}:{target}"
        return _TimelineInjector(self, windows, name, enabled)

    def __repr__(self) -> str:
        return f"Timeline({len(self.windows)} windows, name={self.name!r})"


class _TimelineInjector(Injector):
    __slots__ = ("_timeline", "_windows")

    def __init__(
        self, timeline: Timeline, windows: tuple[Window, ...], name: str, enabled: bool
    ) -> None:
        super().__init__(name, timeline._rng, enabled)
        self._timeline = timeline
        self._windows = windows

    def _pick(self) -> tuple[Injection, ...]:
        origin = self._timeline._origin
        if origin is None:
            return ()
        elapsed = clock.now() - origin
        rng = self._rng
        picked = tuple(
            w.injection
            for w in self._windows
            if w.covers(elapsed) and (w.rate >= 1.0 or rng.random() < w.rate)
        )
        if len(picked) > 1:
            # Waits first, whatever window opened first: a slow dependency that
            # then fails is slow *and* fails (the sort is stable: order kept).
            picked = tuple(sorted(picked, key=lambda i: not isinstance(i, Latency)))
        return picked

    def __repr__(self) -> str:
        state = "on" if self._on else "off"
        return f"<timeline injector {self.name!r}, {len(self._windows)} windows, {state}>"
