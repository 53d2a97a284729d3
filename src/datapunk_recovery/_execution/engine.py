"""The retry engine, for one commit an alias of `decision` (its new home for history's sake).

The module moved whole to ``decision.py`` so that ``git log --follow`` keeps
its history; the next commit splits it (the loops and ``@retry`` back here).
"""

import sys

from . import decision

sys.modules[__name__] = decision
