"""Linear probe: multinomial logistic regression on frozen image features, its L2 strength chosen
on a held-out validation share of the train split, then refit on the whole train split and scored
on the test split (the CLIP / ELEVATER protocol). Full-batch L-BFGS in torch: the same code runs
on the GPU for ImageNet-sized feature sets."""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held_out) row indices; `fraction` of every class held out (at least one sample of a class
    with two or more), deterministically."""
    gen = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for c in labels.unique():
        rows = (labels == c).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=gen)]
        n_held = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if len(rows) > 1 else 0
        held.append(rows[:n_held])
        kept.append(rows[n_held:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, reg: float, max_iter: int = 500
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising mean cross-entropy + reg/2 * ||W||^2 (bias unpenalised)."""
    w = torch.zeros(x.shape[1], n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * reg * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def accuracy(x: torch.Tensor, y: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> float:
    return ((x @ wb[0] + wb[1]).argmax(dim=1) == y).float().mean().item()


def mean_per_class(x: torch.Tensor, y: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> float:
    hit = (x @ wb[0] + wb[1]).argmax(dim=1) == y
    return torch.stack([hit[y == c].float().mean() for c in y.unique()]).mean().item()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 regs: Sequence[float], val_fraction: float = 0.2, max_iter: int = 500,
                 device: torch.device | str = "cpu") -> dict:
    """Sweep `regs` on a validation share of train, refit the best on all of train, score test."""
    if len(train_y) < 2 or len(test_y) < 1:
        raise ValueError(f"linear probe needs training and test samples (got {len(train_y)} / {len(test_y)})")
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    x, y = train_x.to(device, torch.float32), train_y.to(device)
    fit_rows, val_rows = stratified_split(train_y, val_fraction)
    sweep = {}
    if len(val_rows) == 0:  # one sample per class: nothing to validate on
        log.warning("linear probe: too few training samples per class for a validation split; "
                    "using the middle L2 strength of the sweep")
        best = sorted(float(r) for r in regs)[len(regs) // 2]
    else:
        for reg in regs:
            wb = fit_logistic(x[fit_rows], y[fit_rows], n_classes, reg, max_iter)
            sweep[float(reg)] = accuracy(x[val_rows], y[val_rows], wb)
        # Ties go to the stronger regularisation: the simpler classifier.
        best = max(sweep, key=lambda r: (sweep[r], r))
    wb = fit_logistic(x, y, n_classes, best, max_iter)
    tx, ty = test_x.to(device, torch.float32), test_y.to(device)
    top1 = accuracy(tx, ty, wb)
    log.info("linear probe: L2 %.0e chosen, test top-1 %.1f %%", best, 100 * top1)
    return {"top1": top1, "mean_per_class": mean_per_class(tx, ty, wb), "reg": best, "val_top1": sweep.get(best),
            "sweep": sweep, "train": int(len(train_y)), "test": int(len(test_y)), "classes": n_classes}
