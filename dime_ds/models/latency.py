"""How long an encoder takes on this machine: wall-clock milliseconds per call, eager PyTorch in
inference mode, the median of timed calls after warm-up (the first calls allocate and pick kernels).
The figure a user picks a student by; compare models only within one run, on pinned threads."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def latency_ms(fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, runs: int = 20,
               warmup: int = 3) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn(inputs)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn(inputs)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)

