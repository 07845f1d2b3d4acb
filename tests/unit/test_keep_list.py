"""data.keep: the image stream yields only the kept images, counts the ones it leaves out, and
resumes exactly (batches, augmentations and counts); keep lists are read from a file or a stage
directory, with a clear error when there is none."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from dime_ds.data.keep import KeepList, KeepListError, write_keep_list
from dime_ds.data.pipelines import iter_tar_samples
from dime_ds.data.shards import list_shards
from tests.unit.test_loaders import _images, _same, _take


@pytest.fixture(scope="module")
def kept(tiny_world, tmp_path_factory):
    keys = [s["__key__"] for s in iter_tar_samples(list_shards(str(tiny_world / "images")))]
    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(keys, 40, replace=False).tolist())
    out = tmp_path_factory.mktemp("balanced")
    write_keep_list(out / "keep.txt", chosen)
    return out, chosen, keys


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_yields_only_kept_images_and_counts_the_rest(tiny_world, kept, workers):
    out, chosen, keys = kept
    stream = _images(tiny_world, workers=workers, keep=KeepList(out))  # the stage directory form
    seen = [k for b in _take(stream, 5) for k in b["keys"]]  # 80 images (16 a batch)
    assert set(seen) == set(chosen) and len(seen) == 80
    dropped = len(keys) - len(chosen)
    if workers == 0:  # two whole epochs of the 40 kept, each read past all 24 others
        assert sorted(seen[:40]) == chosen and sorted(seen[40:]) == chosen
        assert stream.not_kept == 2 * dropped
    else:  # each worker's epochs end at their own batches: between one and three passes' worth
        assert dropped <= stream.not_kept <= 3 * dropped
    assert stream.state_dict()["not_kept"] == stream.not_kept


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_a_keep_list_equals_the_uninterrupted_run(tiny_world, kept, workers):
    out, _, _ = kept
    keep = KeepList(out / "keep.txt")
    full_stream = _images(tiny_world, workers=workers, keep=keep)
    full = _take(full_stream, 9)
    first = _images(tiny_world, workers=workers, keep=keep)
    _take(first, 4)
    state = first.state_dict()
    first.close()
    resumed = _images(tiny_world, workers=workers, keep=keep, start=state)
    _same(_take(resumed, 5), full[4:])
    assert resumed.state_dict() == full_stream.state_dict()  # cursors and the not-kept count
    assert resumed.not_kept > 0


def test_keep_list_lookup_pickle_and_errors(kept, tmp_path):
    out, chosen, keys = kept
    keep = KeepList(out)
    assert len(keep) == 40 and all(k in keep for k in chosen)
    assert not any(k in keep for k in set(keys) - set(chosen))
    assert keep.mask(keys).tolist() == [k in set(chosen) for k in keys]
    again = pickle.loads(pickle.dumps(keep))  # re-read, not a copy of this process's hashes
    assert all(k in again for k in chosen) and len(again) == 40
    with pytest.raises(KeepListError, match="data.keep=.*no keep list"):
        KeepList(tmp_path / "nowhere")
    with pytest.raises(KeepListError, match="keep.txt"):
        KeepList(tmp_path)  # a directory without a keep list


def _train(rank, world_size, overrides):
    from dime_ds.config import load_config
    from dime_ds.training import run_training

    return run_training(load_config(overrides))


def test_distillation_trains_on_the_kept_images(tiny_world, tiny_teacher_dir, kept, tmp_path):
    """data.keep reaches the trainer's image stream: its not-kept count is the stream's own."""
    from tests.conftest import engine_overrides
    from tests.multirank.harness import run_ranks

    out, _, _ = kept
    summary = run_ranks(_train, 1, engine_overrides(tmp_path, tiny_world, tiny_teacher_dir, f"data.keep={out}",
                                                    "seed=5"), timeout=300)[0]
    assert summary["status"] == "completed"
    stream = _images(tiny_world, seed=5, shuffle_buffer=8, keep=KeepList(out))  # 3 steps of 16, one rank
    _take(stream, 3)
    assert summary["skipped"]["images_not_kept"] == stream.not_kept > 0
