"""One training job on this process's rank: world view, process group, trainer, final weights.
Called by the distill entry point (torchrun, srun and submitit alike) and by the demo."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dime_ds.config import save_config
from dime_ds.dist.env import backend_for, device_for, init_distributed, world_info
from dime_ds.engine.loop import Trainer

log = logging.getLogger(__name__)
FINAL_WEIGHTS = "student.safetensors"


def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """The student's full weights (fp32 copies), gathered from ZeRO-3 partitions when needed.
    Collective under ZeRO-3: every rank calls it; rank 0 gets the dict."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict() or {}
    else:
        state = engine.module.state_dict()
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def run_training(cfg: Any) -> dict:
    world = world_info()
    device = device_for(world, cfg.device)
    init_distributed(world, backend_for(device, cfg.dist.backend), cfg.dist.timeout_min)
    if world.rank == 0:
        save_config(cfg, cfg.run_dir)
    trainer = Trainer(cfg, world, device)
    summary = trainer.train()
    state = consolidated_state_dict(trainer.engine)
    if world.rank == 0 and summary["status"] == "completed":
        out = Path(cfg.run_dir) / "final"
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / (FINAL_WEIGHTS + ".tmp")))
        (out / (FINAL_WEIGHTS + ".tmp")).replace(out / FINAL_WEIGHTS)
        summary["final_weights"] = str(out / FINAL_WEIGHTS)
    log.info("run %s %s at step %d", cfg.name, summary["status"], summary["step"])
    return summary
