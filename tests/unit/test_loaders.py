"""Batch streams: deterministic, independent per modality, exactly resumable (samples and
augmentations) with and without DataLoader workers, skip counts in the state, disjoint ranks."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from dime_ds.data import streams
from dime_ds.data.loaders import image_batches, paired_batches, text_batches
from dime_ds.data.pipelines import decode_sample, image_transform
from dime_ds.data.shards import ShardWriter, list_shards

PREPROCESS = {"size": 24, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
CTX = 8


def tokenize(texts):
    """A stand-in tokenizer: code points, cut or zero-padded to CTX."""
    return torch.tensor([[ord(c) for c in t[:CTX]] + [0] * (CTX - len(t[:CTX])) for t in texts])


def _augment():
    return image_transform(PREPROCESS, train=True, crop_scale_min=0.2)


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            assert torch.equal(x[name], y[name]) if isinstance(x[name], torch.Tensor) else x[name] == y[name], name


def _images(world_dir, **kw):
    kw = {"seed": 0, "shuffle_buffer": 16, **kw}
    return image_batches(list_shards(str(world_dir / "images")), _augment(), 16, **kw)


def _texts(world_dir, **kw):
    kw = {"seed": 0, "shuffle_buffer": 16, **kw}
    return text_batches(list_shards(str(world_dir / "texts")), tokenize, 16, **kw)


def test_same_seed_same_batches_other_seed_other_batches(tiny_world):
    a, b, c = (_take(_images(tiny_world, seed=s), 3) for s in (1, 1, 2))
    _same(a, b)
    assert a[0]["images"].shape == (16, 3, 24, 24) and a[0]["images"].dtype == torch.float32
    assert a[0]["keys"] != c[0]["keys"]
    t = _take(_texts(tiny_world, seed=1), 2)
    assert t[0]["tokens"].shape == (16, CTX) and t[0]["tokens"].dtype == torch.long
    assert all(isinstance(s, str) and s for s in t[0]["texts"])
    assert t[0]["tokens"][0, 0] == ord(t[0]["texts"][0][0])


def test_image_and_text_streams_are_independent(tiny_world):
    # The same shards and seed through both: the salts give them different orders.
    urls = list_shards(str(tiny_world / "paired"))
    images = image_batches(urls, _augment(), 16, seed=0, shuffle_buffer=16)
    texts = text_batches(urls, tokenize, 16, seed=0, shuffle_buffer=16)
    image_keys = [k for b in _take(images, 6) for k in b["keys"]]
    text_keys = [k for b in _take(texts, 6) for k in b["keys"]]
    assert sorted(image_keys) == sorted(text_keys)  # one epoch of the same 96 samples ...
    assert sum(a == b for a, b in zip(image_keys, text_keys)) < 10  # ... in unrelated orders


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_batches_of_the_uninterrupted_run(tiny_world, workers):
    # 64 images, 16 a batch: 5 + 4 batches cross epochs; 5 is odd, so with 2 workers the resumed
    # loader must start at worker 1.
    full = _take(_images(tiny_world, workers=workers), 9)
    first = _images(tiny_world, workers=workers)
    _take(first, 5)
    state = first.state_dict()
    first.close()
    assert state["batches"] == 5 and len(state["cursors"]) == max(1, workers)
    _same(_take(_images(tiny_world, workers=workers, start=state), 4), full[5:])

    texts = _texts(tiny_world, workers=workers)
    full_texts = _take(texts, 7)
    again = _texts(tiny_world, workers=workers)
    _take(again, 3)
    later = _texts(tiny_world, workers=workers)
    later.load_state_dict(again.state_dict())
    _same(_take(later, 4), full_texts[3:])


def test_zero_and_one_worker_are_the_same_stream(tiny_world):
    zero = _images(tiny_world, workers=0)
    head = _take(zero, 2)
    one = _images(tiny_world, workers=1, start=zero.state_dict())
    _same(_take(one, 2), _take(_images(tiny_world, workers=0), 4)[2:])
    assert head


def test_resume_decodes_and_transforms_nothing_it_skips(tiny_world, monkeypatch):
    calls = {"decode": 0, "transform": 0}
    transform = _augment()

    def counting_transform(image):
        calls["transform"] += 1
        return transform(image)

    def counting_decode(raw):
        calls["decode"] += 1
        return decode_sample(raw)

    monkeypatch.setattr(streams, "decode_sample", counting_decode)
    urls = list_shards(str(tiny_world / "images"))
    first = image_batches(urls, counting_transform, 8, seed=0, shuffle_buffer=16)
    _take(first, 7)
    calls.update(decode=0, transform=0)
    resumed = image_batches(urls, counting_transform, 8, seed=0, shuffle_buffer=16, start=first.state_dict())
    next(resumed)
    assert calls == {"decode": 8, "transform": 8}


def test_two_ranks_read_disjoint_samples(tiny_world):
    ranks = [_images(tiny_world, rank=r, world=2, shuffle_buffer=4) for r in (0, 1)]
    keys = [{k for b in _take(s, 2) for k in b["keys"]} for s in ranks]  # one epoch: 32 images a rank
    assert len(keys[0]) == len(keys[1]) == 32 and not keys[0] & keys[1]


def _bad_shard(directory):
    with ShardWriter(directory, maxcount=100) as w:
        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (40 * i, 10, 10)).save(buf, format="JPEG")
            fields = {"jpg": buf.getvalue(), "txt": f"sentence {i}"}
            if i == 2:
                fields["jpg"] = b"\xff\xd8 not a jpeg"
            if i == 4:
                fields["txt"] = "  "
            w.write(f"s{i}", fields)
    return list_shards(str(directory))


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_samples_reach_the_state(tmp_path, caplog, workers):
    urls = _bad_shard(tmp_path)
    # One shard, two workers: split by sample (worker 0: s0 s2 s4, worker 1: s1 s3 s5); buffer 1: in order.
    kw = dict(seed=0, workers=workers, shuffle_buffer=1)
    images = image_batches(urls, _augment(), 2, **kw)
    got = [k for b in _take(images, 2) for k in b["keys"]]
    assert sorted(got) == ["s0", "s1", "s3", "s4"] if workers else got == ["s0", "s1", "s3", "s4"]
    assert images.state_dict()["skipped"] == 1  # the corrupt jpeg; s4's empty caption is not read
    assert "s2" in caplog.text

    texts = text_batches(urls, tokenize, 2, **kw)
    assert sorted(k for b in _take(texts, 2) for k in b["keys"]) == ["s0", "s1", "s2", "s3"]
    _take(texts, 2)  # the empty sentence s4 is met
    assert texts.state_dict()["skipped"] == 1 and texts.skipped == 1
    assert [r["key"] for r in texts.last_skips] in ([], ["s4"])

    # Pairs lose both s2 and s4. In process: 4 batches are 2 epochs of s0 s1 s3 s5, 2 + 2 skipped;
    # 2 workers: worker 0 (s0 of s0 s2 s4) makes 2 of the 4 batches, 4 epochs, 0 + 2 + 2 + 2 skipped.
    pairs = paired_batches(urls, _augment(), tokenize, 2, **kw)
    _take(pairs, 4)
    state = pairs.state_dict()
    assert state["skipped"] == (6 if workers else 4)
    resumed = paired_batches(urls, _augment(), tokenize, 2, **kw, start=state)
    _take(resumed, 2)
    assert resumed.state_dict()["skipped"] == (10 if workers else 6)  # counted on across the resume


def test_paired_batches(tiny_world):
    pairs = paired_batches(list_shards(str(tiny_world / "paired")), _augment(), tokenize, 8, seed=0,
                           shuffle_buffer=8)
    batch = next(pairs)
    assert sorted(batch) == ["images", "keys", "tokens"]
    assert batch["images"].shape == (8, 3, 24, 24) and batch["tokens"].shape == (8, CTX)


def test_a_state_of_another_stream_is_refused(tiny_world):
    stream = _images(tiny_world, workers=0)
    next(stream)
    state = stream.state_dict()
    for change in ({"seed": 1}, {"workers": 2}, {"rank": 1, "world": 2}):
        kw = {"workers": 0, **change}
        with pytest.raises(ValueError, match=next(iter(change))):
            _images(tiny_world, **kw, start=state)
    with pytest.raises(ValueError, match="salt"):
        text_batches(list_shards(str(tiny_world / "images")), tokenize, 16, seed=0, shuffle_buffer=16, start=state)


class CountingTokenizer:
    """open_clip's tokenizer, counting the sentences it is asked for."""

    def __init__(self, context_length: int):
        import open_clip

        self.inner = open_clip.SimpleTokenizer(context_length=context_length)
        self.encode, self.context_length, self.calls = self.inner.encode, context_length, 0

    def __call__(self, texts):
        self.calls += len(texts)
        return self.inner(texts)


