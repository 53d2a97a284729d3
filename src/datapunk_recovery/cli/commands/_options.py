"""What the subcommands share: option types, help text cleaning, setup errors as usage errors."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from typing import NoReturn

from datapunk_recovery._core.validate import shown

__all__ = ["plain_help", "positive_number", "usage_error"]

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")
#: A Markdown link, reference (``[`X`][a.b.X]``) or inline (``[text](url)``).
_REFERENCE = re.compile(r"\[`?([^`\]]+)`?\](?:\[[^\]]*\]|\([^)]*\))")


def plain_help(text: str) -> str:
    """``text`` (a docstring) without reStructuredText markup, for ``--help``.

    A role (class, meth, func... with its target in backquotes) or a Markdown
    link becomes its text, a double-backquoted literal its bare text, and a
    backslash-space (an RST escape) nothing.
    """
    text = _REFERENCE.sub(lambda m: m.group(1), text)
    text = _ROLE.sub(lambda m: m.group(1), text)
    text = _LITERAL.sub(lambda m: m.group(1), text)
    return text.replace("\\\\ ", "").replace("\\ ", "")


def positive_number(text: str) -> float:
    """An option's value as a finite number > 0 (a rate, a factor); a usage error otherwise."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {shown(text)}")
    return value


def usage_error(
    parser: argparse.ArgumentParser, error: ValueError, flags: Mapping[str, str]
) -> NoReturn:
    """Report ``error`` from a setup built from options as a usage error naming the flag.

    ``flags`` maps a setup field to its option (``"outage_start"`` to
    ``"--outage-start"``): ``OutageSetup.outage_start: must be...`` is shown as
    ``argument --outage-start: must be...`` under the command's usage line.
    Exits with status 2, as argparse does for every other bad option.
    """
    message = str(error)
    owner_field, _, rest = message.partition(": ")
    field = owner_field.rpartition(".")[2]
    if rest and field in flags:
        parser.error(f"argument {flags[field]}: {rest}")
    parser.error(message)
