"""The ``datapunk-recovery demo`` drill: a small service mesh, broken on purpose, twice.

See [`drill`][datapunk_recovery.demo.drill] for the traffic and the fault script,
[`mesh`][datapunk_recovery.demo.mesh] for the
dependencies, and [docs/demo.md](https://datapunk.github.io/datapunk-recovery/demo/) for what the
figures mean.
"""

from .drill import DrillSetup, RunResult, RunStatus, demo_config, fault_windows, run_drill

__all__ = ["DrillSetup", "RunResult", "RunStatus", "demo_config", "fault_windows", "run_drill"]
