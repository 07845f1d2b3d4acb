"""Shard streams: deterministic, infinite, resumable, every rank/worker on its own shards, bad samples
skipped and counted, augmentation drawn per sample position."""
from __future__ import annotations

import io
import itertools
import tarfile

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dime_ds.data import streams
from dime_ds.data.pipelines import SampleError, decode_sample
from dime_ds.data.shards import ShardWriter, list_shards
from dime_ds.data.streams import ShardStream


def _keys(sample):
    return sample["key"]


def _take(stream, n):
    return list(itertools.islice(iter(stream), n))


def _epoch(stream, worker=0, workers=1, epoch=0):
    """Keys one logical worker yields in `epoch` (with_meta: the cursor tells where an epoch ends)."""
    stream.with_meta = True
    keys = []
    for key, meta in stream.iterate(worker, workers, (epoch, 0)):
        keys.append(key)
        if meta["cursor"][0] != epoch:
            return keys


def test_stream_is_deterministic_and_infinite(tiny_world):
    urls = list_shards(str(tiny_world / "paired"))
    a = _take(ShardStream(urls, _keys, seed=1, shuffle_buffer=16), 250)
    b = _take(ShardStream(urls, _keys, seed=1, shuffle_buffer=16), 250)
    c = _take(ShardStream(urls, _keys, seed=2, shuffle_buffer=16), 250)
    d = _take(ShardStream(urls, _keys, seed=1, shuffle_buffer=16, salt="other"), 250)
    assert a == b and a != c and a != d
    assert len(a) == 250  # more than the 96 samples there are: epochs repeat
    assert sorted(a[:96]) == sorted(set(a[:96]))  # the first epoch visits every sample once
    assert a[:96] != a[96:192]  # and the next one in another order


@pytest.mark.parametrize("world,workers", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (3, 3)])
def test_ranks_and_workers_partition_every_epoch(tiny_world, world, workers):
    # texts/ has 3 shards: shard-level, sample-level (fewer shards than workers or ranks) splits.
    urls = list_shards(str(tiny_world / "texts"))
    for epoch in (0, 1):
        parts = [_epoch(ShardStream(urls, _keys, seed=5, rank=r, world=world, shuffle_buffer=8), w, workers, epoch)
                 for r in range(world) for w in range(workers)]
        flat = [k for part in parts for k in part]
        assert all(parts) and len(flat) == len(set(flat)) == 96


def test_ranks_read_disjoint_shards(tiny_world):
    urls = list_shards(str(tiny_world / "paired"))
    assert len(urls) >= 2
    r0 = set(_take(ShardStream(urls, _keys, seed=0, rank=0, world=2, shuffle_buffer=4), 32))
    r1 = set(_take(ShardStream(urls, _keys, seed=0, rank=1, world=2, shuffle_buffer=4), 32))
    assert r0 and r1 and not r0 & r1
    shards0, _, _ = ShardStream(urls, _keys, seed=0, rank=0, world=2).worker_shards(0)
    shards1, _, _ = ShardStream(urls, _keys, seed=0, rank=1, world=2).worker_shards(0)
    assert shards0 and shards1 and not set(shards0) & set(shards1)


def test_resume_from_a_cursor_decodes_nothing_before_it(tiny_world, monkeypatch):
    urls = list_shards(str(tiny_world / "texts"))
    stream = ShardStream(urls, _keys, seed=3, shuffle_buffer=16, with_meta=True)
    full = _take(stream.iterate(), 150)  # crosses into epoch 1
    decoded = []

    def counting(raw):
        decoded.append(raw["__key__"])
        return decode_sample(raw)

    monkeypatch.setattr(streams, "decode_sample", counting)
    for k in (1, 40, 95, 96, 120):
        decoded.clear()
        cursor = full[k - 1][1]["cursor"]
        resumed = _take(stream.iterate(0, 1, cursor), 10)
        assert [key for key, _ in resumed] == [key for key, _ in full[k:k + 10]]
        assert len(decoded) == 10  # only what it yields
    assert full[95][1]["cursor"] == (1, 0)  # the epoch's last item points at the next epoch


