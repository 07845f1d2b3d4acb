"""CLIP-CID's cluster and instance discrimination across ranks (definitions: functional.py).

Cluster discrimination, partial-FC style: the k centres are sharded over ranks, rank r holding the
contiguous slice `shard_bounds(k, r, N)`. Every rank scores the whole global batch (student image
embeddings gathered with gradient, labels without) against the sampled centres of its own slice; the
softmax denominator is combined over ranks (the row max, a shift that needs no gradient, by an
all-reduce max; the sums of exp and the label's logit by all-reduces with gradient). Every rank
therefore returns the same value, the whole global batch's loss, and the gradient contract of dime.py
holds: each rank's backward gives d(sum over ranks of the losses)/d(its own features and its own
centre slice), N times the global loss's, so averaging over ranks (DDP, DeepSpeed) gives the global
loss's gradient. The centre slices are read from a replicated tensor (learnable centres: a parameter
the engine averages; rank r's slice gets gradient only on rank r, so the average is the exact
gradient) or held alone (fixed centres). Tested against functional.py in
tests/multirank/test_cid_dist.py.

Sampling (`cluster_sample_rate` < 1): every positive of the global batch and a `rate` share of the
other centres, drawn from (seed, step) alone, so every rank draws the same set and the result does not
depend on the rank split. Rate 1 scores every centre: the exact softmax.

Instance discrimination is a local loss like dime.py's: local student rows against the gathered
teacher columns, row i of rank r targeting column r * n_local + i.
"""
from __future__ import annotations

import math

import torch

from dime_ds.distributed import collectives as C
from dime_ds.losses.functional import UNLABELLED, instance_discrimination_block, margin_logits, normalize


def shard_bounds(k: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of the centres rank `rank` holds: contiguous slices, the first k % world_size one longer."""
    base, extra = divmod(k, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def sampled_centres(labels: torch.Tensor, k: int, rate: float, seed: int, step: int) -> torch.Tensor:
    """Sorted ids of the centres scored this step: every label in `labels` (the global batch's,
    UNLABELLED ignored) and ceil(rate * the others) drawn without replacement from a generator seeded
    by (seed, step) alone. Rate 1: all k."""
    if rate >= 1.0:
        return torch.arange(k)
    positives = torch.unique(labels[labels != UNLABELLED].cpu())
    is_positive = torch.zeros(k, dtype=torch.bool)
    is_positive[positives] = True
    n_negative = math.ceil(rate * (k - len(positives)))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)  # a distinct stream per (seed, step)
    order = torch.randperm(k, generator=generator)
    negatives = order[~is_positive[order]][:n_negative]
    return torch.sort(torch.cat([positives, negatives])).values


def cluster_loss(s_img: torch.Tensor, centre_slice: torch.Tensor, labels: torch.Tensor, *, k: int, scale: float,
                 margin: float, sample_rate: float, seed: int, step: int) -> torch.Tensor:
    """The global batch's cluster discrimination, the same value on every rank (see the module
    docstring). `s_img`: this rank's raw student image embeddings [n, d] (equal n on every rank);
    `centre_slice`: this rank's slice of the k centres, rows shard_bounds(k, rank, N) (raw, with
    gradient when learnable); `labels`: this rank's pseudo-classes [n] (UNLABELLED rows left out)."""
    rows = C.gather_with_grad(normalize(s_img))
    y = C.gather_no_grad(labels.to(rows.device))
    lo, hi = shard_bounds(k, C.rank(), C.world_size())
    if centre_slice.shape[0] != hi - lo:
        raise ValueError(f"rank {C.rank()} holds {centre_slice.shape[0]} centres, its slice of {k} is [{lo}, {hi})")
    ids = sampled_centres(y, k, sample_rate, seed, step).to(rows.device)
    ids = ids[(ids >= lo) & (ids < hi)]
    cos = rows @ normalize(centre_slice.index_select(0, ids - lo)).t()
    # The rows whose label this rank scores, and the label's column among its sampled ids.
    if ids.numel():
        col = torch.searchsorted(ids, y).clamp(max=ids.numel() - 1)
        own = torch.nonzero((y != UNLABELLED) & (ids[col] == y)).flatten()
    else:  # nothing of this rank's slice sampled
        col = own = torch.zeros(0, dtype=torch.long, device=rows.device)
    logits = margin_logits(cos, own, col[own], scale=scale, margin=margin)
    local_max = logits.max(dim=1).values if ids.numel() else logits.new_full((rows.shape[0],), -math.inf)
    shift = C.all_reduce_max(local_max.detach())
    sum_exp = C.all_reduce_sum_with_grad((logits - shift[:, None]).exp().sum(dim=1))
    label_logit = C.all_reduce_sum_with_grad(logits.new_zeros(rows.shape[0]).index_put((own,), logits[own, col[own]]))
    per_row = sum_exp.log() + shift - label_logit
    labelled = y != UNLABELLED
    return (per_row * labelled).sum() / labelled.sum().clamp(min=1)


def instance_loss(s_img: torch.Tensor, t_img: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """This rank's instance discrimination: its raw student image rows against every rank's teacher
    image columns (gathered without gradient), averaged over its rows; the mean over ranks is the
    global batch's loss."""
    rows = normalize(s_img)
    return instance_discrimination_block(rows, C.gather_no_grad(normalize(t_img)), temperature=temperature,
                                         row_offset=C.rank() * rows.shape[0])
