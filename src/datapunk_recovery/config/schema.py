"""Configuration from plain data: TOML tables and environment variables into frozen dataclasses.

Every configuration object of the library is a frozen, validated dataclass
(``RetryConfig``, ``RetryPolicy``, breaker and budget configurations, ...).
[`build()`][datapunk_recovery.config.schema.build] makes one from a plain mapping, such as a parsed
TOML
table,
reading the dataclass's own field types, so that no second description of the
configuration exists to drift out of date:

- numbers, booleans, strings, enums (by value), ``X | None``, tuples (from
  lists), ``Mapping[K, V]`` (keys converted to ``K``, an enum or ``str``) and
  nested dataclasses (from tables);
- a duration field (see [`is_duration_field()`][datapunk_recovery.config.schema.is_duration_field])
also
  takes a duration
  text such as ``"250ms"`` or ``"1m"``
  ([`datapunk_recovery._core.durations`][datapunk_recovery._core.durations]);
- an optional field is set to ``None`` with the text ``"none"`` (TOML has no null);
- a union of configuration dataclasses (``TokenBudgetConfig | RatioBudgetConfig``)
  from a table whose ``kind`` key names one (``kind = "ratio"``; see
  [`union_kinds()`][datapunk_recovery.config.schema.union_kinds]), or, without it, by the keys
  the table holds;
- an unknown key is an error, with the closest known key suggested.

Values that came from environment variables are text;
[`env_overrides()`][datapunk_recovery.config.schema.env_overrides]
wraps each in [`Text`][datapunk_recovery.config.schema.Text], which carries the variable's name and
lets
numbers, booleans and comma-separated lists be read from text.  Merged into a
file's table with [`merge()`][datapunk_recovery.config.schema.merge], they override it key by key.

Problems are collected, never stopped at:
[`ConfigError`][datapunk_recovery.config.schema.ConfigError]
lists every one,
each naming its source (a file or an environment variable), the key path and
the value, so that a bad configuration is fixed in one pass.  The dataclass's
own validation (``__post_init__``) still has the last word; its complaint is
reported at the path of the field it names.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from datapunk_recovery._core.validate import shown

from .._core.durations import DurationError, parse_duration

__all__ = [
    "KIND_KEY",
    "NO_VALUE",
    "ConfigError",
    "Problem",
    "Text",
    "build",
    "env_overrides",
    "is_duration_field",
    "merge",
    "read_toml",
    "union_kinds",
]

T = TypeVar("T")

#: A float field whose name ends like this holds seconds and takes duration texts.
_DURATION_NAME: Final = re.compile(
    r"(?:^|_)(?:delay|timeout|deadline|duration|period|interval|window|ttl|seconds|wait|drain"
    r"|idle|latency)$"
)
_BARE_KEY: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_TRUE: Final = frozenset({"true", "yes", "on", "1"})
_FALSE: Final = frozenset({"false", "no", "off", "0"})
# The message prefix of the _validate helpers and of hand-written checks: "Owner.field: ...".
_OWNED_MESSAGE: Final = re.compile(r"^(\w+)\.(\w+)(?:\[[^\]]*\])?: (.*)$", re.DOTALL)
# Their ", got VALUE" tail: the problem shows the value as written instead.
_GOT: Final = re.compile(r",? got .*$", re.DOTALL)


class _Missing(enum.Enum):
    NO_VALUE = "no value"


#: The value of a :class:`Problem` that has none to show (a missing key, a whole table).
NO_VALUE: Final = _Missing.NO_VALUE


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a configuration.

    ``source`` is where the value came from (a file name or ``env NAME``),
    ``path`` the dotted key path (``policies.fast.base_delay``; empty for the
    whole document), ``value`` the offending value (absent for a missing key).
    """

    source: str
    path: str
    message: str
    value: object = NO_VALUE

    def __str__(self) -> str:
        where = self.path or "(top level)"
        got = "" if self.value is NO_VALUE else f" (got {shown(self.value)})"
        return f"{self.source}: {where}: {self.message}{got}"


