"""Layer 2, execution: the only place that sleeps, waits or spawns tasks."""
