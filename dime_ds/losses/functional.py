"""DIME-FM and CLIP losses as pure math on whole-batch tensors. No torch.distributed here: the
distributed module gathers features and calls these (or their row-block forms) so that both
paths share one definition. Definitions: ../shared/DESIGN.md, "The method, precisely"."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def kd_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float,
          denominator: int | None = None) -> torch.Tensor:
    """Row-wise KL(softmax(t/T) || softmax(s/T)), summed over columns, averaged over rows.
    `denominator` lets a rank holding a block of rows divide by the global row count."""
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    per_row = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return per_row.sum() / (denominator if denominator is not None else per_row.shape[0])


def dime_losses(t_img: torch.Tensor, t_txt: torch.Tensor, s_img: torch.Tensor, s_txt: torch.Tensor, *,
                w_vl: float = 0.7, w_pvl: float = 0.3, w_ud: float = 0.0,
                t_vl: float = 1.0, t_pvl: float = 3.0, t_ud: float = 7.0,
                scale: float = 100.0) -> dict[str, torch.Tensor]:
    """DIME-FM losses over one whole batch of unpaired images and sentences.

    Inputs are raw embeddings, rows are samples; `s_txt` may be `t_txt` itself (the student uses
    the teacher's frozen text tower). Returns `vl`, `pvl`, `ud` and `total` (weighted sum)."""
    ti, tt, si, st = normalize(t_img), normalize(t_txt), normalize(s_img), normalize(s_txt)
    # L_vl: image->text rows and text->image rows (the transposed matrices), summed.
    t_it, s_it = scale * ti @ tt.t(), scale * si @ st.t()
    vl = kd_kl(t_it, s_it, t_vl) + kd_kl(t_it.t(), s_it.t(), t_vl)
    # L_pvl: the teacher's image embeddings stand in for captions.
    t_ii = scale * ti @ ti.t()
    pvl = 2.0 * kd_kl(t_ii, scale * si @ ti.t(), t_pvl)
    # L_ud: uni-modal structure; for sentences it vanishes when the student reuses the teacher's text.
    ud = 2.0 * kd_kl(t_ii, scale * si @ si.t(), t_ud)
    if st is not tt:
        ud = ud + 2.0 * kd_kl(scale * tt @ tt.t(), scale * st @ st.t(), t_ud)
    total = w_vl * vl + w_pvl * pvl + w_ud * ud
    return {"vl": vl, "pvl": pvl, "ud": ud, "total": total}


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over paired rows (row i of img matches row i of txt)."""
    logits = logit_scale.exp().clamp(max=100.0) * normalize(img) @ normalize(txt).t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
