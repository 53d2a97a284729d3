"""``Chaos``: the injector that injects one thing into a fraction of the calls."""

from __future__ import annotations

import random

from .._core.validate import check_fraction
from ._injections import Injection, _check_injection
from ._injector import Injector, _rng_of


class Chaos(Injector):
    """Inject one thing into a fraction ``rate`` (0..1) of the calls.

    ``seed`` (or a ready ``rng``) makes the choice of calls reproducible; a
    rate of 1 injects every call without drawing.  ``name`` names the
    injector in events and in the mark on injected faults
    ([`injected_by()`][datapunk_recovery.chaos.injected_by]).  ``enabled=False`` builds it switched
    off.
    """

    __slots__ = ("_injected", "injection", "rate")

    def __init__(
        self,
        injection: Injection,
        *,
        rate: float = 1.0,
        seed: int | None = None,
        rng: random.Random | None = None,
        name: str = "chaos",
        enabled: bool = True,
    ) -> None:
        super().__init__(name, _rng_of("Chaos", seed, rng), enabled)
        self.injection = _check_injection("Chaos.injection", injection)
        self.rate = check_fraction("Chaos", "rate", rate)
        self._injected: tuple[Injection, ...] = (self.injection,)

    def _pick(self) -> tuple[Injection, ...]:
        rate = self.rate
        if rate >= 1.0 or (rate > 0.0 and self._rng.random() < rate):
            return self._injected
        return ()

    def __repr__(self) -> str:
        state = "on" if self._on else "off"
        return f"Chaos({self.injection!r}, rate={self.rate:g}, name={self.name!r}, {state})"
