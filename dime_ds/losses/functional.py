"""DIME-FM and CLIP losses as pure math on tensors. No collectives here: dime.py gathers the
features across ranks and calls the row-block forms below (local rows against gathered columns), and
the whole-batch forms call the same block functions with rows = columns, so both paths share one
definition. Definitions: docs/design.md, "The method, precisely". Weights and temperatures have no
defaults here: their one owner is the `loss` config section (config/schema.py, LossConfig)."""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def kl_rows(log_p_t: torch.Tensor, log_p_s: torch.Tensor, denominator: int | None = None) -> torch.Tensor:
    """Row-wise KL(p_t || p_s) of log-probabilities, summed over columns, averaged over rows.
    `denominator` lets a rank holding a block of rows divide by the global row count."""
    per_row = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return per_row.sum() / (denominator if denominator is not None else per_row.shape[0])


def kd_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float,
          denominator: int | None = None) -> torch.Tensor:
    """Row-wise KL(softmax(t/T) || softmax(s/T)), summed over columns, averaged over rows."""
    return kl_rows(F.log_softmax(teacher_logits / temperature, dim=-1),
                   F.log_softmax(student_logits / temperature, dim=-1), denominator)


def mixed_log_probs(logits: Sequence[torch.Tensor], weights: Sequence[float], temperature: float,
                    combine: str = "prob") -> torch.Tensor:
    """log of the teachers' combined distribution at temperature T: `prob` = log sum_k w_k softmax(l_k/T)
    (MobileCLIP2's average after softmax), `logit` = log softmax(sum_k w_k l_k / T). One set of logits
    is plain log_softmax(l/T), so a single teacher is exactly DIME-FM."""
    if len(logits) == 1:
        return F.log_softmax(logits[0] / temperature, dim=-1)
    if combine == "logit":
        return F.log_softmax(sum(w * logit for w, logit in zip(weights, logits)) / temperature, dim=-1)
    if combine != "prob":
        raise ValueError(f"combine must be prob or logit, not {combine!r}")
    return torch.logsumexp(torch.stack([math.log(w) + F.log_softmax(logit / temperature, dim=-1)
                                        for w, logit in zip(weights, logits)]), dim=0)


class DimeFeatures(NamedTuple):
    """L2-normalised embeddings, rows are samples: teacher and student images and sentences.
    `s_txt is t_txt` when the student uses the teacher's frozen text tower."""
    t_img: torch.Tensor
    t_txt: torch.Tensor
    s_img: torch.Tensor
    s_txt: torch.Tensor

    @classmethod
    def of(cls, t_img: torch.Tensor, t_txt: torch.Tensor, s_img: torch.Tensor, s_txt: torch.Tensor
           ) -> "DimeFeatures":
        """Normalise raw embeddings, keeping `s_txt is t_txt` (normalised once)."""
        tt = normalize(t_txt)
        return cls(normalize(t_img), tt, normalize(s_img), tt if s_txt is t_txt else normalize(s_txt))

    @property
    def own_text(self) -> bool:
        return self.s_txt is not self.t_txt


class SpaceFeatures(NamedTuple):
    """A further teacher of an ensemble (L2-normalised): its image and sentence embeddings, and the
    student's images projected into its space (the student's own head for that teacher)."""
    t_img: torch.Tensor
    t_txt: torch.Tensor
    s_img: torch.Tensor

    @classmethod
    def of(cls, t_img: torch.Tensor, t_txt: torch.Tensor, s_img: torch.Tensor) -> "SpaceFeatures":
        return cls(normalize(t_img), normalize(t_txt), normalize(s_img))


