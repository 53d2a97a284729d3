"""Chaos injection: make a dependency fail on purpose, to prove that recovery works.

A recovery that was never exercised is a recovery nobody knows works.  This
module lets users break their own calls in a controlled way:

- [`Fault`][datapunk_recovery.chaos.Fault] raises a fresh exception instead of making the call;
- [`Latency`][datapunk_recovery.chaos.Latency] waits (``seconds``, or a uniform draw up to
  ``up_to``) and
  then makes the call;
- [`Outcome`][datapunk_recovery.chaos.Outcome] returns a given value instead of making the call;
- [`Behaviour`][datapunk_recovery.chaos.Behaviour] runs another callable, with the same arguments,
  instead.

An injection is applied by an injector: [`Chaos`][datapunk_recovery.chaos.Chaos] applies one
injection
at a ``rate`` (the fraction of calls, drawn from a seeded RNG), and a
[`Timeline`][datapunk_recovery.chaos.Timeline] applies scripted
[`Window`][datapunk_recovery.chaos.Window]\\ s of faults over time, read
against [`datapunk_recovery._core.clock.now()`][datapunk_recovery._core.clock.now]
(so a fake clock scripts them
deterministically).  Every injector decorates sync and async functions (the
signature is kept), and offers [`call()`][datapunk_recovery.chaos.Injector.call] /
[`call_async()`][datapunk_recovery.chaos.Injector.call_async] for one-off calls (``acall()``
is the former name of ``call_async()``, still working).

Each injector has its own switch ([`enable()`][datapunk_recovery.chaos.Injector.enable] /
[`disable()`][datapunk_recovery.chaos.Injector.disable], flipped at run time), and
[`disable_all()`][datapunk_recovery.chaos.disable_all] is
the global kill switch over every injector of the process.  A switched-off
injector costs its wrapper one attribute read per call on top of the wrapper's
own frame (see
[docs/benchmarks/chaos.md](https://datapunk.github.io/datapunk-recovery/benchmarks/chaos/) for the
measured figures).  Where
even that is too much (production), start the process with
``DATAPUNK_RECOVERY_CHAOS=off``: chaos is then *disarmed*, decorators return
the function itself untouched (zero cost), and nothing can switch it back on.
The switch fails safe: only ``1``/``on``/``true``/``yes`` (or no value) leave
chaos armed; any value that is not an accepted one (``disabled``, ``n``)
disarms it too, with a warning naming the variable and the accepted values.

Latency sleeps through the execution layer (`datapunk_recovery._execution.runtime`),
so a fake clock advances instead of waiting, and under asyncio and trio alike
a cancelled sleep cancels at once.  Nothing here catches anything:
cancellation passes through untouched, and only ``Exception`` subclasses can
be injected as faults.

The package holds one concept per module, all private; their public names are
re-exported here, the one path to import them from: ``_switch`` (the kill
switches), ``_injections`` (what can be injected), ``_injector`` (the
injector, its decorator, one-off call and pipeline-stage faces, its event and
counters), ``_rate`` (`Chaos`, by rate) and ``_timeline`` (`Timeline`, by
time).
"""

from __future__ import annotations

from ._injections import Behaviour, Fault, Injection, Latency, Outcome
from ._injector import ChaosInjected, ChaosStage, ChaosStats, Injector, injected_by
from ._rate import Chaos
from ._switch import (
    ARMING_VALUES,
    DISARM_VARIABLE,
    DISARMING_VALUES,
    all_enabled,
    armed,
    disable_all,
    enable_all,
)
from ._timeline import Timeline, Window

__all__ = [
    "Behaviour",
    "Chaos",
    "ChaosInjected",
    "ChaosStage",
    "ChaosStats",
    "ARMING_VALUES",
    "DISARMING_VALUES",
    "DISARM_VARIABLE",
    "Fault",
    "Injection",
    "Injector",
    "Latency",
    "Outcome",
    "Timeline",
    "Window",
    "all_enabled",
    "armed",
    "disable_all",
    "enable_all",
    "injected_by",
]
