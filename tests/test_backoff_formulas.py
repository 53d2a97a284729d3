"""The backoff family pinned to its formulas, not only to its bounds.

Each jitter kind is sampled many times from seeded generators (no luck: the
same numbers every run) and its mean and spread are compared with the
formula's; the stateful kinds are replayed draw by draw against the formula.
Every read of a delay generator is bounded with ``itertools.islice``, so a
generator that never ends fails the test instead of hanging it.
"""

from __future__ import annotations

import math
import random
import statistics
from itertools import islice

import pytest

from datapunk_recovery import Jitter, RetryConfig, ServerDelay, server_delay

SAMPLES = 4000


def draws(config: RetryConfig, retry: int, seed: int) -> list[float]:
    """``SAMPLES`` delays of retry ``retry`` from one seeded generator."""
    rng = random.Random(seed)
    out = []
    for _ in range(SAMPLES):
        seq = list(islice(config.delays(rng), retry))
        out.append(seq[retry - 1])
    return out


def uniform_stats(low: float, high: float) -> tuple[float, float]:
    """The mean and standard deviation of ``uniform(low, high)``."""
    return (low + high) / 2, (high - low) / math.sqrt(12)


def assert_uniform(samples: list[float], low: float, high: float) -> None:
    mean, spread = uniform_stats(low, high)
    width = high - low
    assert statistics.fmean(samples) == pytest.approx(mean, abs=0.02 * width)
    assert statistics.pstdev(samples) == pytest.approx(spread, abs=0.02 * width)
    # The whole window is used, from its floor to its ceiling.
    assert low <= min(samples) <= low + 0.01 * width
    assert high - 0.01 * width <= max(samples) <= high


# -- the stateless kinds: mean and spread against the formula -------------------


@pytest.mark.parametrize("retry", [1, 3, 6])
def test_full_jitter_is_uniform_between_zero_and_the_envelope(retry: int) -> None:
    c = RetryConfig(base_delay=1.0, max_delay=20.0, max_attempts=8)
    e = c.envelope(retry)  # 1, 4, then capped at 20
    assert_uniform(draws(c, retry, seed=retry), 0.0, e)


@pytest.mark.parametrize("retry", [1, 4])
def test_equal_jitter_is_uniform_over_the_upper_half_of_the_envelope(retry: int) -> None:
    c = RetryConfig(jitter=Jitter.EQUAL, base_delay=2.0, max_delay=60.0, max_attempts=6)
    e = c.envelope(retry)
    assert_uniform(draws(c, retry, seed=10 + retry), e / 2, e)


@pytest.mark.parametrize("retry", [1, 3])
def test_proportional_jitter_spreads_the_envelope_by_its_factor(retry: int) -> None:
    c = RetryConfig(
        jitter=Jitter.PROPORTIONAL,
        jitter_factor=0.3,
        base_delay=1.0,
        max_delay=60.0,
        max_attempts=5,
    )
    e = c.envelope(retry)
    assert_uniform(draws(c, retry, seed=20 + retry), 0.7 * e, 1.3 * e)


def test_proportional_jitter_is_capped_at_max_delay() -> None:
    c = RetryConfig(
        jitter=Jitter.PROPORTIONAL,
        jitter_factor=0.5,
        base_delay=8.0,
        max_delay=10.0,
        max_attempts=3,
    )
    samples = draws(c, 2, seed=3)  # envelope 10, drawn from [5, 15], cut at 10
    assert max(samples) == 10.0
    assert sum(d == 10.0 for d in samples) / SAMPLES == pytest.approx(0.5, abs=0.03)
    assert min(samples) == pytest.approx(5.0, abs=0.05)


def test_no_jitter_is_the_envelope_itself() -> None:
    c = RetryConfig(jitter=Jitter.NONE, base_delay=0.5, max_delay=3.0, max_attempts=7)
    assert list(islice(c.delays(random.Random(1)), 10)) == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_the_envelope_reaches_and_keeps_the_cap() -> None:
    c = RetryConfig(base_delay=1.0, max_delay=8.0, exponential_base=3.0, max_attempts=5)
    assert [c.envelope(n) for n in (1, 2, 3, 4)] == [1.0, 3.0, 8.0, 8.0]


# -- compute_delay ----------------------------------------------------------------


def test_compute_delay_draws_the_given_retry_from_the_given_rng() -> None:
    c = RetryConfig(base_delay=1.0, max_delay=100.0, max_attempts=10)
    for n in (1, 2, 5):
        expected = random.Random(n).uniform(0.0, c.envelope(n))
        assert c.compute_delay(n, random.Random(n)) == expected


def test_compute_delay_refuses_a_bool_retry_number() -> None:
    with pytest.raises(ValueError, match="retry number"):
        RetryConfig().compute_delay(True)
    with pytest.raises(ValueError, match="retry number"):
        RetryConfig().compute_delay(1.0)  # type: ignore[arg-type]


def test_compute_delay_points_the_stateful_kinds_to_delays() -> None:
    for kind in (Jitter.DECORRELATED, Jitter.DECORRELATED_V2):
        with pytest.raises(ValueError) as info:
            RetryConfig(jitter=kind).compute_delay(1)
        assert str(info.value) == (
            f"compute_delay: jitter {kind.value!r} depends on the previous delay; "
            "use RetryConfig.delays()"
        )


def test_a_bad_jitter_names_every_kind() -> None:
    with pytest.raises(ValueError) as info:
        RetryConfig(jitter="sideways")  # type: ignore[arg-type]
    assert "expected one of none, full, equal, decorrelated, decorrelated_v2, proportional" in str(
        info.value
    )


