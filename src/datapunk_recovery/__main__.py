"""``python -m datapunk_recovery``: the ``datapunk-recovery`` command, without its script.

Useful where the console script is not on ``PATH`` (a virtual environment not
activated, ``pipx run``), and to be sure which interpreter runs it.
"""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m datapunk_recovery"))
