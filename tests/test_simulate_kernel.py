"""The simulation kernel: events in time order on the library's fake clock, seeded."""

from __future__ import annotations

import pytest

from datapunk_recovery._core import clock
from datapunk_recovery.simulate.kernel import Simulation, network_delay


def test_events_run_in_time_order_and_ties_in_scheduling_order() -> None:
    sim = Simulation(0)
    seen: list[tuple[str, float]] = []
    for name, when in [("c", 2.0), ("a", 1.0), ("b1", 1.5), ("b2", 1.5)]:
        sim.at(when, lambda name=name: seen.append((name, sim.now)))
    assert sim.run() == 2.0
    assert seen == [("a", 1.0), ("b1", 1.5), ("b2", 1.5), ("c", 2.0)]


def test_an_event_can_schedule_more_events_relative_to_now() -> None:
    sim = Simulation(0)
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(sim.now)
        if len(ticks) < 3:
            sim.after(0.5, tick)

    sim.after(1.0, tick)
    sim.run()
    assert ticks == [1.0, 1.5, 2.0]


def test_the_library_clock_is_the_simulated_one_only_while_running() -> None:
    sim = Simulation(0)
    readings: list[float] = []
    sim.at(3.0, lambda: readings.append(clock.now()))
    before = clock.current_fake()
    sim.run()
    assert readings == [3.0]
    assert clock.current_fake() is before


def test_run_until_stops_at_that_time_and_can_resume() -> None:
    sim = Simulation(0)
    seen: list[float] = []
    for when in (1.0, 5.0):
        sim.at(when, lambda: seen.append(sim.now))
    assert sim.run(until=2.0) == 2.0
    assert seen == [1.0]
    sim.run()
    assert seen == [1.0, 5.0]


def test_the_past_cannot_be_scheduled() -> None:
    sim = Simulation(0)
    sim.at(1.0, lambda: None)
    sim.run()
    with pytest.raises(ValueError, match="in the past"):
        sim.at(0.5, lambda: None)


def test_a_seed_fixes_every_draw() -> None:
    def draws(seed: int | str) -> list[float]:
        rng = Simulation(seed).rng
        return [network_delay(rng) for _ in range(5)]

    assert draws("run:1") == draws("run:1")
    assert draws("run:1") != draws("run:2")
    assert all(d >= 0 for d in draws(7))