class ConfigError(ValueError):
    """A configuration with problems; `problems` lists every one, in document order."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        count = len(self.problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        plural = "s" if count != 1 else ""
        super().__init__(f"invalid configuration, {count} problem{plural}:\n{lines}")


@dataclasses.dataclass(frozen=True, slots=True)
class Text:
    """A value given as text, from a named source (an environment variable).

    Numbers, booleans, durations and comma-separated lists are read from it;
    problems with it name ``source`` instead of the document's source.
    """

    value: str
    source: str


def is_duration_field(field: dataclasses.Field[Any]) -> bool:
    """Whether a float field holds seconds, and so also takes duration texts like ``"250ms"``.

    ``metadata={"unit": "seconds"}`` on the field says yes, any other ``unit``
    says no; without it, the name decides: it ends in ``delay``, ``timeout``,
    ``deadline``, ``duration``, ``period``, ``interval``, ``window``, ``ttl``,
    ``seconds``, ``wait``, ``drain``, ``idle`` or ``latency`` (``base_delay``,
    ``open_duration``, ``max_wait``).  Only float fields are asked: a count such
    as ``window: int`` stays a count, and a factor (``open_backoff``) is a number.
    """
    unit = field.metadata.get("unit", NO_VALUE)
    if unit is not NO_VALUE:
        return bool(unit == "seconds")
    return _DURATION_NAME.search(field.name) is not None


#: The key of a table that names which configuration dataclass of a union it holds.
KIND_KEY: Final = "kind"


def union_kinds(arms: typing.Sequence[type[Any]]) -> dict[type[Any], str]:
    """The ``kind`` names of a union's dataclasses: ``TokenBudgetConfig | RatioBudgetConfig``
    gives ``"token"`` and ``"ratio"``.

    A name is the class's name without the ending all of them share
    (``BudgetConfig``), in snake case; the whole name when nothing else is left.
    """
    full = [cls.__name__ for cls in arms]
    shared = 0
    while shared < min(len(n) for n in full) and len({n[-shared - 1] for n in full}) == 1:
        shared += 1
    # Cut at a word boundary (a capital letter), never inside a word.
    while shared and not full[0][len(full[0]) - shared].isupper():
        shared -= 1
    names = {}
    for cls, name in zip(arms, full, strict=True):
        stem = name[: len(name) - shared] or name
        names[cls] = re.sub(r"(?<!^)(?=[A-Z])", "_", stem).lower()
    return names


def build(
    cls: type[T],
    data: object,
    *,
    source: str,
    path: str = "",
    base: T | None = None,
) -> T:
    """An instance of the dataclass ``cls`` from ``data`` (a mapping); raises `ConfigError`.

    ``source`` names where ``data`` came from (for messages); ``path`` is the
    key path of ``data`` inside a larger document.  Keys absent from ``data``
    take the field's value in ``base`` when given (so that a service overrides
    only what differs from the defaults), else the dataclass default.
    """
    problems: list[Problem] = []
    result = _Builder(source, problems).dataclass(cls, data, path, base)
    if problems:
        raise ConfigError(problems)
    return typing.cast(T, result)


def read_toml(path: str | Path) -> dict[str, Any]:
    """The table of a TOML file; an unreadable or malformed file raises `ConfigError`."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(
            [Problem(str(path), "", f"cannot read the file: {exc.strerror}")]
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(str(path), "", f"not valid TOML: {exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(str(path), "", f"not UTF-8 text: {exc.reason}")]) from exc


def env_overrides(environ: Mapping[str, str], prefix: str = "DATAPUNK_RECOVERY") -> dict[str, Any]:
    """The overrides that environment variables ``PREFIX__KEY__PATH=value`` make, as a table.

    Keys are lower-cased (``DATAPUNK_RECOVERY__RETRY__MAX_ATTEMPTS=5`` sets
    ``retry.max_attempts``); each value is a [`Text`][datapunk_recovery.config.schema.Text] naming
    its
    variable.
    A variable that sets a table and another that sets a key inside it
    conflict: [`ConfigError`][datapunk_recovery.config.schema.ConfigError] names both.
    """
    head = prefix + "__"
    tree: dict[str, Any] = {}
    problems: list[Problem] = []
    for name in sorted(environ):
        if not name.startswith(head):
            continue
        keys = [part.lower() for part in name[len(head) :].split("__")]
        if not all(keys):
            # PREFIX____X, PREFIX__X__, or the bare PREFIX__: a key with no name.
            problems.append(
                Problem(
                    f"env {name}",
                    "",
                    "the variable's name has an empty key (two '__' in a row, or a "
                    f"leading or trailing '__'); write {head}KEY__PATH",
                )  # the value is not shown: it may be a DSN or a token
            )
            continue
        node = tree
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if isinstance(child, Text):
                problems.append(_conflict(child.source, name))
                break
            node = child
        else:
            if keys[-1] in node:
                problems.append(_conflict(name, _first_source(node[keys[-1]])))
            else:
                node[keys[-1]] = Text(environ[name], f"env {name}")
    if problems:
        raise ConfigError(problems)
    return tree


def _conflict(one: str, other: str) -> Problem:
    return Problem(
        one.removeprefix("env "),
        "",
        f"conflicts with {other.removeprefix('env ')}: one sets a table, the other a key in it",
    )


def merge(document: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` with ``overrides`` laid over it, table by table (neither is changed)."""
    merged = dict(document)
    for key, value in overrides.items():
        below = merged.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            merged[key] = merge(below, value)
        else:
            merged[key] = value
    return merged


def _first_source(value: object) -> str:
    # The source of an env-made subtree: the first Text found in it.
    if isinstance(value, Text):
        return value.source
    if isinstance(value, Mapping):
        for item in value.values():
            found = _first_source(item)
            if found:
                return found
    return ""


def _complaint(cls: type[Any], exc: Exception) -> tuple[str, str] | None:
    """The field a dataclass's validation error names, and what it says (its value left out)."""
    match = _OWNED_MESSAGE.match(str(exc))
    if match is None or match.group(1) != cls.__name__:
        return None
    return match.group(2), _GOT.sub("", match.group(3))


def _join(path: str, key: object) -> str:
    text = str(key)
    if not _BARE_KEY.match(text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{path}.{text}" if path else text


class _Invalid(enum.Enum):
    INVALID = "invalid"


_INVALID: Final = _Invalid.INVALID


class _Builder:
    """One pass over a document, appending every problem found to ``problems``."""

    __slots__ = ("problems", "source")

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems

    def problem(self, raw: object, path: str, message: str, *, show: bool = True) -> _Invalid:
        if isinstance(raw, Text):
            self.problems.append(Problem(raw.source, path, message, raw.value))
        else:
            origin = _first_source(raw) or self.source
            self.problems.append(Problem(origin, path, message, raw if show else NO_VALUE))
        return _INVALID

    def dataclass(self, cls: type[Any], raw: object, path: str, base: object) -> object:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"schema.build: expected a dataclass type, got {shown(cls)}")
        if not isinstance(raw, Mapping):
            return self.problem(raw, path, f"expected a table of {cls.__name__} settings")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        given: dict[str, object] = {}
        refused: set[str] = set()  # fields whose value was refused on its own
        ok = True
        for key, value in raw.items():
            where = _join(path, key)
            field = fields.get(key) if isinstance(key, str) else None
            if field is None:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                known = ", ".join(fields)
                self.problem(
                    value,
                    where,
                    f"unknown key for {cls.__name__} (known: {known}){hint}",
                    show=not isinstance(value, Mapping),
                )
                ok = False
                continue
            nested_base = getattr(base, key) if base is not None else None
            converted = self.value(hints[key], value, where, field, nested_base)
            if converted is _INVALID:
                ok = False
                refused.add(key)
            else:
                kwargs[key] = converted
                given[key] = value
        if base is None:
            for name, f in fields.items():
                required = (
                    f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                )
                if required and name not in raw:
                    self.problem(None, _join(path, name), "missing required key", show=False)
                    ok = False
        # Rules that tie fields together (max_delay >= base_delay) are judged on
        # the values given, never on a default the document overrides: the
        # whole is tried first, and a valid whole is the answer.
        defaults = {} if base is None else {name: getattr(base, name) for name in fields}
        if ok:
            try:
                return cls(**{**defaults, **kwargs})
            except (TypeError, ValueError):
                pass
        # Something is wrong: judge each field, so that every bad value is
        # reported, not only the first one __post_init__ meets.  A field is
        # judged alone first; a complaint then is confirmed among the given
        # values that passed alone (a field that fails only against a default
        # it was given a partner for is not reported).
        alone: dict[str, tuple[str, str]] = {}
        for name, converted in kwargs.items():
            complaint = self.judge(cls, {**defaults, name: converted})
            if complaint is not None and complaint[0] == name:
                alone[name] = complaint
        passed = {k: v for k, v in kwargs.items() if k not in alone}
        refused.update(alone)
        for name in alone:
            complaint = self.judge(cls, {**defaults, **passed, name: kwargs[name]})
            if complaint is not None and complaint[0] == name:
                if any(
                    other != name and re.search(rf"\b{other}\b", complaint[1]) for other in refused
                ):
                    continue  # a rule tying it to a field refused on its own: not judged
                self.problem(given[name], _join(path, name), complaint[1])
                ok = False
        rejected = refused | {str(key) for key in raw if key not in kwargs}
        if not ok:
            self.cross_check(cls, defaults, kwargs, given, path, rejected)
            return _INVALID
        try:
            return cls(**{**defaults, **kwargs})
        except (TypeError, ValueError) as exc:
            complaint = _complaint(cls, exc)
            if complaint is None:
                return self.problem(raw, path, str(exc), show=False)
            name, message = complaint
            if name in given:
                return self.problem(given[name], _join(path, name), message)
            return self.problem(raw, _join(path, name), message, show=False)

    @staticmethod
    def judge(cls: type[Any], kwargs: dict[str, Any]) -> tuple[str, str] | None:
        """The complaint of ``cls(**kwargs)`` (field, message), or None when it builds.

        An error that names no field of ``cls`` is reported by the whole's
        final build, not here.
        """
        try:
            cls(**kwargs)
        except (TypeError, ValueError) as exc:
            return _complaint(cls, exc)
        return None

    def cross_check(
        self,
        cls: type[Any],
        defaults: Mapping[str, Any],
        kwargs: Mapping[str, Any],
        given: Mapping[str, object],
        path: str,
        rejected: set[str],
    ) -> None:
        """Judge the rules that tie fields together although some fields were rejected.

        So that a table with a bad value *and* a cross-key problem (addresses
        naming an unknown endpoint) reports both at once.  The valid values
        are judged together; a complaint that names a rejected field is
        dropped, since it would judge a default instead of what was written;
        after an unknown key (a misspelt field?) nothing more is judged.
        """
        if not rejected <= {f.name for f in dataclasses.fields(cls)}:
            return
        valid = {name: value for name, value in kwargs.items() if name not in rejected}
        try:
            cls(**{**defaults, **valid})
        except (TypeError, ValueError) as exc:
            complaint = _complaint(cls, exc)
            if complaint is None:
                return
            name, message = complaint
            if name in rejected or any(bad in message for bad in rejected):
                return
            if name in given:
                self.problem(given[name], _join(path, name), message)
            else:
                self.problem(None, _join(path, name), message, show=False)

    def value(
        self,
        tp: Any,
        raw: object,
        path: str,
        field: dataclasses.Field[Any] | None,
        base: object,
    ) -> object:
        text = raw.value if isinstance(raw, Text) else None
        value: object = raw.value if isinstance(raw, Text) else raw
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if tp is Any or tp is object:
            return value
        if origin in (types.UnionType, typing.Union):
            arms = [a for a in args if a is not type(None)]
            optional = len(arms) != len(args)
            if optional and (
                value is None or (isinstance(value, str) and value.strip().lower() == "none")
            ):
                return None
            if len(arms) == 1:
                return self.value(arms[0], raw, path, field, base)
            if all(
                isinstance(a, type)
                and dataclasses.is_dataclass(a)
                and KIND_KEY not in {f.name for f in dataclasses.fields(a)}
                for a in arms
            ):
                return self.union(arms, raw, path, base)
            return self.unsupported(raw, path)
        if tp is bool:
            return self.boolean(raw, value, text, path)
        if tp is int:
            return self.integer(raw, value, text, path)
        if tp is float:
            duration = field is not None and is_duration_field(field)
            return self.number(raw, value, text, path, duration)
        if tp is str:
            if isinstance(value, str):
                return value
            return self.problem(raw, path, "expected a string")
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return self.choice(tp, raw, value, path)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.dataclass(tp, raw, path, base)
        if origin is Mapping or origin is dict:
            return self.mapping(args[0], args[1], raw, path)
        if origin is tuple:
            return self.sequence(args, raw, value, text, path, field)
        if origin is typing.Literal:
            if value in args:
                return value
            choices = ", ".join(repr(a) for a in args)
            return self.problem(raw, path, f"expected one of {choices}")
        return self.unsupported(raw, path)

    def union(self, arms: list[type[Any]], raw: object, path: str, base: object) -> object:
        """One of several configuration dataclasses, chosen by the table's ``kind`` key.

        Without ``kind``: the kind of ``base`` (what the table overrides) if
        its fields hold every key given, else the kind whose fields hold the
        most of them (the first kind of the union on a tie, so that an empty
        table is the first kind with its defaults).
        """
        names = union_kinds(arms)
        if not isinstance(raw, Mapping):
            choices = " or ".join(cls.__name__ for cls in names)
            return self.problem(raw, path, f"expected a table of {choices} settings")
        table = dict(raw)
        given = table.pop(KIND_KEY, NO_VALUE)
        if given is not NO_VALUE:
            word = given.value if isinstance(given, Text) else given
            chosen = next(
                (
                    cls
                    for cls, name in names.items()
                    if isinstance(word, str) and word.strip().lower() == name
                ),
                None,
            )
            if chosen is None:
                choices = ", ".join(repr(name) for name in names.values())
                return self.problem(given, _join(path, KIND_KEY), f"expected one of {choices}")
        else:
            keys = {str(key) for key in table}

            def fit(cls: type[Any]) -> int:
                return len(keys & {f.name for f in dataclasses.fields(cls) if f.init})

            own = type(base) if type(base) in names else None
            # The first of the best, on a tie.
            chosen = own if own is not None and fit(own) == len(keys) else max(arms, key=fit)
        return self.dataclass(chosen, table, path, base if type(base) is chosen else None)

    def unsupported(self, raw: object, path: str) -> _Invalid:
        # Callables, exception types and the like: Python objects, not text.
        return self.problem(raw, path, "cannot be set from configuration (it takes Python objects)")

    def boolean(self, raw: object, value: object, text: str | None, path: str) -> object:
        if isinstance(value, bool):
            return value
        if text is not None:
            word = text.strip().lower()
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
        return self.problem(raw, path, "expected true or false")

    def integer(self, raw: object, value: object, text: str | None, path: str) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None:
            try:
                return int(text.strip())
            except ValueError:
                pass
        return self.problem(raw, path, "expected a whole number")

    def number(
        self, raw: object, value: object, text: str | None, path: str, duration: bool
    ) -> object:
        if duration:
            try:
                return parse_duration(value)
            except DurationError as exc:
                return self.problem(raw, path, _GOT.sub("", str(exc)))
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int too large for a float
                return self.problem(raw, path, "expected a finite number")
        elif text is not None:
            try:
                number = float(text.strip())
            except ValueError:
                return self.problem(raw, path, "expected a number")
        else:
            return self.problem(raw, path, "expected a number")
        if not math.isfinite(number):
            return self.problem(raw, path, "expected a finite number")
        return number

    def choice(self, tp: type[enum.Enum], raw: object, value: object, path: str) -> object:
        members = list(tp)
        if isinstance(value, tp):
            return value
        if isinstance(value, str):
            wanted = value.strip()
            for member in members:
                if str(member.value) == wanted:
                    return member
            for member in members:
                if str(member.value).lower() == wanted.lower():
                    return member
        choices = ", ".join(str(m.value) for m in members)
        return self.problem(raw, path, f"expected one of {choices}")

    def mapping(self, key_tp: Any, value_tp: Any, raw: object, path: str) -> object:
        if not isinstance(raw, Mapping):
            return self.problem(raw, path, "expected a table")
        result: dict[Any, Any] = {}
        ok = True
        for key, item in raw.items():
            where = _join(path, key)
            if key_tp is str:
                converted_key: object = key
            elif isinstance(key_tp, type) and issubclass(key_tp, enum.Enum):
                converted_key = self.choice(key_tp, key, key, where)
            else:
                converted_key = self.unsupported(key, where)
            converted = self.value(value_tp, item, where, None, None)
            if converted_key is _INVALID or converted is _INVALID:
                ok = False
            else:
                result[converted_key] = converted
        return result if ok else _INVALID

    def sequence(
        self,
        args: tuple[Any, ...],
        raw: object,
        value: object,
        text: str | None,
        path: str,
        field: dataclasses.Field[Any] | None,
    ) -> object:
        if text is not None:
            items: list[object] = [
                Text(part.strip(), typing.cast(Text, raw).source) for part in text.split(",")
            ]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            return self.problem(raw, path, "expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            kinds = [args[0]] * len(items)
        elif len(args) == len(items):
            kinds = list(args)
        else:
            return self.problem(raw, path, f"expected a list of {len(args)} items")
        result = [
            self.value(kind, item, f"{path}[{i}]", field, None)
            for i, (kind, item) in enumerate(zip(kinds, items, strict=True))
        ]
        if any(item is _INVALID for item in result):
            return _INVALID
        return tuple(result)