def _random_pixels(image):
    return T.Compose([T.RandomResizedCrop(8, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])(image)


def _augment(sample):
    return sample["key"], _random_pixels(sample["image"])


def test_augmentation_depends_on_the_sample_position_only(tiny_world):
    urls = list_shards(str(tiny_world / "images"))
    stream = ShardStream(urls, _augment, seed=0, shuffle_buffer=8)
    torch.manual_seed(0)
    a = _take(stream, 20)
    torch.manual_seed(1)
    after = torch.rand(3)
    torch.manual_seed(1)
    b = _take(stream, 20)
    assert torch.equal(torch.rand(3), after)  # the caller's RNG is left as it was
    assert all(ka == kb and torch.equal(xa, xb) for (ka, xa), (kb, xb) in zip(a, b))
    # ... and it is random: one image, many positions, not all crops alike.
    assert len({x.sum().item() for _, x in a}) > 10


def _shard_with_bad_samples(directory, n=6, corrupt=(2,), empty=(4,)):
    with ShardWriter(directory, maxcount=100) as w:
        for i in range(n):
            fields = {"jpg": _good_jpeg(), "txt": f"sentence {i}".encode()}
            if i in corrupt:
                fields["jpg"] = b"\xff\xd8 not a jpeg"
            if i in empty:
                fields["txt"] = b"   "
            w.write(f"s{i}", fields)
    return list_shards(str(directory))


def test_corrupt_image_and_empty_sentence_are_skipped_and_counted(tmp_path, caplog):
    stream = ShardStream(_shard_with_bad_samples(tmp_path), _keys, shuffle_buffer=1)
    keys = _take(stream, 8)
    assert set(keys) == {"s0", "s1", "s3", "s5"}
    assert stream.skipped >= 2
    assert "s2" in caplog.text and "s4" in caplog.text  # logged with the sample key


def test_skips_travel_with_the_next_item(tmp_path):
    stream = ShardStream(_shard_with_bad_samples(tmp_path), _keys, shuffle_buffer=1, with_meta=True)
    items = _take(stream.iterate(), 4)
    assert [k for k, _ in items] == ["s0", "s1", "s3", "s5"]
    assert [[r["key"] for r in m["skips"]] for _, m in items] == [[], [], ["s2"], ["s4"]]
    assert "s2" in items[2][1]["skips"][0]["reason"]
    assert items[2][1]["skips"][0]["source"].endswith(".tar")


def test_an_epoch_without_samples_is_an_error_naming_the_shards(tmp_path):
    empty = tmp_path / "empty-000000.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(RuntimeError, match="empty-000000.tar.*hold no sample"):
        _take(ShardStream([str(empty)], _keys), 1)
    bad = _shard_with_bad_samples(tmp_path / "bad", n=3, corrupt=(0, 1, 2), empty=())
    with pytest.raises(RuntimeError, match="all 3 samples .*shard-000000.tar.* were skipped"):
        _take(ShardStream(bad, lambda s: s["image"], fields=("jpg",)), 1)


def test_fields_drop_unused_members_before_decoding(tmp_path):
    # The image stream never reads captions: an empty caption does not cost the image.
    urls = _shard_with_bad_samples(tmp_path, corrupt=(), empty=(1, 4))
    stream = ShardStream(urls, lambda s: (s["key"], sorted(s)), fields=("jpg",), shuffle_buffer=1)
    got = _take(stream, 6)
    assert [k for k, _ in got] == [f"s{i}" for i in range(6)] and stream.skipped == 0
    assert got[0][1] == ["epoch", "image", "key", "url"]  # the epoch: for per-epoch choices (views)


def test_decode_error_names_the_sample():
    with pytest.raises(SampleError, match="k1"):
        decode_sample({"__key__": "k1", "__url__": "u", "jpg": b"garbage"})


def test_invalid_arguments_are_refused(tiny_world):
    urls = list_shards(str(tiny_world / "texts"))
    with pytest.raises(ValueError, match="at least one shard"):
        ShardStream([], _keys)
    with pytest.raises(ValueError, match="rank 2"):
        ShardStream(urls, _keys, rank=2, world=2)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        ShardStream(urls, _keys, shuffle_buffer=0)
    with pytest.raises(RuntimeError, match="resume cursor"):
        _take(ShardStream(urls, _keys).iterate(0, 1, (0, 10_000)), 1)


def _good_jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()
