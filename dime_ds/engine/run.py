"""One training job on this process's rank: world view, process group, trainer, final weights.
Called by the distill entry point (torchrun, srun and submitit alike) and by the demo."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dime_ds.config import save_config
from dime_ds.distributed.env import backend_for, device_for, init_distributed, world_info
from dime_ds.engine.loop import Trainer

log = logging.getLogger(__name__)
FINAL_WEIGHTS = "student.safetensors"


def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """The student's fp32 master weights (the optimizer's, not the half-precision module copies),
    gathered from ZeRO partitions; buffers from the module. Collective under ZeRO 1-3: every rank
    calls it, and every rank gets the dict."""
    module = engine.module
    stage0 = _stage0_masters(engine.optimizer)
    params = dict(module.named_parameters(remove_duplicate=False))
    full: dict[int, torch.Tensor] = {}
    for param in params.values():  # the same order on every rank: each call may be a collective
        if id(param) not in full:
            full[id(param)] = _fp32_master(param, stage0)
    state = {}
    for key, value in module.state_dict().items():
        tensor = full[id(params[key])] if key in params else value
        state[key] = tensor.detach().float().cpu().clone() if tensor.is_floating_point() else tensor.detach().cpu()
    return state


def _stage0_masters(optimizer) -> dict[int, torch.Tensor]:
    """Stage 0 with bf16/fp16: DeepSpeed's FP16 optimizers hold the fp32 copies outside the
    parameters' own hooks (safe_get_full_fp32_param returns None for them)."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from torch._utils import _unflatten_dense_tensors

    if isinstance(optimizer, FP16_UnfusedOptimizer):
        high = optimizer.fp32_groups
    elif isinstance(optimizer, FP16_Optimizer):
        high = [_unflatten_dense_tensors(flat, group) for flat, group in zip(optimizer.fp32_groups_flat,
                                                                              optimizer.fp16_groups)]
    else:
        return {}
    return {id(p): h for low, group in zip(optimizer.fp16_groups, high) for p, h in zip(low, group)}


def _fp32_master(param, stage0: dict) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    if id(param) in stage0:
        return stage0[id(param)]
    master = safe_get_full_fp32_param(param)  # ZeRO 1-3: partitions gathered
    if master is not None:
        return master.reshape(param.ds_shape if hasattr(param, "ds_shape") else param.shape)
    if hasattr(param, "ds_id"):  # ZeRO-3, not trained (no fp32 master): gather the module copy
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().float().clone()
    if param.dtype != torch.float32 and param.requires_grad:
        log.warning("no fp32 master weights for a %s parameter: saving its %s values", param.dtype, param.dtype)
    return param


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
