"""The ``datapunk-recovery`` command line: a thin dispatcher over ``commands/``.

Each subcommand lives in its own module under
[`datapunk_recovery.cli.commands`][datapunk_recovery.cli.commands]
and is imported only when the parser is built, so heavy optional libraries
(rich, matplotlib) load only for the command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Final

from .. import __version__
from .commands._options import plain_help

__all__ = ["main"]

#: Subcommand name -> module under datapunk_recovery.cli.commands.
COMMANDS: Final[dict[str, str]] = {"simulate": "simulate", "demo": "demo", "check": "check"}


def build_parser(prog: str = "datapunk-recovery") -> argparse.ArgumentParser:
    """The parser of every subcommand; ``prog`` is how the help names the command."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Failure recovery for calls between services.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"datapunk_recovery.cli.commands.{module_name}")
        text = plain_help(module.__doc__ or name)
        doc = text.strip().splitlines()[0]
        command = sub.add_parser(name, help=doc, description=text)
        module.add_arguments(command)
        command.set_defaults(run_command=module.run)
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "datapunk-recovery") -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); the exit status."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    code: int = args.run_command(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
