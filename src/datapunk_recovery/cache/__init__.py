"""Cache recovery: a read-through cache whose reads survive the cache and the source.

- :mod:`.protocols`: :class:`Cache`, :class:`Source`, :class:`Codec`;
- :mod:`.memory`: :class:`MemoryCache`, the bounded embedded default;
- :mod:`.redis`: :class:`RedisCache` (``redis.asyncio``; JSON by default);
- :mod:`.codecs`: :class:`JsonCodec`, :class:`PickleCodec` (explicit opt-in only);
- :mod:`.sources`: PostgreSQL (asyncpg, psycopg 3), SQLite and function sources;
- :mod:`.recovering`: :class:`ReadThroughCache`, the recovery itself;
- :mod:`.warming`: warming policies and the hot-key sketch.

See ``docs/cache.md``.
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
