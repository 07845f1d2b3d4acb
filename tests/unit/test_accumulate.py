"""Two-pass gradient accumulation (engine/accumulate.py) on one process: A micro-batches give the
loss and the parameter gradients of one batch A times larger, for DIME-FM (frozen and own text
tower) and CLIP; dropout draws the same masks in both passes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dime_ds.engine import accumulate
from dime_ds.engine.accumulate import concat_samples
from tests.accumulate_fixtures import (CPU, DIM, DIM_IN, OBJECTIVES, TinyStudent, accumulated_step, assert_grads_close,
                                      global_batch, grads, plain_step, split)

A = 4


@pytest.mark.parametrize("kind", sorted(OBJECTIVES))
def test_accumulated_equals_the_whole_batch(kind):
    batch = global_batch(4 * A, seed=len(kind))
    reference = TinyStudent()
    want = plain_step(OBJECTIVES[kind](), reference, batch)
    want_grads = grads(reference)
    untrained = {"dime_frozen_text": ("txt.", "logit_scale"), "dime_own_text": ("logit_scale",), "clip": ()}[kind]
    assert set(want_grads) == {n for n, _ in reference.named_parameters() if not n.startswith(untrained)}

    student = TinyStudent()
    got = accumulated_step(OBJECTIVES[kind](), student, split(batch, A))
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert_grads_close(grads(student), want_grads)

    # What plain accumulation of per-micro-batch losses would have given: a different loss.
    per_micro = sum(plain_step(OBJECTIVES[kind](), TinyStudent(), b)["total"] for b in split(batch, A)) / A
    assert per_micro.item() != pytest.approx(want["total"].item(), rel=1e-3)


@pytest.mark.parametrize("kind", ["dime_own_text", "clip"])
def test_dropout_draws_the_same_masks_in_both_passes(kind):
    """The reference forwards each micro-batch once, with gradient, from the same generator state,
    and takes the loss over all of them: the two-pass step must match it, and leave the generator
    where the reference's forwards left it."""
    micro = split(global_batch(4 * A, seed=9), A)
    objective = OBJECTIVES[kind]()

    reference = TinyStudent(dropout=0.5)
    torch.manual_seed(5)
    parts = [objective.student_features(reference, b) for b in micro]
    want = objective.losses(concat_samples(parts, objective.SHARED_FEATURES),
                            concat_samples([objective.targets(b) for b in micro]))
    want["total"].backward()
    rng_after = torch.get_rng_state()

    student = TinyStudent(dropout=0.5)
    torch.manual_seed(5)
    got = accumulated_step(objective, student, micro)
    assert torch.equal(torch.get_rng_state(), rng_after)
    torch.testing.assert_close(got["total"], want["total"].detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(student), grads(reference))


def test_concat_samples_keeps_shared_and_missing_features():
    parts = [{"image": torch.full((2, 3), float(i)), "text": None, "logit_scale": torch.tensor([1.0])}
             for i in range(3)]
    merged = concat_samples(parts, shared=("logit_scale",))
    assert merged["image"].shape == (6, 3) and merged["image"][4, 0] == 2.0
    assert merged["text"] is None and merged["logit_scale"] is parts[0]["logit_scale"]


class BatchNormStudent(TinyStudent):
    """TinyStudent with BatchNorm in its image tower: running statistics that every forward in
    training mode moves."""

    def __init__(self):
        super().__init__()
        self.img = nn.Sequential(nn.Linear(DIM_IN, 16), nn.BatchNorm1d(16), nn.GELU(), nn.Linear(16, DIM))


def _statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


def test_running_statistics_move_once_per_micro_batch_as_in_plain_accumulation():
    """The reference is plain accumulation: each micro-batch forwarded once, with gradient, in training
    mode, the loss taken over all of them. The two-pass step's extra forward without gradient must not
    move the statistics a second time; loss and gradients match too (BatchNorm normalises each
    micro-batch by its own statistics on both sides)."""
    micro = split(global_batch(4 * A, seed=3), A)
    objective = OBJECTIVES["dime_own_text"]()
    reference = BatchNormStudent()
    parts = [objective.student_features(reference, b) for b in micro]
    want = objective.losses(concat_samples(parts, objective.SHARED_FEATURES),
                            concat_samples([objective.targets(b) for b in micro]))
    want["total"].backward()

    student = BatchNormStudent()
    targets = [objective.targets(b) for b in micro]
    embedded = accumulate.embed(objective, student, micro, CPU, student)
    assert all(torch.equal(v, _statistics(BatchNormStudent())[k]) for k, v in _statistics(student).items())
    got = accumulate.backward_each(objective, student, lambda s: s.backward(), micro, targets, embedded)

    stats, want_stats = _statistics(student), _statistics(reference)
    assert stats["img.1.num_batches_tracked"].item() == A
    for name, value in want_stats.items():
        torch.testing.assert_close(stats[name], value, rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(got["total"], want["total"].detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(student), grads(reference))

    # Without the student handed in, the first pass moves them too: A extra updates.
    twice = BatchNormStudent()
    accumulate.backward_each(objective, twice, lambda s: s.backward(), micro, targets,
                             accumulate.embed(objective, twice, micro, CPU))
    assert _statistics(twice)["img.1.num_batches_tracked"].item() == 2 * A


def test_with_batchnorm_a_micro_batches_are_not_one_batch_a_times_larger():
    """Why the line 'A=4 equals A=1 with 4x the micro-batch' cannot hold for a BatchNorm student in
    training mode: the whole batch is normalised by its own statistics, each micro-batch by its own."""
    batch = global_batch(4 * A, seed=3)
    objective = OBJECTIVES["dime_own_text"]()
    whole = plain_step(objective, BatchNormStudent(), batch)
    got = accumulated_step(objective, BatchNormStudent(), split(batch, A))
    assert got["total"].item() != pytest.approx(whole["total"].item(), rel=1e-4)
