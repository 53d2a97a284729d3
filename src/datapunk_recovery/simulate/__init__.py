"""The retry-storm lab: what a policy does under contention and through an outage.

A discrete-event simulation ([`kernel`][datapunk_recovery.simulate.kernel]) on the library's fake
clock runs
the library's own code —
[`RetryConfig.delays()`][datapunk_recovery._core.backoff.RetryConfig.delays], the
retry budgets, the
circuit breaker — for many simulated clients at once, seeded and
deterministic, far faster than real time:

- [`contention`][datapunk_recovery.simulate.contention]: N clients update one record with optimistic
  concurrency (the AWS "Exponential Backoff And Jitter" benchmark);
- [`outage`][datapunk_recovery.simulate.outage]: steady traffic to a dependency that goes down for a
  while;
- [`policies`][datapunk_recovery.simulate.policies]: named built-ins and TOML policy files;
- [`peers`][datapunk_recovery.simulate.peers]: the peers' default policies (tenacity, stamina,
  backoff, the
  AWS SDKs, gRPC, Polly, resilience4j) as built-ins;
- [`report`][datapunk_recovery.simulate.report]: tables, JSON and plots.

``datapunk-recovery simulate`` is the command line over it; see
[docs/simulate.md](https://datapunk.github.io/datapunk-recovery/simulate/).
"""

from __future__ import annotations

from .catalog import builtin_policies, resolve_policies
from .contention import ContentionPoint, ContentionSetup, run_contention, simulate_contention
from .kernel import Simulation
from .outage import OutageResult, OutageSetup, Second, run_outage, simulate_outage
from .policies import DEFAULT_POLICY, SimPolicy, load_policies

__all__ = [
    "DEFAULT_POLICY",
    "ContentionPoint",
    "ContentionSetup",
    "OutageResult",
    "OutageSetup",
    "Second",
    "SimPolicy",
    "Simulation",
    "builtin_policies",
    "load_policies",
    "resolve_policies",
    "run_contention",
    "run_outage",
    "simulate_contention",
    "simulate_outage",
]