def dime_losses_block(rows: DimeFeatures, cols: DimeFeatures, *, w_vl: float, w_pvl: float, w_ud: float,
                      t_vl: float, t_pvl: float, t_ud: float, scale: float,
                      extra_rows: Sequence[SpaceFeatures] = (), extra_cols: Sequence[SpaceFeatures] = (),
                      weights: Sequence[float] | None = None, scales: Sequence[float] | None = None,
                      combine: str = "prob") -> dict[str, torch.Tensor]:
    """DIME-FM losses of a block of rows (images and sentences) against all columns, each KL term
    averaged over the block's own rows (images for image rows, sentences for sentence rows).

    `cols` holds the whole batch; `rows` is the whole batch too (single process) or one rank's equal
    share of it, in which case the mean over ranks of the result is the whole-batch loss. The
    student uses the teacher's text tower when `rows.s_txt is rows.t_txt`; the sentence part of L_ud
    then vanishes and is not computed. Returns `vl`, `pvl`, `ud` and `total` (weighted sum).

    An ensemble: `rows`/`cols` carry the first teacher, `extra_rows`/`extra_cols` the others; every
    term's target is the teachers' combined distribution (`mixed_log_probs`: `weights`, one per teacher,
    summing to 1; teacher k's logits at its own `scales[k]`, the student's at `scale`). L_pvl compares
    the student with each teacher's own image space: its distribution there is combined the same way
    from its projections `s_img` of each space. A teacher of weight 0 takes no part."""
    spaces_r = [SpaceFeatures(rows.t_img, rows.t_txt, rows.s_img), *extra_rows]
    spaces_c = [SpaceFeatures(cols.t_img, cols.t_txt, cols.s_img), *extra_cols]
    weights = [1.0] * len(spaces_r) if weights is None else list(weights)
    scales = [scale] * len(spaces_r) if scales is None else list(scales)
    if not len(spaces_r) == len(spaces_c) == len(weights) == len(scales):
        raise ValueError("one set of rows, columns, weight and scale per teacher")
    on = [k for k, w in enumerate(weights) if w > 0]
    if not on:
        raise ValueError("every teacher has weight 0")
    w = [weights[k] / sum(weights[k] for k in on) for k in on]

    def target(make, temperature: float) -> torch.Tensor:  # make(k, s) = teacher k's logits at scale s
        return mixed_log_probs([make(k, scales[k]) for k in on], w, temperature, combine)

    r, c = rows, cols
    # L_vl: image rows over all sentences, sentence rows over all images, summed.
    vl = kl_rows(target(lambda k, s: s * spaces_r[k].t_img @ spaces_c[k].t_txt.t(), t_vl),
                 F.log_softmax(scale * r.s_img @ c.s_txt.t() / t_vl, dim=-1)) \
        + kl_rows(target(lambda k, s: s * spaces_r[k].t_txt @ spaces_c[k].t_img.t(), t_vl),
                  F.log_softmax(scale * r.s_txt @ c.s_img.t() / t_vl, dim=-1))
    t_ii = {k: scales[k] * spaces_r[k].t_img @ spaces_c[k].t_img.t() for k in on}
    # L_pvl: the teacher's image embeddings stand in for captions, each teacher's in its own space.
    s_pvl = [scale * spaces_r[k].s_img @ spaces_c[k].t_img.t() for k in on]
    pvl = 2.0 * kl_rows(target(lambda k, s: t_ii[k], t_pvl), mixed_log_probs(s_pvl, w, t_pvl, combine))
    # L_ud: uni-modal structure; for sentences only when the student has its own text tower.
    ud = 2.0 * kl_rows(target(lambda k, s: t_ii[k], t_ud), F.log_softmax(scale * r.s_img @ c.s_img.t() / t_ud, dim=-1))
    if r.own_text:
        ud = ud + 2.0 * kl_rows(target(lambda k, s: s * spaces_r[k].t_txt @ spaces_c[k].t_txt.t(), t_ud),
                                F.log_softmax(scale * r.s_txt @ c.s_txt.t() / t_ud, dim=-1))
    total = w_vl * vl + w_pvl * pvl + w_ud * ud
    return {"vl": vl, "pvl": pvl, "ud": ud, "total": total}


def dime_losses(t_img: torch.Tensor, t_txt: torch.Tensor, s_img: torch.Tensor, s_txt: torch.Tensor, *,
                w_vl: float, w_pvl: float, w_ud: float, t_vl: float, t_pvl: float, t_ud: float,
                scale: float, extra: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = (),
                weights: Sequence[float] | None = None, scales: Sequence[float] | None = None,
                combine: str = "prob") -> dict[str, torch.Tensor]:
    """DIME-FM losses over one whole batch of unpaired images and sentences.

    Inputs are raw embeddings, rows are samples; `s_txt` may be `t_txt` itself (the student uses
    the teacher's frozen text tower). An ensemble's further teachers come in `extra` as (t_img, t_txt,
    the student's images in that teacher's space), with `weights`, `scales` and `combine` as in
    `dime_losses_block`. Returns `vl`, `pvl`, `ud` and `total` (weighted sum)."""
    feats = DimeFeatures.of(t_img, t_txt, s_img, s_txt)
    spaces = [SpaceFeatures.of(*e) for e in extra]
    return dime_losses_block(feats, feats, w_vl=w_vl, w_pvl=w_pvl, w_ud=w_ud, t_vl=t_vl, t_pvl=t_pvl,
                             t_ud=t_ud, scale=scale, extra_rows=spaces, extra_cols=spaces, weights=weights,
                             scales=scales, combine=combine)


