"""RetryConfig and the backoff family: validation, formulas, bounds, determinism."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datapunk_recovery import Jitter, RetryConfig, server_delay

# -- validation -----------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    c = RetryConfig()
    assert (c.max_attempts, c.base_delay, c.max_delay, c.exponential_base) == (3, 0.1, 10.0, 2.0)
    assert (c.jitter, c.jitter_factor, c.deadline, c.max_server_delay) == (
        Jitter.FULL,
        0.2,
        None,
        300.0,
    )


@pytest.mark.parametrize(
    ("changes", "error", "field"),
    [
        ({"max_attempts": 0}, ValueError, "max_attempts"),
        ({"max_attempts": "3"}, TypeError, "max_attempts"),
        ({"max_attempts": True}, TypeError, "max_attempts"),
        ({"max_attempts": 2.5}, TypeError, "max_attempts"),
        ({"base_delay": -0.1}, ValueError, "base_delay"),
        ({"base_delay": math.nan}, ValueError, "base_delay"),
        ({"base_delay": "0.1"}, TypeError, "base_delay"),
        ({"max_delay": math.inf}, ValueError, "max_delay"),
        ({"base_delay": 5.0, "max_delay": 1.0}, ValueError, "max_delay"),
        ({"exponential_base": 0.5}, ValueError, "exponential_base"),
        ({"jitter": "sideways"}, ValueError, "jitter"),
        ({"jitter_factor": 1.5}, ValueError, "jitter_factor"),
        ({"deadline": 0}, ValueError, "deadline"),
        ({"deadline": -1.0}, ValueError, "deadline"),
        ({"max_attempts": None}, ValueError, "deadline"),
        ({"max_server_delay": -5}, ValueError, "max_server_delay"),
    ],
)
def test_bad_values_name_the_field_and_the_value(
    changes: dict[str, object], error: type[Exception], field: str
) -> None:
    with pytest.raises(error) as info:
        RetryConfig(**changes)  # type: ignore[arg-type]
    assert f"RetryConfig.{field}" in str(info.value)
    if field != "deadline" or "max_attempts" not in changes:
        assert repr(next(iter(changes.values()))) in str(info.value) or field == "max_delay"


def test_jitter_accepts_its_string_name() -> None:
    assert RetryConfig(jitter="decorrelated").jitter is Jitter.DECORRELATED  # type: ignore[arg-type]


def test_unbounded_attempts_need_a_deadline() -> None:
    c = RetryConfig(max_attempts=None, deadline=5.0)
    assert list(itertools.islice(c.delays(random.Random(1)), 50)) != []


# -- formulas --------------------------------------------------------------------


def test_envelope_is_exponential_and_capped() -> None:
    c = RetryConfig(base_delay=0.5, max_delay=3.0, exponential_base=2.0, max_attempts=10)
    assert [c.envelope(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert c.envelope(10_000) == 3.0  # no OverflowError far past the cap


def test_no_jitter_yields_the_envelope() -> None:
    c = RetryConfig(jitter=Jitter.NONE, base_delay=0.1, max_attempts=5)
    assert list(c.delays()) == pytest.approx([0.1, 0.2, 0.4, 0.8])


def test_delays_yields_one_per_retry() -> None:
    assert len(list(RetryConfig(max_attempts=1).delays())) == 0
    assert len(list(RetryConfig(max_attempts=7).delays())) == 6


def test_equal_jitter_never_goes_below_half_the_envelope() -> None:
    c = RetryConfig(jitter=Jitter.EQUAL, base_delay=1.0, max_delay=64.0, max_attempts=8)
    rng = random.Random(3)
    for _ in range(200):
        for n, d in enumerate(c.delays(rng), start=1):
            assert c.envelope(n) / 2 <= d <= c.envelope(n)


def test_proportional_jitter_stays_within_its_factor() -> None:
    c = RetryConfig(jitter=Jitter.PROPORTIONAL, jitter_factor=0.25, base_delay=1.0, max_attempts=4)
    rng = random.Random(5)
    for _ in range(200):
        for n, d in enumerate(c.delays(rng), start=1):
            assert 0.75 * c.envelope(n) <= d <= min(c.max_delay, 1.25 * c.envelope(n))


def test_decorrelated_piles_up_at_the_cap() -> None:
    # Once the previous delay is the cap, uniform(base, 3 * cap) lands at or
    # above the cap with probability (3 cap - cap) / (3 cap - base): about 2/3.
    c = RetryConfig(
        jitter=Jitter.DECORRELATED, base_delay=1.0, max_delay=10.0, max_attempts=None, deadline=1.0
    )
    draws = list(itertools.islice(c.delays(random.Random(7)), 20000))
    after_cap = [b for a, b in itertools.pairwise(draws) if a == 10.0]
    share = sum(d == 10.0 for d in after_cap) / len(after_cap)
    assert share == pytest.approx(20 / 29, abs=0.03)


def test_decorrelated_v2_medians_follow_polly() -> None:
    c = RetryConfig(jitter=Jitter.DECORRELATED_V2, base_delay=1.0, max_delay=1000.0, max_attempts=6)
    rng = random.Random(11)
    runs = [list(c.delays(rng)) for _ in range(4000)]
    medians = [statistics.median(run[i] for run in runs) for i in range(5)]
    # Polly's documented shape: about 0.9, 1.2, 2, 4, 8 x base.
    for got, want in zip(medians, [0.9, 1.2, 2.0, 4.0, 8.0], strict=True):
        assert want * 0.7 <= got <= want * 1.3


def test_compute_delay_refuses_stateful_kinds_and_bad_numbers() -> None:
    with pytest.raises(ValueError, match="delays"):
        RetryConfig(jitter=Jitter.DECORRELATED).compute_delay(1)
    with pytest.raises(ValueError, match="retry number"):
        RetryConfig().compute_delay(0)


def test_a_zero_base_delay_gives_zero_delays_for_every_kind() -> None:
    for kind in Jitter:
        c = RetryConfig(jitter=kind, base_delay=0.0, max_delay=0.0, max_attempts=5)
        assert list(c.delays(random.Random(0))) == [0.0] * 4


# -- properties ------------------------------------------------------------------

configs = st.builds(
    RetryConfig,
    max_attempts=st.integers(1, 40),
    base_delay=st.floats(0.0, 5.0),
    max_delay=st.floats(5.0, 600.0),
    exponential_base=st.floats(1.0, 10.0),
    jitter=st.sampled_from(list(Jitter)),
    jitter_factor=st.floats(0.0, 1.0),
)


@given(configs, st.integers(0, 2**32 - 1))
def test_every_delay_is_within_zero_and_the_cap(config: RetryConfig, seed: int) -> None:
    delays = list(config.delays(random.Random(seed)))
    assert len(delays) == config.max_attempts - 1  # type: ignore[operator]
    assert all(0.0 <= d <= config.max_delay for d in delays)
    assert all(math.isfinite(d) for d in delays)


@given(configs, st.integers(0, 2**32 - 1))
def test_a_seeded_rng_makes_delays_reproducible(config: RetryConfig, seed: int) -> None:
    assert list(config.delays(random.Random(seed))) == list(config.delays(random.Random(seed)))


@given(configs, st.integers(0, 2**32 - 1))
def test_decorrelated_stays_within_base_and_cap(config: RetryConfig, seed: int) -> None:
    c = RetryConfig(
        max_attempts=config.max_attempts,
        base_delay=config.base_delay,
        max_delay=config.max_delay,
        jitter=Jitter.DECORRELATED,
    )
    assert all(c.base_delay <= d <= c.max_delay for d in c.delays(random.Random(seed)))


def test_two_iterators_of_a_stateful_kind_do_not_disturb_each_other() -> None:
    c = RetryConfig(jitter=Jitter.DECORRELATED, max_attempts=6)
    a, b = c.delays(random.Random(1)), c.delays(random.Random(1))
    first = [next(a), next(a)]
    assert [next(b), next(b)] == first


# -- the server-given delay rule ---------------------------------------------------


def test_a_hint_longer_than_the_computed_delay_wins_uncut() -> None:
    d = server_delay(0.5, 30.0, RetryConfig(max_delay=10.0), None)
    assert (d.delay, d.from_server, d.give_up) == (30.0, True, False)


def test_a_shorter_hint_does_not_shorten_the_backoff() -> None:
    d = server_delay(2.0, 1.0, RetryConfig(), None)
    assert (d.delay, d.from_server) == (2.0, False)


@pytest.mark.parametrize("hint", [400.0, 1e12])
def test_an_absurd_hint_means_give_up(hint: float) -> None:
    assert server_delay(0.1, hint, RetryConfig(), None).give_up


def test_a_hint_beyond_the_remaining_deadline_means_give_up() -> None:
    assert server_delay(0.1, 5.0, RetryConfig(), remaining=4.0).give_up


@pytest.mark.parametrize("hint", [math.nan, math.inf, -1.0, "soon", True, object()])
def test_a_garbage_hint_is_ignored(hint: object) -> None:
    d = server_delay(0.25, hint, RetryConfig(), None)
    assert (d.delay, d.from_server, d.ignored, d.give_up) == (0.25, False, True, False)
