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


def image_forward_flops(encode_image: Callable[[torch.Tensor], torch.Tensor], image_size: int) -> int:
    """Forward FLOPs of one image through `encode_image` (torch's FLOP counter, batch of one)."""
    from dime_ds.models.flops import count_flops

    images = torch.zeros(1, 3, image_size, image_size)
    with torch.inference_mode():
        return count_flops(lambda: encode_image(images))
