"""Damaged data on gloo ranks, decided per stream: a rank whose share of an epoch is all damaged reads
its next epoch while the others wait, and the run trains; a stream none of whose shards can be read
stops on every rank with the same error naming them all, found by the ranks together; a damaged shard
counts once per (shard, epoch) over the ranks, in the run summary and TensorBoard."""
from __future__ import annotations

import logging

import pytest

from dime_ds.data.loaders import text_batches
from dime_ds.data.shards import ShardWriter
from dime_ds.data.streams import ShardStream
from tests.conftest import engine_overrides
from tests.multirank.harness import run_ranks


def _texts(directory, n_shards, per):
    with ShardWriter(directory, prefix="t", maxcount=per) as w:
        for i in range(n_shards * per):
            w.write(f"t{i:03d}", {"txt": f"a photo of thing {i} in colour {i % 7}"})
    return w.paths


def _garble(path):
    open(path, "wb").write(b"\x01 not a tar" * 200)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _first_batch(rank, world, paths, workers):
    from dime_ds.data.streams import AllShardsDamagedError

    stream = text_batches(paths, None, 2, seed=0, rank=rank, world=world, workers=workers)
    try:
        next(stream)
    except AllShardsDamagedError as err:
        return str(err), sorted(stream.damaged)
    return None, sorted(stream.damaged)


def test_every_shard_unreadable_stops_every_rank_with_one_message_naming_all(tmp_path):
    paths = _texts(tmp_path, 4, 3)
    for p in paths:
        _garble(p)
    (m0, seen0), (m1, seen1) = run_ranks(_first_batch, 2, paths, 0)  # ranks are daemons: no loader workers
    assert m0 is not None and m0 == m1
    assert "no sample could be used: all 4 shards are unreadable" in m0 and all(p in m0 for p in paths)
    # Each rank read only its own share of epoch 0: the ranks found it together.
    assert len(seen0) == len(seen1) == 2 and sorted(seen0 + seen1) == sorted(paths)


def _faults(rank, world, paths):
    from types import SimpleNamespace

    from dime_ds.engine.metrics import StepMetrics
    from dime_ds.objectives.base import Objective

    stream = text_batches(paths, None, 2, seed=0, rank=rank, world=world)
    for _ in range(6):
        next(stream)
    holder = SimpleNamespace(texts=stream)
    holder.data_faults = lambda: Objective.data_faults(holder)
    return stream.damaged_epochs, StepMetrics.data_faults(holder)["texts"]


def test_a_shard_every_rank_meets_in_an_epoch_counts_once_there(tmp_path):
    # Fewer shards than ranks: every rank reads both, every third sample of the sound one, and each
    # meets the unreadable one in every epoch.
    paths = _texts(tmp_path, 2, 6)
    _garble(paths[1])
    out = run_ranks(_faults, 3, paths)
    local = [epochs for epochs, _ in out]
    assert all(set(e) == {paths[1]} for e in local)
    pairs = {(paths[1], e) for epochs in local for e in epochs[paths[1]]}
    assert sum(len(e[paths[1]]) for e in local) > len(pairs)  # the ranks met it in the same epochs
    assert [faults for _, faults in out] == [{"damaged": len(pairs), "damaged_shards": [paths[1]], "truncated": 0}] * 3


def _train(rank, world, overrides):
    from dime_ds.config import load_config
    from dime_ds.training import run_training

    lines = _Lines()
    logging.getLogger("dime_ds.data.loaders").addHandler(lines)
    return run_training(load_config(overrides)), lines.lines


def _straight_read(paths, rank, batches, seed):
    """The (shard, epoch) pairs rank `rank`'s text stream meets in `batches` batches, no trainer."""
    stream = text_batches(paths, None, 8, seed=seed, rank=rank, world=2, shuffle_buffer=8)
    for _ in range(batches):
        next(stream)
    return {(shard, e) for shard, epochs in stream.damaged_epochs.items() for e in epochs}


@pytest.mark.slow
def test_a_rank_whose_share_is_all_damaged_goes_on_and_the_run_trains(tmp_path, tiny_world, tiny_teacher_dir):
    paths = _texts(tmp_path / "texts", 4, 8)
    seed = 0
    bad = ShardStream(paths, None, seed=seed, rank=1, world=2, salt="texts").worker_shards(0)[0]
    assert len(bad) == 2  # rank 1's whole share of epoch 0, damaged below
    for p in bad:
        _garble(p)
    work = tmp_path / "work"
    overrides = engine_overrides(work, tiny_world, tiny_teacher_dir, f"data.texts={tmp_path / 'texts'}",
                                 f"seed={seed}")  # 3 steps, 8 samples per rank per step
    (s0, lines0), (s1, lines1) = run_ranks(_train, 2, overrides, timeout=300)
    assert [s0["status"], s1["status"]] == ["completed"] * 2 and s0["step"] == 3
    dead = [line for line in lines1 if "no usable sample this epoch" in line]
    assert dead and "rank 1/2 worker 0/1, epoch 0" in dead[0] and all(p.split("/")[-1] in dead[0] for p in bad)
    assert not [line for line in lines0 if "epoch 0" in line and "no usable sample" in line]

    expected = _straight_read(paths, 0, 3, seed) | _straight_read(paths, 1, 3, seed)
    assert {(p, 0) for p in bad} <= expected
    for summary in (s0, s1):  # over both ranks, once per (shard, epoch), the same on each
        assert summary["data_faults"]["texts"]["damaged"] == len(expected)
        assert summary["data_faults"]["texts"]["damaged_shards"] == sorted(bad)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(work / "runs" / "demo" / "tensorboard"))
    events.Reload()
    assert events.Scalars("data/damaged_shards")[-1].value == len(expected)