def clip_loss_block(img_rows: torch.Tensor, txt_rows: torch.Tensor, img_cols: torch.Tensor,
                    txt_cols: torch.Tensor, logit_scale: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
    """Symmetric InfoNCE of a block of paired rows against all columns (L2-normalised inputs): row i
    of the block matches column `row_offset + i`. Averaged over the block's rows."""
    s = logit_scale.exp().clamp(max=100.0)
    labels = row_offset + torch.arange(img_rows.shape[0], device=img_rows.device)
    return 0.5 * (F.cross_entropy(s * img_rows @ txt_cols.t(), labels)
                  + F.cross_entropy(s * txt_rows @ img_cols.t(), labels))


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over paired rows (row i of img matches row i of txt)."""
    img, txt = normalize(img), normalize(txt)
    return clip_loss_block(img, txt, img, txt, logit_scale)


# ---------------------------------------------------------------------------- CLIP-CID terms
# CLIP-CID's scale, margin and temperature (32, 0.3, 0.07, the UNICOM/MLCD line's values; the paper's
# own are not public) are LossConfig's defaults, keyword-only and required here like every weight above.
UNLABELLED = -1  # a row without a pseudo-class (dime_ds.data.pseudo_labels.UNLABELLED)
COS_EPS = 1e-7  # arccos is clamped inside (-1, 1): its derivative is infinite at the ends


def margin_logits(cos: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *, scale: float,
                  margin: float) -> torch.Tensor:
    """scale * cos, with scale * cos(arccos(cos) + margin) at the positions (rows[i], cols[i]), each a
    row's own class: the additive angular margin (ArcFace) of cluster discrimination. The arccos runs
    on those positions only: the logits may hold 10^9 entries at scale."""
    theta = torch.acos(cos[rows, cols].clamp(-1.0 + COS_EPS, 1.0 - COS_EPS))
    return (scale * cos).index_put((rows, cols), scale * torch.cos(theta + margin))


def cluster_discrimination(s_img: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, *, scale: float,
                           margin: float) -> torch.Tensor:
    """CLIP-CID's cluster discrimination over one whole batch and all centres: s = normalised student
    image embeddings [n, d] (in the teacher's space), W = normalised centres [k, d], cos_j = s.W_j;
    logits scale * cos_j for j != y and scale * cos(theta_y + margin) for the label y, theta_y =
    arccos(clamp(cos_y, -1 + 1e-7, 1 - 1e-7)); mean cross-entropy. Rows labelled UNLABELLED (-1: an
    image the cluster stage never saw) are left out of the mean; with none labelled the loss is 0.
    `scale` and `margin` have no defaults here: LossConfig.cluster_scale / cluster_margin own them."""
    cos = normalize(s_img) @ normalize(centres).t()
    rows = torch.nonzero(labels != UNLABELLED).flatten()
    logits = margin_logits(cos, rows, labels[rows], scale=scale, margin=margin)
    if rows.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits[rows], labels[rows])


def instance_discrimination_block(s_rows: torch.Tensor, t_cols: torch.Tensor, *, temperature: float,
                                  row_offset: int = 0) -> torch.Tensor:
    """InfoNCE of a block of student image rows against all teacher image columns (both L2-normalised):
    row i's target is column `row_offset + i`, the teacher's embedding of the same image. Averaged over
    the block's rows."""
    targets = row_offset + torch.arange(s_rows.shape[0], device=s_rows.device)
    return F.cross_entropy(s_rows @ t_cols.t() / temperature, targets)


def instance_discrimination(s_img: torch.Tensor, t_img: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """CLIP-CID's instance discrimination over one whole batch: logits = s.tᵀ / temperature of the
    normalised student and teacher image embeddings, the target of row i is column i; mean
    cross-entropy. `temperature` has no default here: LossConfig.instance_temperature owns it."""
    s, t = normalize(s_img), normalize(t_img)
    return instance_discrimination_block(s, t, temperature=temperature)
