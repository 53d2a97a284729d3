"""The connections the facade opens and closes: its databases and its Redis cache.

[`RecoveryStrategies`][datapunk_recovery.strategies.RecoveryStrategies] opens what its
configuration asks for when it is entered and closes it on exit, even after
failures; opening makes no connection (the first use connects, and recovers
like any call), so a dependency that is down never stops the entry.
"""

from __future__ import annotations

from .._core.extras import MissingExtra
from .._core.policy import RetryPolicy
from ..cache import RedisCache
from ..config import DatabaseSettings, RecoveryConfig
from ..database import ManagedPool, SqliteConfig, SqliteDatabase
from ..database.pool import PoolConfig as DbPoolConfig


class Resources:
    """The open databases (by name) and Redis cache of one facade."""

    __slots__ = ("databases", "redis")

    def __init__(self) -> None:
        self.databases: dict[str, SqliteDatabase | ManagedPool] = {}
        self.redis: RedisCache | None = None

    async def open(self, config: RecoveryConfig) -> None:
        """Open the databases and the Redis cache of ``config`` not open yet, connecting to none.

        PostgreSQL pools are created with no connection (``min_size=0``) and the
        Redis client connects on its first command.  Raises the first failure;
        what was opened before it stays open (the caller closes it).
        """
        for name, settings in config.databases.items():
            if name not in self.databases:
                self.databases[name] = await _open_database(name, settings, config)
        url = config.cache.redis
        if url is not None and self.redis is None:
            try:
                self.redis = RedisCache.from_url(url)
            except MissingExtra as missing:
                # Say which key of the configuration needs the driver.
                raise MissingExtra("[cache] redis", missing.module, missing.extra) from missing

    async def close(self) -> None:
        """Close every database and cache opened (each one, even if another fails)."""
        databases, self.databases = self.databases, {}
        redis, self.redis = self.redis, None
        closing: list[ManagedPool | RedisCache] = [
            d for d in databases.values() if isinstance(d, ManagedPool)
        ]
        if redis is not None:
            closing.append(redis)
        errors: list[Exception] = []
        interrupted: BaseException | None = None
        for resource in closing:
            try:
                await resource.close()
            except Exception as exc:
                errors.append(exc)
            except BaseException as exc:
                # Cancelled (or interrupted) while closing one: the others are
                # still closed, then the cancellation goes on untouched.
                if interrupted is None:
                    interrupted = exc
        if interrupted is not None:
            raise interrupted
        if errors:
            raise ExceptionGroup("RecoveryStrategies.close: some failed to close", errors)


async def _open_database(
    name: str, settings: DatabaseSettings, config: RecoveryConfig
) -> SqliteDatabase | ManagedPool:
    """The database ``name``, replaying with the retry policy of the service of that name."""
    policy = config.policy(name)
    retry_policy = RetryPolicy(policy.retry, policy.categories)
    if settings.sqlite is not None:
        return SqliteDatabase(settings.sqlite, SqliteConfig(retry=retry_policy))
    assert settings.postgres is not None
    try:
        return await ManagedPool.create_asyncpg(
            settings.postgres, DbPoolConfig(name=name), min_size=0, max_size=settings.max_size
        )
    except MissingExtra as missing:
        # Say which key of the configuration needs the driver.
        where = f"[databases.{name}] postgres"
        raise MissingExtra(where, missing.module, missing.extra) from missing
