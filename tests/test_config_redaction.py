"""Configuration errors never quote a secret: the class test over every config dataclass.

A URL, DSN or token given to the wrong field is the typical mistake that puts a
password in an exception message (``RecoveryConfig(databases={"main":
"postgresql://u:pw@h/db"})`` expects a ``DatabaseSettings``).  Every dataclass
of the library that validates itself in ``__post_init__`` is found by importing
every module; each of its fields gets secrets where something else is
expected, bare and inside a mapping and a list.  Whatever is refused must name
the field and quote no secret.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pkgutil
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

import datapunk_recovery
from datapunk_recovery._core.validate import shown

PASSWORD = "Pw9xQ7vT2kL5mZ8r"
DSN = f"postgresql://app:{PASSWORD}@db.internal:5432/orders"
TOKEN = "ghp_R4nd0mT0k3nV4lu3F0rT3st1ng9Zq"  # a bare token, no key= or URL around it
SECRETS = (PASSWORD, TOKEN)
BAD_VALUES: tuple[object, ...] = (
    DSN,
    TOKEN,
    {"main": DSN},
    {"main": TOKEN},
    [DSN],
    (TOKEN,),
    {DSN: 1},  # a mapping the wrong way round: the secret is a key
    {TOKEN: "x"},
)


def _modules() -> list[Any]:
    found = []
    for info in pkgutil.walk_packages(datapunk_recovery.__path__, "datapunk_recovery."):
        found.append(importlib.import_module(info.name))
    return found


MODULES = _modules()


def _config_classes() -> list[type[Any]]:
    classes: dict[type[Any], None] = {}
    for module in MODULES:
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and dataclasses.is_dataclass(value)
                and value.__module__.startswith("datapunk_recovery")
                and not value.__name__.startswith("_")
                and "__post_init__" in vars(value)
            ):
                classes[value] = None
    return sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _instances(value: object, depth: int = 2) -> Iterator[object]:
    yield value
    if depth == 0:
        return
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _instances(item, depth - 1)
    elif isinstance(value, list | tuple | frozenset | set):
        for item in value:
            yield from _instances(item, depth - 1)


def _existing(cls: type[Any]) -> object | None:
    """An instance the library itself builds (its catalogues), to fill required fields."""
    for module in MODULES:
        for value in vars(module).values():
            for item in _instances(value):
                if type(item) is cls:
                    return item
    return None


def _known_good(cls: type[Any]) -> dict[str, Any]:
    """Valid values for the fields without a default."""
    from datapunk_recovery.chaos import Fault

    by_name: dict[str, dict[str, Any]] = {
        "Fault": {"error": ConnectionError},
        "Latency": {"seconds": 0.1},
        "Behaviour": {"fn": lambda *a, **k: None},
        "Window": {"start": 0.0, "end": 1.0, "injection": Fault(ConnectionError)},
        "datapunk_recovery.resource.pool.PoolConfig": {"capacity": 1},
        "Endpoint": {"name": "a"},
        "Level": {"default": logging.INFO},
        "DatabaseSettings": {"sqlite": ":memory:"},
    }
    return by_name.get(f"{cls.__module__}.{cls.__name__}", by_name.get(cls.__name__, {}))


def _base(cls: type[Any]) -> dict[str, Any]:
    fields = [f for f in dataclasses.fields(cls) if f.init]
    required = [
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    good = _known_good(cls)
    if not required and not good:
        return {}
    if all(name in good for name in required):
        return good
    existing = _existing(cls)
    assert existing is not None, f"give valid required fields of {cls.__qualname__} here"
    return {f.name: getattr(existing, f.name) for f in fields}


CLASSES = _config_classes()


def test_the_scan_finds_the_configuration_dataclasses() -> None:
    names = {c.__name__ for c in CLASSES}
    assert {"RetryConfig", "BreakerConfig", "RecoveryConfig", "DatabaseSettings"} <= names
    assert len(CLASSES) >= 30


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_no_config_error_quotes_a_password_or_token_given_to_any_field(cls: type[Any]) -> None:
    base = _base(cls)
    cls(**base)  # the base itself is valid
    refused = 0
    for field in (f for f in dataclasses.fields(cls) if f.init):
        for bad in BAD_VALUES:
            try:
                cls(**{**base, field.name: bad})
            except (TypeError, ValueError) as exc:
                refused += 1
                message = "\n".join([str(exc), *getattr(exc, "__notes__", ())])
                for secret in SECRETS:
                    assert secret not in message, (field.name, bad, message)
                assert field.name in message, (field.name, message)
    assert refused > 0


def test_the_recovery_config_refuses_a_dsn_for_a_database_without_showing_its_password() -> None:
    from datapunk_recovery.config import RecoveryConfig

    with pytest.raises(TypeError) as caught:
        RecoveryConfig(databases={"main": DSN})  # type: ignore[dict-item]
    assert "databases" in str(caught.value)
    assert "postgresql://app:***@db.internal:5432/orders" in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_shown_values_keep_what_is_no_secret_and_are_bounded() -> None:
    assert shown("fast") == "'fast'"
    assert shown(-1.5) == "-1.5"
    assert shown("exponential_with_jitter") == "'exponential_with_jitter'"
    assert shown(TOKEN) == "'***'"
    assert shown(["ok", TOKEN]) == "['ok', '***']"
    assert len(shown("x" * 10_000)) <= 200


def test_a_duration_error_quotes_no_token() -> None:
    from datapunk_recovery._core.durations import DurationError, parse_duration

    for bad in (TOKEN, DSN):
        with pytest.raises(DurationError) as caught:
            parse_duration(bad)
        assert all(secret not in str(caught.value) for secret in SECRETS)
