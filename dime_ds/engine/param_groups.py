"""Weight decay on matrices only: biases, norms, embeddings' positions and the logit scale are
exempt, as in CLIP and OpenCLIP training; so are CLIP-CID's learnable centres, used normalised (decay
would only shrink their norm)."""
from __future__ import annotations

from typing import Iterable

from torch import nn

NO_DECAY_HINTS = ("bias", "ln", "norm", "bn", "logit_scale", "positional_embedding", "class_embedding",
                  "objective_params.centres")


def split_names(named_ndims: Iterable[tuple[str, int]]) -> tuple[list[str], list[str]]:
    """(decayed, exempt) parameter names in the given order: the optimizer's two groups. Checkpoint
    consolidation uses it to name a stage-0 optimizer's fp32 copies, which carry no names."""
    decay, exempt = [], []
    for name, ndim in named_ndims:
        (exempt if ndim < 2 or any(h in name for h in NO_DECAY_HINTS) else decay).append(name)
    return decay, exempt


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    decay, exempt = split_names((name, p.ndim) for name, p in params.items())
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in exempt], "weight_decay": 0.0}]
