"""`data.workers=auto`: loader processes per rank from the CPU cores this rank may use. On a CPU-bound
step a loader process takes its core from the compute, and with 2 cores that costs the step more than
loading in the main process does (docs/performance.md), so with 2 cores or fewer the main process
loads; above that the rank keeps 2 cores for its own threads and gives the rest to loaders, at most 8."""
from __future__ import annotations

import os

AUTO = "auto"
MAX_AUTO_WORKERS = 8


def cores_per_rank(local_world_size: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


def loader_workers(value, local_world_size: int = 1) -> int:
    """The loader process count for `data.workers` (auto, or a count >= 0)."""
    if value == AUTO:
        cores = cores_per_rank(local_world_size)
        return 0 if cores <= 2 else min(MAX_AUTO_WORKERS, cores - 2)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"data.workers={value!r}: auto or a number of loader processes >= 0")
    return value
