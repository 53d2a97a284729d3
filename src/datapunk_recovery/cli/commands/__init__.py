"""Subcommands of the ``datapunk-recovery`` command line, one module each.

Each module has a docstring (its first line is the command's help), an
``add_arguments(parser)`` function and a ``run(args) -> int`` function.
"""
