"""Feature extraction on 2 ranks gives exactly the rows, labels and caption owners of one process,
whether ranks split by shard or by sample, from shards or an ImageFolder tree; in lockstep every
rank runs the same number of forwards (a ZeRO-3 forward is collective)."""
from __future__ import annotations

import pytest
import torch

from tests.multirank.harness import run_ranks
from tests.eval_fixtures import colour_encoder, shards_to_imagefolder, solid_colours, write_retrieval_shards


def extract_counting(rank, world, path, captions, workers, lockstep):
    from dime_ds.eval.features import extract
    from dime_ds.eval.sources import open_split

    enc = colour_encoder()
    calls = {"image": 0, "text": 0}
    image_fn, text_fn = enc.encode_image, enc.encode_text

    def count_image(x):
        calls["image"] += 1
        return image_fn(x)

    def count_text(t):
        calls["text"] += 1
        return text_fn(t)

    enc.encode_image, enc.encode_text = count_image, count_text
    f = extract(open_split(path, "test"), enc, captions=captions, batch_size=4, workers=workers,
                lockstep=lockstep, progress=False)
    if f is None:  # only rank 0 holds the gathered features
        return None, None, None, None, calls
    return f.image, f.labels, f.text, f.text_owner, calls


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_dist")
    colours = solid_colours(23, seed=1)
    return {"one_shard": write_retrieval_shards(root / "one", colours, 64),
            "three_shards": write_retrieval_shards(root / "three", colours, 9),
            "root": root}


@pytest.mark.parametrize("layout", ["one_shard", "three_shards"])
def test_two_ranks_equal_one_process(data, layout):
    ref = extract_counting(0, 1, data[layout], True, 0, False)
    # harness ranks are daemonic, so no loader workers here; test_eval covers workers in one process
    ranks = run_ranks(extract_counting, 2, data[layout], True, 0, True, timeout=120)
    image, labels, text, owner, _ = ranks[0]
    assert torch.equal(image, ref[0]) and torch.equal(labels, ref[1])
    assert torch.equal(text, ref[2]) and torch.equal(owner, ref[3])
    assert ranks[1][0] is None
    assert len(ref[0]) == 23 and len(ref[2]) == 46
    # lockstep: 3 shards over 2 ranks is 14 vs 9 samples, yet both ranks forward as often
    assert ranks[0][4] == ranks[1][4]


def test_two_ranks_imagefolder(data, tiny_world):
    folder = shards_to_imagefolder(tiny_world / "eval" / "colour", data["root"] / "folder",
                                   (tiny_world / "eval" / "colour" / "classnames.txt").read_text().split())
    ref = extract_counting(0, 1, folder, False, 0, False)
    image, labels, *_ = run_ranks(extract_counting, 2, folder, False, 0, False, timeout=120)[0]
    assert torch.equal(image, ref[0]) and torch.equal(labels, ref[1])
    assert len(ref[1]) == 32 and sorted(set(ref[1].tolist())) == list(range(8))


def _suite_with_a_bad_shard_on_one_rank(rank, world, good, bad, lockstep):
    from omegaconf import OmegaConf

    from dime_ds.config.schema import EvalConfig, EvalDatasetConfig
    from dime_ds.eval.suite import evaluate_suite

    cfg = OmegaConf.structured(EvalConfig(batch_size=4, workers=0))
    cfg.datasets["bad"] = EvalDatasetConfig(path=str(bad), task="retrieval")
    cfg.datasets["good"] = EvalDatasetConfig(path=str(good), task="retrieval")
    cfg.datasets["gone"] = EvalDatasetConfig(path=str(good) + "_missing", task="retrieval")
    return evaluate_suite(colour_encoder(), cfg, lockstep=lockstep, progress=False)


@pytest.mark.parametrize("lockstep", [False, True])
def test_unreadable_shard_read_by_one_rank_is_reported_by_all(data, lockstep):
    """Shard 2 of 3 is garbage and only rank 0 reads it: the other shards are evaluated, every rank
    reports the same damaged shard, nobody hangs, the next dataset is evaluated whole and equal on both ranks."""
    import shutil
    import tarfile

    bad = data["root"] / f"bad_{lockstep}"
    shutil.copytree(data["three_shards"], bad)
    shards = sorted(bad.glob("*.tar"))
    with tarfile.open(shards[2]) as tar:
        lost = len({m.name.split(".")[0] for m in tar.getmembers()})
    shards[2].write_bytes(b"this is not a tar file" * 100)
    ranks = run_ranks(_suite_with_a_bad_shard_on_one_rank, 2, data["three_shards"], bad, lockstep, timeout=120)
    assert ranks[0] == ranks[1]
    assert ranks[0]["bad"]["images"] == 23 - lost and ranks[0]["bad"]["skipped"] == 0
    (damaged,) = ranks[0]["bad"]["damaged_shards"]
    assert damaged.startswith(f"damaged shard {shards[2]}: garbled") and ranks[0]["gone"]["missing"] is True
    assert ranks[0]["good"]["images"] == 23 and ranks[0]["good"]["image_to_text_R@1"] == 1.0
