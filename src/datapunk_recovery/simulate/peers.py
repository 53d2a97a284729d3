"""The peers' default policies, as built-ins of the lab: what their users get in a storm.

Each built-in restates a peer's documented defaults (formulas and figures,
not code) with the library's configurations, so that ``simulate contention``
and ``simulate outage`` can set them beside ours:

- ``tenacity``: ``@retry(wait=wait_exponential_jitter())`` with tenacity's
  defaults: ``min(max, initial * exp_base**(n - 1) + uniform(0, jitter))``
  with initial 1 s, exp_base 2, jitter 1 s, max 60 s; no stop, so it retries
  for ever.
- ``tenacity-bare``: a bare ``@retry``: for ever, without any wait.
- ``stamina``: ``stamina.retry(on=...)`` defaults: 10 attempts within 45 s,
  ``min(wait_max, wait_initial * wait_exp_base**(n - 1) + uniform(0,
  wait_jitter))`` with 0.1 s, 2, 1 s, 5 s.
- ``backoff``: ``on_exception(expo, ..., jitter=full_jitter)`` defaults:
  ``uniform(0, 2**(n - 1))`` seconds, no cap, no limit on tries or time.
- ``aws``: the AWS SDKs' standard retry mode: 3 attempts,
  ``uniform(0, min(20 s, 2**(n - 1) s))``, and the retry quota (500 tokens,
  5 a retry, 1 back per first-try success).
- ``grpc``: gRPC's retry policy as its proposal (A6) shows it: 4 attempts,
  ``uniform(0, min(1 s, 0.1 s * 2**(n - 1)))``, with retry throttling of 10
  tokens, ratio 0.1 (retries while more than half are left).  gRPC has no
  retry by default: this is the documented example.
- ``polly``: Polly v8's retry with ``BackoffType.Exponential`` and
  ``UseJitter`` (its DecorrelatedJitterV2) on the default 3 retries and 2 s
  delay (no ``MaxDelay``), behind Polly's default circuit breaker: failure
  ratio 0.1 over 30 s, minimum throughput 100, break 5 s, one probe.
- ``resilience4j``: resilience4j's default retry (3 attempts, a fixed 500 ms
  wait) behind its default circuit breaker: failure rate 50% over a count
  window of 100 calls, minimum 100 calls, slow calls over 60 s at 100%, open
  60 s, 10 probes judged by rate, no time limit in half-open.

Numbers without a cap in the peer use `UNCAPPED` seconds, far beyond
anything the lab reaches; "for ever" uses a deadline of `FOREVER`.
"""

from __future__ import annotations

from typing import Final

from .._core.backoff import Jitter, RetryConfig
from ..breaker import BreakerConfig, WindowKind
from ..budget import TokenBudgetConfig
from .policies import AdditiveJitter, RetryQuotaConfig, SimPolicy

__all__ = ["FOREVER", "UNCAPPED", "RetryQuota", "peer_policies"]

#: Seconds standing for "no cap" (a delay the lab never reaches).
UNCAPPED: Final = 3600.0
#: Seconds standing for "no limit" on a retrying call's time (one day).
FOREVER: Final = 86400.0


