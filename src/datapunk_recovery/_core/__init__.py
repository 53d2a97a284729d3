"""Layer 1, the core: pure, I/O-free decisions (no sleeping, no tasks)."""
