"""Zero-shot classification: class names x prompt templates, averaged into one unit vector per
class (CLIP's prompt ensembling); top-1 / top-5 accuracy of image embeddings against them."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def classifier_weights(encode_texts: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                       templates: Sequence[str]) -> torch.Tensor:
    """(embed_dim, n_classes): per class, the mean of its normalised prompt embeddings, renormalised.
    `encode_texts` maps sentences to embeddings (normalised or not)."""
    columns = []
    for name in classnames:
        emb = F.normalize(encode_texts([t.format(name) for t in templates]).float(), dim=-1).mean(dim=0)
        columns.append(F.normalize(emb, dim=0))
    return torch.stack(columns, dim=1)


def zero_shot_metrics(image: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> dict:
    """{'top1', 'top5', 'mean_per_class', 'per_class', 'n'} of argmax(image . class) against the labels;
    per_class: top-1 of each class id in 0..n_classes-1 (None for a class with no sample)."""
    if not len(labels):
        raise ValueError("zero-shot evaluation got no samples")
    if labels.min() < 0 or labels.max() >= weights.shape[1]:
        raise ValueError(f"labels span [{int(labels.min())}, {int(labels.max())}] but there are "
                         f"{weights.shape[1]} class names")
    topk = (image.float() @ weights.float()).topk(min(5, weights.shape[1]), dim=1).indices
    hit1 = topk[:, 0] == labels
    per_class = [hit1[labels == c].float().mean().item() if (labels == c).any() else None
                 for c in range(weights.shape[1])]
    present = [a for a in per_class if a is not None]
    return {"top1": hit1.float().mean().item(), "top5": (topk == labels[:, None]).any(dim=1).float().mean().item(),
            "mean_per_class": sum(present) / len(present), "per_class": per_class, "n": int(len(labels))}
