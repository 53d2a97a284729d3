"""The kill switches of chaos: the process-wide one and the environment's disarm.

Every injector reads the global switch on every call, and its decorators ask
at wrapping time whether chaos is armed at all; both answers live here, once,
so that no injector can be built that an operator cannot switch off.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Final


class _Switch:
    """A mutable flag read on every call of every injector (one attribute read)."""

    __slots__ = ("on",)

    def __init__(self, on: bool) -> None:
        self.on = on


#: The environment variable that disarms chaos for the whole process.
DISARM_VARIABLE: Final = "DATAPUNK_RECOVERY_CHAOS"
#: The values of :data:`DISARM_VARIABLE` that leave chaos armed (unset or empty does too).
ARMING_VALUES: Final = ("1", "on", "true", "yes")
#: The values that disarm chaos quietly; any other value disarms it with a warning.
DISARMING_VALUES: Final = ("0", "off", "false", "no")


def _read_switch(value: str | None) -> tuple[bool, str | None]:
    """Whether chaos is armed by ``value`` of the kill switch, and a warning to give.

    The variable is a kill switch, so it fails safe: a value that is neither
    an arming nor a disarming one (a typo such as ``disabled``, ``none``,
    ``n``) disarms chaos, and the warning names the variable, the value and
    the accepted values.  Case and surrounding blanks do not matter.
    """
    if value is None:
        return True, None
    word = value.strip().lower()
    if word == "" or word in ARMING_VALUES:
        return True, None
    if word in DISARMING_VALUES:
        return False, None
    return False, (
        f"{DISARM_VARIABLE}={value[:40]!r} is not an accepted value (arm with "
        f"{', '.join(ARMING_VALUES)} or leave it unset; disarm with "
        f"{', '.join(DISARMING_VALUES)}): chaos is DISARMED for this process"
    )


def _armed_at_import() -> bool:
    armed, warning = _read_switch(os.environ.get(DISARM_VARIABLE))
    if warning is not None:
        # Point at the user's import: past this function, this module, the
        # `_injector` module that imports it first and the package.
        warnings.warn(warning, RuntimeWarning, stacklevel=5)
        logging.getLogger("datapunk_recovery.chaos").warning("%s", warning)
    return armed


_ARMED: Final = _armed_at_import()
_GLOBAL: Final = _Switch(_ARMED)


def armed() -> bool:
    """False when ``DATAPUNK_RECOVERY_CHAOS`` disarmed chaos: ``off`` (or ``0``/``false``/``no``),
    or any value that is not an arming one (``1``/``on``/``true``/``yes``; unset or
    empty arms too), which also warns.

    Read once, at import.  Disarmed, every decorator returns the function
    itself and no switch can turn injection on: a production process cannot
    inject a fault by mistake, and pays nothing for decorators left in place.
    """
    return _ARMED


def disable_all() -> None:
    """The kill switch: no injector of this process injects anything until `enable_all()`.

    Each injector keeps its own switch; this one overrides them all, so an
    operator can stop every experiment at once without finding each injector.
    """
    _GLOBAL.on = False


def enable_all() -> None:
    """Lift the kill switch: injectors that are enabled inject again.

    Raises ``RuntimeError`` when the process is disarmed (see
    [`armed()`][datapunk_recovery.chaos.armed]).
    """
    if not _ARMED:
        raise RuntimeError(
            f"chaos is disarmed for this process by {DISARM_VARIABLE}="
            f"{os.environ.get(DISARM_VARIABLE, '')!r}; it cannot be enabled"
        )
    _GLOBAL.on = True


def all_enabled() -> bool:
    """Whether the kill switch lets injectors inject (it does by default)."""
    return _GLOBAL.on
