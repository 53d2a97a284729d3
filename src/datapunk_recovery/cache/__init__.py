"""Cache recovery: a read-through cache whose reads survive the cache and the source.

- [`protocols`][datapunk_recovery.cache.protocols]:
  [`Cache`][datapunk_recovery.cache.protocols.Cache],
  [`Source`][datapunk_recovery.cache.protocols.Source],
  [`Codec`][datapunk_recovery.cache.protocols.Codec];
- [`memory`][datapunk_recovery.cache.memory]:
  [`MemoryCache`][datapunk_recovery.cache.memory.MemoryCache], the bounded embedded default;
- [`redis`][datapunk_recovery.cache.redis]: [`RedisCache`][datapunk_recovery.cache.redis.RedisCache]
  (``redis.asyncio``; JSON by default);
- [`codecs`][datapunk_recovery.cache.codecs]:
  [`JsonCodec`][datapunk_recovery.cache.codecs.JsonCodec],
  [`PickleCodec`][datapunk_recovery.cache.codecs.PickleCodec] (explicit opt-in only);
- [`sources`][datapunk_recovery.cache.sources]: PostgreSQL (asyncpg, psycopg 3), SQLite and function
  sources;
- [`recovering`][datapunk_recovery.cache.recovering]:
  [`ReadThroughCache`][datapunk_recovery.cache.recovering.ReadThroughCache], the recovery itself;
- [`warming`][datapunk_recovery.cache.warming]: warming policies and the hot-key sketch.

See [docs/cache.md](https://datapunk.github.io/datapunk-recovery/cache/).
"""

from .codecs import JsonCodec, PickleCodec
from .memory import MemoryCache
from .protocols import Cache, Codec, CorruptEntry, Source
from .recovering import (
    CacheConfig,
    CacheFailed,
    CacheRecovered,
    CacheStats,
    CacheWarmed,
    Lookup,
    ReadThroughCache,
    RepairQueued,
    StaleServed,
)
from .redis import RedisCache
from .sources import FunctionSource, PostgresSource, SqliteSource
from .warming import HotKeySketch, WarmHottest, WarmingPolicy, WarmKeys, WarmReason

__all__ = [
    "Cache",
    "CacheConfig",
    "CacheFailed",
    "CacheRecovered",
    "CacheStats",
    "CacheWarmed",
    "Codec",
    "CorruptEntry",
    "FunctionSource",
    "HotKeySketch",
    "JsonCodec",
    "Lookup",
    "MemoryCache",
    "PickleCodec",
    "PostgresSource",
    "ReadThroughCache",
    "RedisCache",
    "RepairQueued",
    "Source",
    "SqliteSource",
    "StaleServed",
    "WarmHottest",
    "WarmKeys",
    "WarmReason",
    "WarmingPolicy",
]
