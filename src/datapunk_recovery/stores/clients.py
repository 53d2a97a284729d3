"""``redis.asyncio`` clients from URLs: one server, a Redis Cluster or a Sentinel-managed master.

Shared by every module that talks to Redis (the cache, and the stores when
they accept the same URLs), so that a URL means the same client everywhere.
redis-py is imported lazily, only when a URL is turned into a client.

URL forms (``timeout`` seconds becomes the socket and connect timeouts):

- ``redis://``, ``rediss://``, ``unix://``: one server (``Redis.from_url``).
- ``redis+cluster://[user:pw@]host:port[,host:port...]``: a Redis Cluster
  found through those startup nodes (database 0 only).
- ``redis+sentinel://[user:pw@]host:port[,host:port...]/service[/db]``: the
  master of ``service`` as the sentinels name it; the credentials are the
  data nodes', ``sentinel_kwargs={...}`` gives the sentinels' own.
- ``rediss+cluster://`` / ``rediss+sentinel://``: the same over TLS.
"""

from __future__ import annotations

from functools import cache
from typing import Any
from urllib.parse import unquote, urlsplit

from datapunk_recovery._core.extras import raise_missing
from datapunk_recovery._core.validate import shown

__all__ = ["client_from_url", "is_cluster", "no_hidden_resend"]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is a ``redis.asyncio.cluster.RedisCluster``."""
    try:
        from redis.asyncio.cluster import RedisCluster
    except ImportError:  # pragma: no cover - no redis-py, so no cluster client either
        return False
    return isinstance(client, RedisCluster)


def no_hidden_resend(client: Any) -> None:
    """Turn off ``client``'s own re-sending of a command whose connection failed.

    redis-py (6 and later) re-sends a command after a connection error or a
    timeout, up to ten times for a ``Redis(host=..., port=...)`` or a
    ``RedisCluster``: when Redis had run the command and only the reply was
    lost, the re-send runs it again, unseen by the caller.  With this, one
    command sent is at most one command run; the caller decides what a
    failure means.  Changes the client for every user of it (its connection
    pool's ``retry``).
    """
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    setter = getattr(client, "set_retry", None)
    if setter is not None:
        setter(Retry(NoBackoff(), 0))


def _hosts(
    netloc: str, scheme: str, owner: str
) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """``user:pw@h1:p1,h2:p2`` as ``([(h1, p1), (h2, p2)], user, pw)``; ValueError if malformed.

    The message names the malformed item only, never the credentials.
    """
    auth, _, hosts = netloc.rpartition("@")
    user = password = None
    if auth:
        name, sep, secret = auth.partition(":")
        user = unquote(name) or None
        password = unquote(secret) if sep else None
    default_port = 26379 if scheme in SENTINEL_SCHEMES else 6379
    found: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep:
            host, port = item.strip(), str(default_port)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{owner}.url: expected host:port items, got {shown(item.strip())}")
        found.append((host.strip("[]"), int(port)))
    return found, user, password


@cache
def _redis_py_version() -> str | None:
    """redis-py's own version, read once per process; None where redis-py reads it once itself.

    A redis-py with ``redis.driver_info`` (8.x here) builds a ``DriverInfo`` for
    every new connection unless given one, and that reads the package's
    metadata (``importlib.metadata.version``, a walk of ``sys.path``) every
    time: the cost of each connection a shared breaker or store opens on its
    first calls.  Earlier versions read it once, at import.
    """
    try:
        import redis.driver_info  # noqa: F401 - the redis-py that reads it per connection
        from redis.utils import get_lib_version
    except ImportError:
        return None
    return str(get_lib_version())  # type: ignore[no-untyped-call]


def _driver_info(client_kwargs: dict[str, Any]) -> None:
    """Give the client redis-py's own ``CLIENT SETINFO`` identity, its version read once.

    Nothing changes on the wire (the same name, the installed version); a
    caller's own ``driver_info``, ``lib_name`` or ``lib_version`` wins.  A new
    ``DriverInfo`` per client: redis-py's is mutable (``add_upstream_driver``).
    """
    if {"driver_info", "lib_name", "lib_version"} & client_kwargs.keys():
        return
    version = _redis_py_version()
    if version is not None:
        from redis.driver_info import DriverInfo

        client_kwargs["driver_info"] = DriverInfo(lib_version=version)


def client_from_url(
    url: str, *, timeout: float, owner: str, **client_kwargs: Any
) -> tuple[Any, list[Any]]:
    """A new client for ``url`` and the other clients to close with it (a Sentinel's).

    ``timeout`` (seconds, already validated) is the socket and connect
    timeout unless ``client_kwargs`` says otherwise; ``owner`` names the
    caller in error messages (``RedisCache``).
    """
    try:
        import redis.asyncio as aioredis
    except ImportError as exc:
        raise_missing(exc, owner, "redis", extra="redis")
    client_kwargs.setdefault("socket_timeout", timeout)
    client_kwargs.setdefault("socket_connect_timeout", timeout)
    _driver_info(client_kwargs)
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in CLUSTER_SCHEMES and scheme not in SENTINEL_SCHEMES:
        return aioredis.Redis.from_url(url, **client_kwargs), []
    parts = urlsplit(url)
    nodes, user, password = _hosts(parts.netloc, scheme, owner)
    if user is not None:
        client_kwargs.setdefault("username", user)
    if password is not None:
        client_kwargs.setdefault("password", password)
    if scheme.startswith("rediss"):
        client_kwargs.setdefault("ssl", True)
    path = [p for p in parts.path.split("/") if p]
    if scheme in CLUSTER_SCHEMES:
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        if path and path != ["0"]:
            raise ValueError(f"{owner}.url: a Redis Cluster has only database 0")
        startup = [ClusterNode(h, p) for h, p in nodes]
        return RedisCluster(startup_nodes=startup, **client_kwargs), []
    from redis.asyncio.sentinel import Sentinel

    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(
            f"{owner}.url: expected redis+sentinel://host:port[,host:port]/service[/db]"
        )
    sentinel_kwargs = client_kwargs.pop("sentinel_kwargs", None) or {
        "socket_timeout": client_kwargs["socket_timeout"],
        "socket_connect_timeout": client_kwargs["socket_connect_timeout"],
    }
    if len(path) == 2:
        client_kwargs.setdefault("db", int(path[1]))
    sentinel = Sentinel(nodes, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    return sentinel.master_for(unquote(path[0]), **client_kwargs), list(sentinel.sentinels)
