"""Image-text retrieval recall at K, both directions (Flickr30k / MS-COCO protocol).

An image may own several captions. image->text: an image counts at K when any of its captions is
among its K best-scoring captions; text->image: a caption counts when its image is among its K
best-scoring images. Rank = the number of candidates scoring strictly higher than the true one, so
ties never count against the model and the result does not depend on sort stability."""
from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, text_owner: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), block: int = 4096) -> dict:
    """{'image_to_text_R@K', 'text_to_image_R@K', 'images', 'texts'} from normalised embeddings."""
    n_img, n_txt = image.shape[0], text.shape[0]
    if n_img == 0 or n_txt == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    image, text = image.float(), text.float()
    # text -> image: the true image's score against every image's, per caption.
    t2i_rank = torch.empty(n_txt, dtype=torch.long)
    for s in range(0, n_txt, block):
        sims = text[s:s + block] @ image.t()
        true = sims.gather(1, text_owner[s:s + block, None])
        t2i_rank[s:s + block] = (sims > true).sum(dim=1)
    # image -> text: the best rank among an image's own captions.
    i2t_rank = torch.full((n_img,), n_txt, dtype=torch.long)
    for s in range(0, n_img, block):
        sims = image[s:s + block] @ text.t()  # (b, M)
        rows = torch.arange(s, min(s + block, n_img))
        own = text_owner[None, :] == rows[:, None]
        best_true = sims.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values
        rank = (sims > best_true).sum(dim=1)
        i2t_rank[s:s + block] = torch.where(own.any(dim=1), rank, torch.full_like(rank, n_txt))
    out = {"images": n_img, "texts": n_txt}
    for k in ks:
        out[f"image_to_text_R@{k}"] = (i2t_rank < k).float().mean().item()
        out[f"text_to_image_R@{k}"] = (t2i_rank < k).float().mean().item()
    return out
