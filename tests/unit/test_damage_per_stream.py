"""Damage is decided per stream, not per worker: a worker whose epoch's shards are all damaged reports a
dead epoch and the others keep feeding (whole batches, exactly resumable); only a stream none of whose
shards can reach the consumer stops, naming them. Damaged shards count once per (shard, epoch)."""
from __future__ import annotations

import itertools
import logging
import os
import types

import pytest

from dime_ds.data.loaders import text_batches
from dime_ds.data.shards import ShardWriter
from dime_ds.data.streams import AllShardsDamagedError, ShardStream
from dime_ds.engine.metrics import StepMetrics
from dime_ds.objectives.base import Objective


def _shards(directory, n_shards, per):
    with ShardWriter(directory, prefix="t", maxcount=per) as w:
        for i in range(n_shards * per):
            w.write(f"t{i:03d}", {"txt": f"sentence {i}"})
    return w.paths


def _garble(path):
    open(path, "wb").write(b"\x01 not a tar" * 200)


def _keys_of(path, per, index):
    return {f"t{i:03d}" for i in range(index * per, (index + 1) * per)}


def _seed_where_worker_gets(paths, wanted, worker, workers, rank=0, world=1):
    """A seed whose epoch 0 gives logical `worker` (of `rank`) exactly the shards `wanted`."""
    for seed in range(500):
        stream = ShardStream(paths, lambda s: s, seed=seed, rank=rank, world=world, salt="texts")
        if set(stream.worker_shards(0, worker, workers)[0]) == set(wanted):
            return seed
    raise AssertionError("no such seed below 500")


def _take_keys(stream, n):
    return [next(stream)["keys"] for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_worker_whose_share_is_all_damaged_reports_it_and_the_others_feed(tmp_path, caplog, workers):
    per = 5
    paths = _shards(tmp_path, 4, per)
    bad = paths[:2]
    for p in bad:
        _garble(p)
    # Epoch 0 deals both damaged shards to worker 0 (with workers=0, the one worker reads all four).
    seed = _seed_where_worker_gets(paths, bad, 0, 2) if workers else 0
    stream = text_batches(paths, None, 3, seed=seed, workers=workers, shuffle_buffer=4)
    with caplog.at_level(logging.WARNING, logger="dime_ds.data.loaders"):
        batches = _take_keys(stream, 12)  # 36 samples: several epochs of the 10 sound ones
    good = _keys_of(paths[2], per, 2) | _keys_of(paths[3], per, 3)
    assert all(len(b) == 3 for b in batches)  # whole batches only, dead epochs or not
    assert set(itertools.chain(*batches)) == good
    assert set(stream.damaged) == set(bad)
    if workers:
        assert stream.dead_epochs >= 1
        assert "worker 0/2, epoch 0" in caplog.text and "no usable sample this epoch" in caplog.text
        assert "the other workers go on" in caplog.text
    else:
        assert stream.dead_epochs == 0  # its epochs always hold the sound shards too
    state = stream.state_dict()
    assert state["turns"] == state["batches"] + stream.dead_epochs and state["batches"] == 12


def test_resume_across_dead_epochs_gives_the_batches_of_the_uninterrupted_run(tmp_path):
    paths = _shards(tmp_path, 4, 5)
    for p in paths[:2]:
        _garble(p)
    seed = _seed_where_worker_gets(paths, paths[:2], 0, 2)

    def stream(start=None):
        return text_batches(paths, None, 3, seed=seed, workers=2, shuffle_buffer=4, start=start)

    full = stream()
    expected = _take_keys(full, 14)
    assert full.dead_epochs >= 2  # so that some resume points below sit after a dead turn
    for cut in (1, 2, 5, 9):
        first = stream()
        _take_keys(first, cut)
        resumed = stream(first.state_dict())
        assert _take_keys(resumed, 14 - cut) == expected[cut:], cut
        assert resumed.dead_epochs == full.dead_epochs  # the count travels in the state


def test_a_dead_epoch_drops_the_batch_it_interrupted_and_the_next_batches_are_whole(tmp_path, caplog):
    # Two workers, one shard each per epoch, one shard damaged: in every epoch one worker's share is
    # dead, often with a batch begun (5 sound samples per epoch, batches of 4).
    paths = _shards(tmp_path, 2, 5)
    _garble(paths[0])
    stream = text_batches(paths, None, 4, seed=0, workers=2, shuffle_buffer=2)
    with caplog.at_level(logging.WARNING, logger="dime_ds.data.loaders"):
        batches = _take_keys(stream, 10)
    assert "samples of the batch it had begun are dropped" in caplog.text
    assert all(len(b) == 4 for b in batches)
    assert set(itertools.chain(*batches)) == _keys_of(paths[1], 5, 1)
    assert stream.dead_epochs >= 1 and list(stream.damaged) == [paths[0]]


def test_every_shard_unreadable_stops_naming_all_of_them_not_one_workers(tmp_path):
    paths = _shards(tmp_path, 4, 3)
    for p in paths:
        _garble(p)
    stream = text_batches(paths, None, 2, seed=0, workers=2)
    with pytest.raises(AllShardsDamagedError) as err:
        next(stream)
    shown = str(err.value)
    assert "no sample could be used: all 4 shards are unreadable" in shown
    assert all(p in shown for p in paths) and shown.count("garbled") == 4


def test_a_rank_that_no_readable_sample_can_reach_stops_naming_itself(tmp_path):
    # One shard with one whole sample before the cut: split by sample over 2 ranks, rank 0 gets it,
    # rank 1 only the sample the cut hit, in every epoch. Rank 1 can never make a batch.
    (path,) = _shards(tmp_path, 1, 3)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:1024 + 600])  # inside the second sample's member (header + data: 1024 each)
    rank0 = text_batches([path], None, 1, seed=0, rank=0, world=2)
    assert next(rank0)["keys"] == ["t000"]
    rank1 = text_batches([path], None, 1, seed=0, rank=1, world=2)
    with pytest.raises(AllShardsDamagedError) as err:
        next(rank1)
    shown = str(err.value)
    assert "no sample could be used by rank 1/2" in shown and path in shown and "1 samples read" in shown


