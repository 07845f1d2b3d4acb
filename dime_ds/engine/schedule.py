"""Learning-rate schedule owned by the Hydra `optim` section: linear warmup, then cosine or constant."""
from __future__ import annotations

import math

from dime_ds.config.schema import OptimConfig


def lr_at(step: int, optim_cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    lr, warmup, total = optim_cfg.lr, optim_cfg.warmup_steps, optim_cfg.steps
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if optim_cfg.schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return optim_cfg.min_lr + 0.5 * (lr - optim_cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
