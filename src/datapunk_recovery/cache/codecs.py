"""Codecs for caches that store bytes.

JSON is the default and the safe choice: decoding JSON cannot run code,
whoever wrote the bytes.  Pickle can encode any Python object but decoding a
pickle runs code chosen by whoever wrote it: anyone able to write to the
cache (a compromised or shared Redis) could then run code in every reader.
It is therefore never a default and must be asked for by name.
"""

from __future__ import annotations

import json
import pickle
from typing import Any

from datapunk_recovery._core.validate import shown

__all__ = ["JsonCodec", "PickleCodec"]


class JsonCodec:
    """JSON, compact; values must be JSON types (tuples come back as lists)."""

    __slots__ = ()

    def encode(self, value: Any) -> bytes:
        """``value`` as compact UTF-8 JSON."""
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def decode(self, data: bytes) -> Any:
        """The value of JSON ``data``."""
        return json.loads(data)


class PickleCodec:
    """Pickle: any picklable value.  UNSAFE against a hostile cache (see the module docs).

    ``i_trust_the_cache=True`` must be passed to build one, so that choosing it
    is a visible decision in the code that does.
    """

    __slots__ = ()

    def __init__(self, *, i_trust_the_cache: bool = False) -> None:
        if i_trust_the_cache is not True:
            raise ValueError(
                "PickleCodec.i_trust_the_cache: decoding a pickle runs code chosen by whoever "
                "wrote it; pass i_trust_the_cache=True only for a cache nobody else can write, "
                f"got {shown(i_trust_the_cache)}"
            )

    def encode(self, value: Any) -> bytes:
        """``value`` pickled with the highest protocol."""
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def decode(self, data: bytes) -> Any:
        """The unpickled value (runs whatever the pickle says: trusted caches only)."""
        return pickle.loads(data)