def test_shards_lost_mid_run_stop_the_stream_once_every_shard_was_tried(tmp_path):
    paths = _shards(tmp_path, 3, 4)
    stream = text_batches(paths, None, 2, seed=0, shuffle_buffer=1)
    next(stream)  # the first batch, agreed; what follows is this rank's own decision
    for p in paths:  # a file system gone: nothing opens any more (the shard open now reads on)
        os.unlink(p)
    with pytest.raises(AllShardsDamagedError) as err:
        for _ in range(20):  # epoch 0 ends with the open shard's samples; epoch 1 is dead
            next(stream)
    shown = str(err.value)
    assert "all 3 shards are unreadable" in shown and shown.count("cannot be opened") == 3
    assert stream.dead_epochs >= 1


def test_plain_iteration_goes_on_past_dead_epochs_and_stops_when_all_are_dead(tmp_path, caplog):
    paths = _shards(tmp_path, 2, 3)
    _garble(paths[0])
    seed = _seed_where_worker_gets(paths, paths[:1], 0, 2)
    stream = ShardStream(paths, lambda s: s["key"], seed=seed, salt="texts")
    with caplog.at_level(logging.WARNING, logger="dime_ds.data.streams"):
        keys = list(itertools.islice(stream.iterate(0, 2), 6))  # worker 0 of 2: epoch 0 is dead
    assert set(keys) == _keys_of(paths[1], 3, 1)
    assert "worker 0/2, epoch 0" in caplog.text and "going on with the next epoch" in caplog.text
    _garble(paths[1])
    with pytest.raises(AllShardsDamagedError, match="all 2 shards are unreadable"):
        next(ShardStream(paths, lambda s: s, seed=seed, salt="texts").iterate(0, 2))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a small machine, on purpose
def test_a_damaged_shard_counts_once_per_epoch_however_many_workers_meet_it(tmp_path):
    # Two shards, three workers: fewer shards than workers, so every worker reads both shards (each
    # every third sample) and meets the unreadable one in every epoch.
    paths = _shards(tmp_path, 2, 6)
    _garble(paths[1])
    stream = text_batches(paths, None, 2, seed=0, workers=3, shuffle_buffer=2)
    met = 0
    for _ in range(12):  # 12 worker-epochs of 2 samples: 4 epochs
        next(stream)
        met += sum("damaged" in r for r in stream.last_skips)
    epochs = stream.damaged_epochs[paths[1]]
    assert sorted(epochs) == list(range(len(epochs))) and len(epochs) >= 3
    assert met > len(epochs)  # several workers met it in one epoch: it still counts once there
    holder = types.SimpleNamespace(texts=stream)
    holder.data_faults = lambda: Objective.data_faults(holder)
    faults = StepMetrics.data_faults(holder)["texts"]
    assert faults["damaged"] == len(epochs) and faults["damaged_shards"] == [paths[1]]
    resumed = text_batches(paths, None, 2, seed=0, workers=3, shuffle_buffer=2, start=stream.state_dict())
    assert resumed.damaged_epochs == stream.damaged_epochs
