"""The ``datapunk-recovery demo`` drill: a small service mesh, broken on purpose, twice.

See :mod:`.drill` for the traffic and the fault script, :mod:`.mesh` for the
dependencies, and ``docs/demo.md`` for what the figures mean.
"""

from .drill import DrillSetup, RunResult, RunStatus, demo_config, fault_windows, run_drill

__all__ = ["DrillSetup", "RunResult", "RunStatus", "demo_config", "fault_windows", "run_drill"]
