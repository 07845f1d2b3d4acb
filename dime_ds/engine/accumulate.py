"""Gradient accumulation whose softmaxes span the whole accumulated global batch, at the memory of
one micro-batch (GradCache, Gao et al. 2021; open_clip's --accum-freq).

One optimizer step over A micro-batches, in two passes:
1. `embed`: every micro-batch through the student without gradient; only its embeddings are kept.
2. `backward_each`: the objective's loss on all A micro-batches at once (its gathers make that the
   whole global batch), differentiated with respect to the student's embeddings only; then each
   micro-batch is forwarded again, with gradient, and backpropagated with its slice of those
   embedding gradients, so the parameter gradients summed over the A backwards are exactly those
   of the whole-batch loss.
The student's stochastic layers (dropout, drop-path) see the same random numbers in both passes:
each micro-batch's generator state is recorded before its first forward and restored before its
second, and afterwards the generators continue from where the first pass left them. Its running
statistics (BatchNorm) move once per micro-batch, in the second pass, as in plain accumulation: the
first pass restores every buffer it changed. A BatchNorm layer in training mode normalises each
micro-batch by that micro-batch's statistics, as plain accumulation does; so for such a student A
micro-batches equal a batch A times larger only where BatchNorm would see the same batches.

Nothing here knows DeepSpeed: the trainer hands in its engine's forward and a `backward_and_step`
that must not rescale the surrogate by the accumulation count (the surrogate's gradient already is
the whole batch's)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from dime_ds.objectives.base import Objective, StudentForward


@dataclass(frozen=True)
class RngState:
    """The generators a student's stochastic layers draw from: torch's CPU one and, on CUDA, the device's."""

    cpu: torch.Tensor
    device: torch.device
    cuda: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> "RngState":
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), device, cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


@dataclass
class Embedded:
    """The first pass: each micro-batch's detached features and the RNG state its forward started from."""

    features: list[dict]
    rng: list[RngState]
    rng_after: RngState


@contextlib.contextmanager
def buffers_kept(module: nn.Module | None) -> Iterator[None]:
    """Every buffer of `module` (BatchNorm's running mean, variance and batch count) as it was before."""
    saved = [(b, b.detach().clone()) for b in module.buffers()] if module is not None else []
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def embed(objective: Objective, forward: StudentForward, batches: Sequence[dict], device: torch.device,
          student: nn.Module | None = None) -> Embedded:
    """Pass 1: the student's features of every micro-batch, without gradient; `student` (the module
    behind `forward`) keeps its buffers, so that only pass 2 updates running statistics."""
    features, rng = [], []
    with torch.no_grad(), buffers_kept(student):
        for batch in batches:
            rng.append(RngState.capture(device))
            features.append(objective.student_features(forward, batch))
    return Embedded(features, rng, RngState.capture(device))


def concat_samples(parts: Sequence[dict], shared: Sequence[str] = ()) -> dict:
    """Micro-batch dicts merged into one: per-sample tensors concatenated along dim 0 (micro-batch
    order), a `shared` entry (the same value in every micro-batch) taken from the first, None kept."""
    merged = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if values[0] is None or key in shared:
            merged[key] = values[0]
        else:
            merged[key] = torch.cat(values, dim=0)
    return merged


def _feature_gradients(objective: Objective, embedded: Embedded, targets: Sequence[dict]
                       ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The whole batch's losses (detached) and, per micro-batch, d total / d each feature."""
    shared = objective.SHARED_FEATURES
    merged = concat_samples(embedded.features, shared)
    leaves = {k: v.detach().requires_grad_(True) for k, v in merged.items() if v is not None}
    losses = objective.losses({**merged, **leaves}, concat_samples(targets))
    # The loss's own collectives (the all-gather with gradient) run here, in lockstep on every rank.
    grads = torch.autograd.grad(losses["total"], list(leaves.values()), allow_unused=True)
    grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
    count = len(embedded.features)
    per_batch: list[dict] = [{} for _ in range(count)]
    for key, grad in grads.items():
        if key in shared:  # every re-forward recomputes the same value: each carries 1/A of its gradient
            for slot in per_batch:
                slot[key] = grad / count
            continue
        sizes = [f[key].shape[0] for f in embedded.features]
        for slot, piece in zip(per_batch, torch.split(grad, sizes, dim=0)):
            slot[key] = piece
    return {k: v.detach() for k, v in losses.items()}, per_batch


def backward_each(objective: Objective, forward: StudentForward, backward_and_step: Callable[[torch.Tensor], None],
                  batches: Sequence[dict], targets: Sequence[dict], embedded: Embedded) -> dict[str, torch.Tensor]:
    """Pass 2: the loss over all micro-batches, then each re-forwarded with gradient and
    backpropagated with its slice of the embedding gradients. Returns the whole batch's losses."""
    losses, grads = _feature_gradients(objective, embedded, targets)
    for batch, rng, grad in zip(batches, embedded.rng, grads):
        rng.restore()
        features = objective.student_features(forward, batch)
        # d surrogate / d features = grad: its parameter gradient is this micro-batch's share.
        surrogate = sum((features[k] * g).sum() for k, g in grad.items())
        backward_and_step(surrogate)
    embedded.rng_after.restore()
    return losses
