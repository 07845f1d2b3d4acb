"""Weight decay on matrices only: biases, norms, embeddings' positions and the logit scale are
exempt, as in CLIP and OpenCLIP training."""
from __future__ import annotations

from torch import nn

NO_DECAY_HINTS = ("bias", "ln", "norm", "bn", "logit_scale", "positional_embedding", "class_embedding")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or any(h in name for h in NO_DECAY_HINTS)
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
