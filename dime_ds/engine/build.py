"""deepspeed.initialize for the student, without the optimizer step DeepSpeed takes while it builds.

Stage 0 in half precision wraps the optimizer in FP16_UnfusedOptimizer, whose constructor calls
`optimizer.step()` on zero gradients to create the states. AdamW counts that step: its bias
correction then runs one step ahead (the first real update comes out sqrt(1 + beta2) / (1 + beta1)
of the right one, and the loss curve parts from ZeRO-1's from the first step on), and its decoupled
weight decay shrinks every weight once at the initial learning rate. Here weight decay is held at 0
for the build, so that step leaves every weight as it was, and the states it counted are dropped: no
real step has been taken yet.

And alone (ZeRO-0, one data-parallel rank) the engine skips its gradient all-reduce, which over one
rank still flattens every gradient into buckets and copies it back (aten::cat and copy_ in the
backward's profile) to sum it with nothing."""
from __future__ import annotations

import deepspeed
import torch


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler, config: dict):
    """(engine, scheduler) as deepspeed.initialize builds them, the optimizer untouched by the build."""
    decays = [group["weight_decay"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0
    try:
        engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                       lr_scheduler=lr_scheduler, config=config)
    finally:
        for group, decay in zip(optimizer.param_groups, decays):  # the wrappers keep these group dicts
            group["weight_decay"] = decay
    optimizer.state.clear()  # lazily created again at the first real step
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False  # DeepSpeed's own switch (off without a backend)
    return engine, scheduler
