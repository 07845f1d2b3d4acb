"""Soak: 2 ranks distil for a few hundred tiny steps over damaged data (about 1 % corrupt samples and
one truncated shard in both the image and the text stream); one rank is killed with SIGKILL at a
random step, the survivor ends on its heartbeat, and the run resumed from `latest` ends with exactly
the skip and damage counts and the weights of a run that was never interrupted over the same data."""
from __future__ import annotations

import io
import os
import random
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dime_ds.config import load_config
from dime_ds.data.loaders import image_batches, text_batches
from dime_ds.data.shards import ShardWriter
from tests.conftest import engine_overrides
from tests.multirank.harness import RankError, run_ranks

pytestmark = pytest.mark.slow
STEPS, EVERY, SHARDS, PER_SHARD = 200, 40, 4, 50  # 200 samples per stream, 2 per rank per step
BAD = (17, 121)  # ~1 % of each stream's samples: undecodable image bytes / undecodable sentence


def _png(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _damaged_streams(root):
    """Image and text shards with BAD samples corrupt and the last shard of each cut in half."""
    rng = np.random.default_rng(0)
    for name, member in (("images", "png"), ("texts", "txt")):
        with ShardWriter(root / name, prefix=name, maxcount=PER_SHARD) as w:
            for i in range(SHARDS * PER_SHARD):
                good = _png(rng) if member == "png" else f"a photo of thing {i} in colour {i % 7}".encode()
                bad = b"\x89PNG garbage" if member == "png" else b"\xff\xfe\xfa"
                w.write(f"{name[0]}{i:04d}", {member: bad if i in BAD else good})
        data = open(w.paths[-1], "rb").read()
        open(w.paths[-1], "wb").write(data[: len(data) // 2])
    return root / "images", root / "texts"


def _train(rank, world_size, overrides, victim=None, die_at_step=None):
    from dime_ds.engine import loop
    from dime_ds.training import run_training

    if rank == victim:
        original, done = loop.Trainer._optimizer_step, [0]

        def step(self):
            if done[0] == die_at_step - 1:
                os.kill(os.getpid(), signal.SIGKILL)
            done[0] += 1
            return original(self)

        loop.Trainer._optimizer_step = step
    return run_training(load_config(overrides))


def _straight_read(images, texts, rank, steps, micro):
    """The skip counts and damaged (shard, epoch) pairs of reading rank `rank`'s two streams for `steps`
    batches, no trainer."""
    common = dict(seed=0, rank=rank, world=2, shuffle_buffer=8)
    to_tensor = lambda im: torch.zeros(1)  # noqa: E731 - decoding alone decides what is skipped
    streams = (image_batches(sorted(map(str, images.glob("*.tar"))), to_tensor, micro, **common),
               text_batches(sorted(map(str, texts.glob("*.tar"))), None, micro, **common))
    for stream in streams:
        for _ in range(steps):
            next(stream)
    return {"skipped": [s.skipped for s in streams],
            "damaged": [{(shard, e) for shard, epochs in s.damaged_epochs.items() for e in epochs} for s in streams]}


def test_soak_kill_and_resume_over_damaged_data(tmp_path, tiny_world, tiny_teacher_dir):
    images, texts = _damaged_streams(tmp_path / "data")

    def overrides(work, *extra):
        return engine_overrides(work, tiny_world, tiny_teacher_dir, f"optim.steps={STEPS}", "optim.global_batch_size=4",
                                f"data.images={images}", f"data.texts={texts}", f"ckpt.every_n_steps={EVERY}",
                                "ckpt.keep_last=2", "log.every_n_steps=40", "dist.dead_rank_s=2", "seed=0", *extra)

    clean = run_ranks(_train, 2, overrides(tmp_path / "clean"), timeout=300)
    kill_at = random.Random().randrange(EVERY + 1, STEPS - 5)  # random, and printed below
    work = tmp_path / "killed"
    with pytest.raises(RankError, match="exit code -9"):
        run_ranks(_train, 2, overrides(work), 1, kill_at, timeout=300)
    ckpt = work / "runs" / "demo" / "checkpoints"
    resumed_from = int((ckpt / "latest").read_text().split("_")[-1])
    assert resumed_from == (kill_at - 1) // EVERY * EVERY  # the last checkpoint completed before the kill
    resumed = run_ranks(_train, 2, overrides(work, "ckpt.resume=latest"), timeout=300)

    assert [s["start_step"] for s in resumed] == [resumed_from] * 2
    assert [s["status"] for s in clean + resumed] == ["completed"] * 4
    expected = [_straight_read(images, texts, rank, STEPS, 2) for rank in range(2)]
    # Damaged shards count once per (shard, epoch) over both ranks: the summary of every rank holds that.
    pairs = [expected[0]["damaged"][m] | expected[1]["damaged"][m] for m in range(2)]
    for rank in range(2):
        for run in (clean[rank], resumed[rank]):
            assert [run["skipped"]["images"], run["skipped"]["texts"]] == expected[rank]["skipped"]
            assert [run["data_faults"][s]["damaged"] for s in ("images", "texts")] == [len(p) for p in pairs]
    skipped = sum(s["skipped"]["images"] + s["skipped"]["texts"] for s in clean)
    damaged = [clean[0]["data_faults"][m]["damaged"] for m in ("images", "texts")]
    # One truncated shard per stream (the last), met in every epoch by whichever rank reads it then.
    assert [clean[0]["data_faults"][m]["damaged_shards"] for m in ("images", "texts")] == \
        [[str(images / "images-000003.tar")], [str(texts / "texts-000003.tar")]]
    assert skipped > 0 and all(d >= 2 for d in damaged)  # 400 samples a rank: several epochs of 200

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "clean" / "runs" / "demo" / "tensorboard"))
    events.Reload()
    assert events.Scalars("data/damaged_shards")[-1].value == sum(damaged)  # over ranks and streams
    assert events.Scalars("data/skipped_images")[-1].value == sum(s["skipped"]["images"] for s in clean)
    assert events.Scalars("data/truncated_texts")[-1].value == 0  # short sentences only

    a = load_file(str(tmp_path / "clean" / "runs" / "demo" / "final" / "student.safetensors"))
    b = load_file(str(work / "runs" / "demo" / "final" / "student.safetensors"))
    max_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"\nsoak: {STEPS} steps on 2 ranks, killed (SIGKILL, rank 1) at step {kill_at}, resumed from step "
          f"{resumed_from}; samples skipped {skipped} (per rank images/texts: "
          f"{[[s['skipped']['images'], s['skipped']['texts']] for s in clean]}), damaged (shard, epoch) "
          f"over ranks images/texts {damaged}, max weight difference vs uninterrupted {max_diff:g}")
    assert max_diff == 0.0


def test_a_training_stream_with_only_unreadable_shards_stops_naming_them(tmp_path, tiny_world, tiny_teacher_dir):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(2):
        (texts / f"t-{i:06d}.tar").write_bytes(b"\x01 not a tar" * 100)
    overrides = engine_overrides(tmp_path / "work", tiny_world, tiny_teacher_dir, f"data.texts={texts}")
    with pytest.raises(RankError) as err:
        run_ranks(_train, 1, overrides, timeout=120)
    shown = str(err.value)
    assert "AllShardsDamagedError" in shown and "no sample could be used" in shown
    assert all(str(texts / f"t-{i:06d}.tar") in shown for i in range(2))
