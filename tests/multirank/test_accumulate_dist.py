"""Two-pass gradient accumulation on 2 gloo ranks: A=4 micro-batches per rank give the loss and,
after the engine-style average over ranks, the parameter gradients of one process holding the whole
global batch (DIME-FM with frozen and own text tower, CLIP)."""
from __future__ import annotations

import pytest

from tests.accumulate_fixtures import (OBJECTIVES, TinyStudent, accumulated_step, assert_grads_close, global_batch,
                                      grads, plain_step, split)
from tests.multirank.harness import run_ranks

WORLD, A, MICRO = 2, 4, 2


def _rank(rank: int, world_size: int, kind: str, batch: dict):
    from dime_ds.distributed import collectives as C
    from dime_ds.losses.dime import reduce_for_logging

    share = split(batch, world_size)[rank]
    student = TinyStudent()
    losses = accumulated_step(OBJECTIVES[kind](), student, split(share, A))
    averaged = {n: C.all_reduce_mean(g) for n, g in grads(student).items()}  # what the engine does
    return reduce_for_logging(losses), averaged


@pytest.mark.parametrize("kind", sorted(OBJECTIVES))
def test_accumulated_on_two_ranks_equals_one_process_with_the_global_batch(kind):
    batch = global_batch(WORLD * A * MICRO, seed=3 + len(kind))
    reference = TinyStudent()
    want = plain_step(OBJECTIVES[kind](), reference, batch)
    want_grads = grads(reference)

    for logged, averaged in run_ranks(_rank, WORLD, kind, batch):
        assert logged.keys() == want.keys()
        for key, value in want.items():
            assert logged[key] == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
        assert_grads_close(averaged, want_grads)
