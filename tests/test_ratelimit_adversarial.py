"""Adversarial drills on per-caller rate limits: more callers than tracked never reset a quota.

``max_callers`` bounds the per-caller buckets kept.  A drill author brings
more busy callers than that: forgetting a caller whose bucket is spent would
hand it a fresh burst the next time it calls.
"""

from __future__ import annotations

from datapunk_recovery.flow.ratelimit import RateLimiter, RateLimiterConfig
from datapunk_recovery.testing import fake_clock


def test_a_busy_caller_is_never_forgotten_into_a_fresh_burst() -> None:
    config = RateLimiterConfig(
        rate=1000, burst=1000, per_caller_rate=1, per_caller_burst=1, max_callers=2
    )
    with fake_clock():
        limiter = RateLimiter("api", config)
        assert limiter.try_acquire("a") and limiter.try_acquire("b")  # both spent
        assert limiter.try_acquire("c")  # a third caller while both are busy
        assert not limiter.try_acquire("a")  # still spent: no fresh burst
        assert not limiter.try_acquire("b")


def test_callers_past_the_bound_share_one_quota_until_a_bucket_goes_idle() -> None:
    config = RateLimiterConfig(
        rate=1000, burst=1000, per_caller_rate=1, per_caller_burst=1, max_callers=1
    )
    with fake_clock() as clock:
        limiter = RateLimiter("api", config)
        assert limiter.try_acquire("a")
        assert limiter.try_acquire("b")  # past the bound: the overflow quota
        assert not limiter.try_acquire("c")  # the same overflow quota, spent
        assert not limiter.try_acquire("a")
        clock.advance(10.0)  # everyone idle again: room for a bucket of its own
        assert limiter.try_acquire("c") and not limiter.try_acquire("c")


def test_a_per_caller_quota_removed_and_restored_still_counts_what_was_spent() -> None:
    quota = RateLimiterConfig(rate=1000, burst=1000, per_caller_rate=1, per_caller_burst=1)
    with fake_clock():
        limiter = RateLimiter("api", quota)
        assert limiter.try_acquire("a")  # its quota is spent
        limiter.reconfigure(RateLimiterConfig(rate=1000, burst=1000))  # no quota a moment
        limiter.reconfigure(quota)  # back, within the same second
        assert not limiter.try_acquire("a")  # no fresh burst