def peer_policies() -> dict[str, SimPolicy]:
    """The peers' defaults as named policies (see the module documentation)."""
    return {
        "tenacity": SimPolicy(
            retry=RetryConfig(max_attempts=None, deadline=FOREVER, base_delay=1.0, max_delay=60.0),
            additive=AdditiveJitter(jitter=1.0),
            description="tenacity wait_exponential_jitter() defaults, no stop (for ever)",
        ),
        "tenacity-bare": SimPolicy(
            retry=RetryConfig(max_attempts=None, deadline=FOREVER, base_delay=0.0, max_delay=0.0),
            description="tenacity bare @retry: for ever, no wait",
        ),
        "stamina": SimPolicy(
            retry=RetryConfig(max_attempts=10, deadline=45.0, base_delay=0.1, max_delay=5.0),
            additive=AdditiveJitter(jitter=1.0),
            description="stamina defaults: 10 attempts, 45 s, 0.1 s x 2**n + U(0, 1 s), cap 5 s",
        ),
        "backoff": SimPolicy(
            retry=RetryConfig(
                max_attempts=None, deadline=FOREVER, base_delay=1.0, max_delay=UNCAPPED
            ),
            description="backoff on_exception(expo, jitter=full_jitter): U(0, 2**n s), for ever",
        ),
        "aws": SimPolicy(
            retry=RetryConfig(max_attempts=3, base_delay=1.0, max_delay=20.0),
            retry_quota=RetryQuotaConfig(),
            description="AWS SDK standard mode: 3 attempts, full jitter 1 s..20 s, retry quota",
        ),
        "grpc": SimPolicy(
            retry=RetryConfig(max_attempts=4, base_delay=0.1, max_delay=1.0),
            token_budget=TokenBudgetConfig(max_tokens=10.0, token_ratio=0.1),
            description="gRPC retry policy (A6 example) with retry throttling 10 / 0.1",
        ),
        "polly": SimPolicy(
            retry=RetryConfig(
                max_attempts=4,
                base_delay=2.0,
                max_delay=UNCAPPED,
                jitter=Jitter.DECORRELATED_V2,
            ),
            breaker=BreakerConfig(
                consecutive_failures=None,
                failure_rate_threshold=0.1,
                window=WindowKind.TIME,
                window_duration=30.0,
                window_buckets=10,
                minimum_calls=100,
                open_duration=5.0,
                max_open_duration=5.0,
                half_open_permits=1,
                half_open_timeout=None,
            ),
            description="Polly v8: 3 retries, DecorrelatedJitterV2 from 2 s; breaker 10%/30 s/5 s",
        ),
        "resilience4j": SimPolicy(
            retry=RetryConfig(max_attempts=3, base_delay=0.5, max_delay=0.5, jitter=Jitter.NONE),
            breaker=BreakerConfig(
                consecutive_failures=None,
                failure_rate_threshold=0.5,
                slow_call_rate_threshold=1.0,
                slow_call_duration=60.0,
                window_size=100,
                minimum_calls=100,
                open_duration=60.0,
                max_open_duration=60.0,
                half_open_permits=10,
                half_open_timeout=None,
                half_open_decision="rate",
            ),
            description="resilience4j: 3 attempts 500 ms apart; breaker 50%/100 calls/60 s",
        ),
    }


class RetryQuota:
    """The AWS SDKs' retry quota as a [`RetryGate`][datapunk_recovery.budget.RetryGate].

    ``allow_retry`` takes ``retry_cost`` tokens when that many are left.  A
    success puts ``no_retry_increment`` back, or, while retries granted by
    this quota await their outcome, the cost of one of them.  (The gate sees
    outcomes, not which request they belong to: the next outcome after a
    granted retry is taken as that retry's.)
    Simulation-only: not a primitive of the library.
    """

    __slots__ = ("config", "outstanding", "tokens")

    def __init__(self, config: RetryQuotaConfig) -> None:
        self.config = config
        self.tokens = config.capacity
        self.outstanding = 0

    def on_attempt(self, succeeded: bool) -> None:
        """A success refills the quota; a failure costs nothing by itself."""
        config = self.config
        retried = self.outstanding > 0
        if retried:
            self.outstanding -= 1  # (the outcome of a retry in flight, as far as we can tell)
        if succeeded:
            gain = config.retry_cost if retried else config.no_retry_increment
            self.tokens = min(config.capacity, self.tokens + gain)

    def allow_retry(self) -> bool:
        """Take ``retry_cost`` tokens if the quota has them."""
        cost = self.config.retry_cost
        if self.tokens < cost:
            return False
        self.tokens -= cost
        self.outstanding += 1
        return True
