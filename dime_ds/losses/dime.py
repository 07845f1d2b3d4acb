"""DIME-FM and CLIP losses across ranks: each rank's local rows against all-gathered columns.

Student features are gathered with gradient, teacher features without; the math is
`functional.dime_losses_block` / `functional.clip_loss_block`, shared with the single-process path.

Contract (tested in tests/multirank/test_losses_dist.py against the single-process loss on the whole
global batch):
- Every rank holds an equal share of the images and an equal share of the sentences (the counts of
  images and sentences may differ from each other). The gathers require it.
- Each returned loss is the rank's local loss, the mean over its local rows. The mean over ranks of
  the local losses is the whole-batch loss.
- Gradients: backward of the local loss on every rank, then the average of parameter gradients over
  ranks (what DDP and DeepSpeed do) gives the gradient of the whole-batch loss. The gather's
  backward hands each rank the sum, over all ranks, of the gradients with respect to its own
  columns, so rank q's gradient is d(sum_r L_r)/d(its features); averaging over ranks divides that
  sum by the world size, which is exactly d(mean_r L_r) = d(global loss).
- In a single process without a process group this is `functional` itself.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from dime_ds.distributed import collectives as C
from dime_ds.losses.functional import DimeFeatures, SpaceFeatures, clip_loss_block, dime_losses_block, normalize

DIME_KEYS = ("w_vl", "w_pvl", "w_ud", "t_vl", "t_pvl", "t_ud", "scale")


class LossWeights(Protocol):
    """What the loss reads of the `loss` config section (config/schema.py LossConfig owns the defaults);
    a protocol, so losses/ stays below config/ and takes any object with these attributes."""

    w_vl: float
    w_pvl: float
    w_ud: float
    t_vl: float
    t_pvl: float
    t_ud: float
    scale: float


def dime_kwargs(loss_cfg: LossWeights) -> dict[str, float]:
    """The DIME-FM weights, temperatures and scale of a `loss` section (its defaults are the paper's)."""
    return {k: float(getattr(loss_cfg, k)) for k in DIME_KEYS}


def gather_features(feats: DimeFeatures) -> DimeFeatures:
    """All ranks' normalised features in rank order: teacher's without gradient, student's with it;
    the teacher's sentences serve as the student's when the student uses the teacher's text tower."""
    t_txt = C.gather_no_grad(feats.t_txt)
    s_txt = C.gather_with_grad(feats.s_txt) if feats.own_text else t_txt
    return DimeFeatures(C.gather_no_grad(feats.t_img), t_txt, C.gather_with_grad(feats.s_img), s_txt)


def gather_space(feats: SpaceFeatures) -> SpaceFeatures:
    """A further teacher's features of all ranks: the teacher's without gradient, the student's with."""
    return SpaceFeatures(C.gather_no_grad(feats.t_img), C.gather_no_grad(feats.t_txt), C.gather_with_grad(feats.s_img))


def dime_loss(t_img: torch.Tensor, t_txt: torch.Tensor, s_img: torch.Tensor, s_txt: torch.Tensor,
              loss_cfg: LossWeights, extra: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = (),
              weights: Sequence[float] | None = None, scales: Sequence[float] | None = None,
              combine: str = "prob") -> dict[str, torch.Tensor]:
    """This rank's DIME-FM losses (`vl`, `pvl`, `ud`, `total`) from its raw local embeddings.
    `s_txt is t_txt` means the student uses the teacher's frozen text tower. An ensemble's further
    teachers come in `extra` as (t_img, t_txt, the student's images in that teacher's space), with one
    weight and scale per teacher (functional.dime_losses_block). See the module docstring for the
    equal-share requirement and how the local losses relate to the global batch; use
    `reduce_for_logging` for the global values."""
    rows = DimeFeatures.of(t_img, t_txt, s_img, s_txt)
    extra_rows = [SpaceFeatures.of(*e) for e in extra]
    return dime_losses_block(rows, gather_features(rows), **dime_kwargs(loss_cfg), extra_rows=extra_rows,
                             extra_cols=[gather_space(e) for e in extra_rows], weights=weights, scales=scales,
                             combine=combine)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """This rank's symmetric InfoNCE over paired rows: local row i is global row rank * n_local + i,
    scored against every rank's rows. Both sides are the trained model's, gathered with gradient."""
    img, txt = normalize(img), normalize(txt)
    return clip_loss_block(img, txt, C.gather_with_grad(img), C.gather_with_grad(txt), logit_scale,
                           row_offset=C.rank() * img.shape[0])


def reduce_for_logging(losses: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Global values of local losses (mean over ranks, one collective, no gradient). Every rank must
    call it with the same keys."""
    keys = list(losses)
    if not keys:
        return {}
    values = [torch.as_tensor(losses[k]).detach().float().reshape(()) for k in keys]
    device = next((v.device for v in values if v.device.type != "cpu"), torch.device("cpu"))
    mean = C.all_reduce_mean(torch.stack([v.to(device) for v in values]))
    return dict(zip(keys, mean.tolist()))
