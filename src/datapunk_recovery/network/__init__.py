"""Network recovery: routing over prioritised endpoints, server delays, HTTP adapters.

- [`router`][datapunk_recovery.network.router]: endpoints with priorities and breakers; selection,
  failover,
  priority fallthrough, hedging across endpoints, run-time re-routing.
- [`delays`][datapunk_recovery.network.delays]: ``Retry-After``, ``X-RateLimit-Reset`` and
  ``grpc-retry-pushback-ms`` parsed into the core's delay hint.
- [`http`][datapunk_recovery.network.http]: status-aware retries, "overloaded, don't retry", the
  remaining deadline sent downstream; shared by the adapters
  [`datapunk_recovery.network.httpx`][datapunk_recovery.network.httpx] and
  [`datapunk_recovery.network.aiohttp`][datapunk_recovery.network.aiohttp] (imported on demand).
"""

from __future__ import annotations

from .delays import (
    ServerHint,
    parse_grpc_pushback,
    parse_rate_limit_reset,
    parse_retry_after,
    server_hint,
)
from .router import (
    AllEndpointsDown,
    Endpoint,
    EndpointFailed,
    EndpointState,
    FailedOver,
    NoHedgeTarget,
    PriorityFallthrough,
    Router,
    RouterConfig,
    RoutingChanged,
)

__all__ = [
    "AllEndpointsDown",
    "Endpoint",
    "EndpointFailed",
    "EndpointState",
    "FailedOver",
    "NoHedgeTarget",
    "PriorityFallthrough",
    "Router",
    "RouterConfig",
    "RoutingChanged",
    "ServerHint",
    "parse_grpc_pushback",
    "parse_rate_limit_reset",
    "parse_retry_after",
    "server_hint",
]
