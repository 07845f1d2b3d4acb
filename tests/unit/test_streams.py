"""Shard streams: deterministic, infinite, every rank/worker on its own shards, bad samples skipped."""
from __future__ import annotations

import itertools

import pytest

from dime_ds.data.pipelines import SampleError, decode_sample
from dime_ds.data.shards import ShardWriter, list_shards
from dime_ds.data.streams import ShardStream


def _keys(sample):
    return sample["key"]


def _take(stream, n):
    return list(itertools.islice(iter(stream), n))


def test_stream_is_deterministic_and_infinite(tiny_world):
    urls = list_shards(str(tiny_world / "paired"))
    a = _take(ShardStream(urls, _keys, seed=1, shuffle_buffer=16), 250)
    b = _take(ShardStream(urls, _keys, seed=1, shuffle_buffer=16), 250)
    c = _take(ShardStream(urls, _keys, seed=2, shuffle_buffer=16), 250)
    assert a == b and a != c
    assert len(a) == 250  # more than the 96 samples there are: epochs repeat
    assert sorted(a[:96]) == sorted(set(a[:96]))  # the first epoch visits every sample once


def test_ranks_read_disjoint_shards(tiny_world):
    urls = list_shards(str(tiny_world / "paired"))
    assert len(urls) >= 2
    r0 = set(_take(ShardStream(urls, _keys, seed=0, rank=0, world=2, shuffle_buffer=4), 32))
    r1 = set(_take(ShardStream(urls, _keys, seed=0, rank=1, world=2, shuffle_buffer=4), 32))
    assert r0 and r1 and not r0 & r1


def test_corrupt_image_and_empty_sentence_are_skipped_and_counted(tmp_path):
    with ShardWriter(tmp_path, maxcount=10) as w:
        for i in range(6):
            fields = {"jpg": _good_jpeg(), "txt": f"sentence {i}".encode()}
            if i == 2:
                fields["jpg"] = b"\xff\xd8 not a jpeg"
            if i == 4:
                fields["txt"] = b"   "
            w.write(f"s{i}", fields)
    stream = ShardStream(list_shards(str(tmp_path)), _keys, shuffle_buffer=1)
    keys = _take(stream, 8)
    assert set(keys) == {"s0", "s1", "s3", "s5"}
    assert stream.skipped >= 2


def test_decode_error_names_the_sample():
    with pytest.raises(SampleError, match="k1"):
        decode_sample({"__key__": "k1", "__url__": "u", "jpg": b"garbage"})


def _good_jpeg():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()