@pytest.mark.parametrize(
    ("kind", "stateful"),
    [
        (Jitter.NONE, False),
        (Jitter.FULL, False),
        (Jitter.EQUAL, False),
        (Jitter.PROPORTIONAL, False),
        (Jitter.DECORRELATED, True),
        (Jitter.DECORRELATED_V2, True),
    ],
)
def test_only_the_decorrelated_kinds_are_stateful(kind: Jitter, stateful: bool) -> None:
    assert RetryConfig(jitter=kind).stateful is stateful


# -- the number of delays: bounded reads, so a runaway generator fails fast -------------


@pytest.mark.parametrize("kind", list(Jitter))
@pytest.mark.parametrize("attempts", [1, 2, 5])
def test_delays_yields_exactly_one_delay_per_retry(kind: Jitter, attempts: int) -> None:
    c = RetryConfig(jitter=kind, max_attempts=attempts)
    assert len(list(islice(c.delays(random.Random(0)), 50))) == attempts - 1


@pytest.mark.parametrize("kind", list(Jitter))
def test_unbounded_attempts_yield_delays_endlessly(kind: Jitter) -> None:
    c = RetryConfig(jitter=kind, max_attempts=None, deadline=60.0)
    assert len(list(islice(c.delays(random.Random(0)), 500))) == 500


# -- the stateful kinds: replayed against the formula -----------------------------


def test_decorrelated_follows_its_formula_draw_by_draw() -> None:
    c = RetryConfig(jitter=Jitter.DECORRELATED, base_delay=0.5, max_delay=7.0, max_attempts=40)
    got = list(islice(c.delays(random.Random(42)), 100))
    replay, previous = random.Random(42), 0.5
    expected = []
    for _ in range(39):
        previous = min(7.0, replay.uniform(0.5, 3 * previous))
        expected.append(previous)
    assert got == expected


def test_decorrelated_first_window_is_base_to_three_times_base() -> None:
    c = RetryConfig(jitter=Jitter.DECORRELATED, base_delay=1.0, max_delay=100.0, max_attempts=2)
    assert_uniform(draws(c, 1, seed=5), 1.0, 3.0)


def test_decorrelated_v2_follows_its_formula_draw_by_draw() -> None:
    c = RetryConfig(jitter=Jitter.DECORRELATED_V2, base_delay=0.2, max_delay=50.0, max_attempts=30)
    got = list(islice(c.delays(random.Random(9)), 100))
    replay, previous, expected = random.Random(9), 0.0, []
    for i in range(29):
        t = i + replay.random()
        nxt = 2.0**t * math.tanh(math.sqrt(4.0 * t))
        expected.append(min(50.0, max(0.0, (nxt - previous) / 1.4 * 0.2)))
        previous = nxt
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[-1] == 50.0  # the cap is reached


def test_decorrelated_v2_first_delay_median() -> None:
    # t = U(0, 1): the median first delay is 2**0.5 * tanh(sqrt(2)) / 1.4 x base.
    c = RetryConfig(jitter=Jitter.DECORRELATED_V2, base_delay=1.0, max_delay=100.0, max_attempts=2)
    want = 2**0.5 * math.tanh(math.sqrt(2.0)) / 1.4
    assert statistics.median(draws(c, 1, seed=4)) == pytest.approx(want, rel=0.02)


def test_decorrelated_v2_far_past_the_overflow_point_yields_the_cap() -> None:
    c = RetryConfig(
        jitter=Jitter.DECORRELATED_V2,
        base_delay=1.0,
        max_delay=9.0,
        max_attempts=None,
        deadline=1.0,
    )
    seq = list(islice(c.delays(random.Random(2)), 1005))
    assert seq[-5:] == [9.0] * 5
    assert all(math.isfinite(d) and 0.0 <= d <= 9.0 for d in seq)


# -- the server-given delay rule, exactly --------------------------------------------


def test_no_hint_keeps_the_computed_delay() -> None:
    assert server_delay(1.5, None, RetryConfig(), None) == ServerDelay(1.5, False)


def test_a_hint_equal_to_the_computed_delay_comes_from_the_server() -> None:
    assert server_delay(2.0, 2.0, RetryConfig(), None) == ServerDelay(2.0, True)


def test_a_zero_or_small_hint_is_valid() -> None:
    assert server_delay(0.0, 0, RetryConfig(), None) == ServerDelay(0.0, True)
    assert server_delay(0.1, 0.5, RetryConfig(), None) == ServerDelay(0.5, True)


def test_a_hint_of_exactly_the_limits_is_obeyed() -> None:
    config = RetryConfig(max_server_delay=30.0)
    assert server_delay(0.1, 30, config, None) == ServerDelay(30.0, True)
    assert server_delay(0.1, 4.0, config, remaining=4.0) == ServerDelay(4.0, True)


def test_a_hint_past_the_limits_gives_up_with_the_servers_delay() -> None:
    config = RetryConfig(max_server_delay=30.0)
    assert server_delay(0.1, 31, config, None) == ServerDelay(31.0, True, give_up=True)
    assert server_delay(0.1, 4.5, config, 4.0) == ServerDelay(4.5, True, give_up=True)


def test_an_integer_hint_too_large_for_a_float_gives_up() -> None:
    d = server_delay(0.1, 10**400, RetryConfig(), None)
    assert d == ServerDelay(math.inf, True, give_up=True)
    assert (d.from_server, d.give_up, d.ignored) == (True, True, False)
