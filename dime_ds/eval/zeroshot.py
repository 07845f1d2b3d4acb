"""Zero-shot classification: class names x prompt templates, averaged into one unit vector per
class (CLIP's prompt ensembling); top-1 / top-5 accuracy of image embeddings against them."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def classifier_weights(encode_text: Callable, tokenize: Callable, classnames: Sequence[str],
                       templates: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """(embed_dim, n_classes) matrix of normalised, template-averaged class embeddings."""
    columns = []
    for name in classnames:
        tokens = tokenize([t.format(name) for t in templates]).to(device)
        emb = F.normalize(encode_text(tokens).float(), dim=-1).mean(dim=0)
        columns.append(F.normalize(emb, dim=0))
    return torch.stack(columns, dim=1)


@torch.no_grad()
def zero_shot_accuracy(encode_image: Callable, weights: torch.Tensor,
                       batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       device: torch.device | str = "cpu") -> dict:
    """{'top1', 'top5', 'n'} of argmax(image . class) against the labels."""
    correct1 = correct5 = total = 0
    k = min(5, weights.shape[1])
    for images, labels in batches:
        emb = F.normalize(encode_image(images.to(device)).float(), dim=-1)
        topk = (emb @ weights.to(emb.device)).topk(k, dim=1).indices.cpu()
        correct1 += (topk[:, 0] == labels).sum().item()
        correct5 += (topk == labels[:, None]).any(dim=1).sum().item()
        total += labels.numel()
    if total == 0:
        raise ValueError("zero-shot evaluation got no samples")
    return {"top1": correct1 / total, "top5": correct5 / total, "n": total}