class UnhashableTokenizer(CountingTokenizer):
    __hash__ = None  # as a class with __eq__ and no __hash__ (nothing to remember sentences by)


@pytest.mark.parametrize("hashable", [True, False])
def test_each_sentence_is_tokenized_once_per_process_with_the_tokenizers_ids(tmp_path, hashable):
    """Epochs repeat sentences; their ids and the cut-to-context count are those of one tokenizer call."""
    with ShardWriter(tmp_path, maxcount=100) as w:
        for i in range(6):
            w.write(f"t{i}", {"txt": ("a long sentence of many words " * (i == 0) + f"short {i}").encode()})
    tokenizer = (CountingTokenizer if hashable else UnhashableTokenizer)(context_length=6)
    stream = text_batches(w.paths, tokenizer, 3, seed=0, shuffle_buffer=1)
    batches = [next(stream) for _ in range(6)]  # three passes over the six sentences
    for b in batches:
        for key, text, row in zip(b["keys"], b["texts"], b["tokens"]):
            assert torch.equal(row, tokenizer.inner([text])[0]), key
    assert stream.truncated == 3  # t0, once a pass
    assert tokenizer.calls == (6 if hashable else 18)


class CountingTransform:
    """The eval transform (no randomness), counting the images it is asked for."""

    def __init__(self):
        self.inner, self.calls = image_transform(PREPROCESS, train=False), 0

    def __call__(self, image):
        self.calls += 1
        return self.inner(image)


@pytest.mark.parametrize("workers", [0, 1])
def test_kept_pairs_are_the_decoded_ones_and_a_budget_bounds_them(tiny_world, workers):
    """memo_bytes: later epochs reuse a pair's first decoding (only what the budget holds); batches,
    resume included, are those of a stream that decodes every time."""
    urls = list_shards(str(tiny_world / "paired"))
    n = sum(1 for _ in streams.iter_tar_samples(urls))
    kw = dict(seed=3, shuffle_buffer=8, workers=workers)

    def batches(memo_bytes, count, start=None):
        transform = CountingTransform()
        stream = paired_batches(urls, transform, tokenize, 8, memo_bytes=memo_bytes, start=start, **kw)
        return [next(stream) for _ in range(count)], transform, stream

    count = 3 * n // 8  # batches of three passes over the pairs
    plain, decoded, _ = batches(0, count)
    item = streams._nbytes({"images": plain[0]["images"][0], "tokens": plain[0]["tokens"][0], "keys": "k",
                            "truncated": False})
    for budget, kept in ((10 * n * item, n), (5 * item, 5)):
        got, transform, _ = batches(budget, count)
        for a, b in zip(got, plain):
            assert a["keys"] == b["keys"]
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])
        if not workers:  # the loader process's own counter is out of reach
            assert decoded.calls == 3 * n and transform.calls == 3 * n - 2 * kept
    head, _, stream = batches(10 * n * item, 5)
    tail, _, _ = batches(10 * n * item, count - 5, start=stream.state_dict())
    for a, b in zip(head + tail, plain):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
