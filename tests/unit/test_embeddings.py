"""Teacher-embedding cache: round trip, lookup order, clear errors, never a pickle."""
from __future__ import annotations

import builtins
import json
import pickle

import numpy as np
import pytest
import torch

from dime_ds.data import embeddings
from dime_ds.data.embeddings import (EmbeddingCache, EmbeddingCacheError, EmbeddingShardWriter, read_manifest,
                                     write_embedding_shard, write_manifest)

DIM = 6


def _arrays(seed=0, sizes=(5, 3)):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, DIM)).astype(np.float32) for n in sizes]


def _write_cache(directory, sizes=(5, 3), normalized=False):
    arrays = _arrays(sizes=sizes)
    keys = [[f"s{i}k{j}" for j in range(len(a))] for i, a in enumerate(arrays)]
    with EmbeddingShardWriter(directory, modality="images", model="demo-teacher@abc", normalized=normalized) as w:
        for i, (k, a) in enumerate(zip(keys, arrays)):
            w.write_shard(f"shard-{i:06d}", k, a, source=f"/data/shard-{i:06d}.tar", source_sha256=f"{i:064x}")
        w.skip("bad1", "/data/shard-000000.tar", "corrupt jpeg")
    return keys, arrays


def test_round_trip_and_manifest(tmp_path):
    keys, arrays = _write_cache(tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest["format_version"] == embeddings.FORMAT_VERSION
    assert (manifest["modality"], manifest["model"], manifest["dim"], manifest["dtype"]) == \
        ("images", "demo-teacher@abc", DIM, "float16")
    assert manifest["count"] == 8 and not manifest["normalized"]
    assert [s["count"] for s in manifest["shards"]] == [5, 3]
    assert manifest["shards"][1] == {"name": "shard-000001", "source": "/data/shard-000001.tar",
                                     "source_sha256": f"{1:064x}", "count": 3}
    assert manifest["skipped"] == [{"key": "bad1", "source": "/data/shard-000000.tar", "reason": "corrupt jpeg"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json", "shard-000000.keys.txt", "shard-000000.npy", "shard-000001.keys.txt", "shard-000001.npy"]
    assert np.load(tmp_path / "shard-000000.npy", allow_pickle=False).dtype == np.float16

    cache = EmbeddingCache(tmp_path)
    assert len(cache) == 8 and cache.dim == DIM and cache.model == "demo-teacher@abc"
    got = cache.lookup(keys[0] + keys[1])
    assert got.dtype == torch.float32 and got.shape == (8, DIM)
    want = np.concatenate(arrays).astype(np.float16).astype(np.float32)
    assert np.array_equal(got.numpy(), want)  # exactly the stored fp16 values, unnormalised


def test_lookup_follows_the_order_of_the_keys(tmp_path):
    keys, arrays = _write_cache(tmp_path)
    cache = EmbeddingCache(tmp_path)
    query = [keys[1][2], keys[0][0], keys[0][4], keys[1][0], keys[0][0]]  # across shards, a repeat
    rows = [arrays[1][2], arrays[0][0], arrays[0][4], arrays[1][0], arrays[0][0]]
    want = np.stack(rows).astype(np.float16).astype(np.float32)
    assert np.array_equal(cache.lookup(query).numpy(), want)
    assert cache.lookup([]).shape == (0, DIM)


def test_missing_key_names_the_key_and_the_cache(tmp_path):
    keys, _ = _write_cache(tmp_path)
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(KeyError, match="nope") as err:
        cache.lookup([keys[0][0], "nope"])
    assert str(tmp_path) in str(err.value)


def test_loading_never_allows_pickle(tmp_path, monkeypatch):
    keys, _ = _write_cache(tmp_path)
    calls = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("allow_pickle"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    EmbeddingCache(tmp_path).lookup(keys[0])
    assert calls and all(c is False for c in calls)
    monkeypatch.undo()

    # A shard replaced by a pickled object array is refused, not unpickled.
    with open(tmp_path / "shard-000001.npy", "wb") as f:
        np.save(f, np.array([{"x": 1}] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(EmbeddingCacheError, match="shard-000001.npy"):
        EmbeddingCache(tmp_path)


def test_a_cache_that_does_not_match_its_manifest_is_refused(tmp_path):
    _write_cache(tmp_path)
    manifest_path = tmp_path / "manifest.json"
    good = json.loads(manifest_path.read_text())

    def with_manifest(change):
        manifest = json.loads(json.dumps(good))
        change(manifest)
        manifest_path.write_text(json.dumps(manifest))

    with_manifest(lambda m: m.update(dim=DIM + 1))
    with pytest.raises(EmbeddingCacheError, match="shard-000000.npy"):
        EmbeddingCache(tmp_path)
    with_manifest(lambda m: (m["shards"][0].update(count=4), m.update(count=7)))
    with pytest.raises(EmbeddingCacheError, match="manifest says"):
        EmbeddingCache(tmp_path)
    with_manifest(lambda m: m.update(count=99))
    with pytest.raises(EmbeddingCacheError, match="count"):
        EmbeddingCache(tmp_path)
    with_manifest(lambda m: m["shards"].append({"name": "gone", "source": "x", "source_sha256": "0", "count": 1}) or
                  m.update(count=9))
    with pytest.raises(EmbeddingCacheError, match="gone.npy"):
        EmbeddingCache(tmp_path)
    with_manifest(lambda m: None)
    (tmp_path / "shard-000001.keys.txt").write_text("a\nb\n")
    with pytest.raises(EmbeddingCacheError, match="keys.txt has 2 keys"):
        EmbeddingCache(tmp_path)
    manifest_path.unlink()
    with pytest.raises(EmbeddingCacheError, match="no manifest.json"):
        EmbeddingCache(tmp_path)


def test_rewriting_removes_the_stale_manifest_and_a_failed_write_leaves_none(tmp_path):
    _write_cache(tmp_path)
    with pytest.raises(RuntimeError):
        with EmbeddingShardWriter(tmp_path, modality="images", model="m") as w:
            w.write_shard("shard-000000", ["a"], np.ones((1, DIM)), "src", "0")
            raise RuntimeError("embed stage died")
    with pytest.raises(EmbeddingCacheError, match="no manifest.json"):
        EmbeddingCache(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_validates_its_input(tmp_path):
    with pytest.raises(ValueError, match="2 keys for 3"):
        write_embedding_shard(tmp_path, "a", ["x", "y"], np.zeros((3, DIM)), "s", "0")
    with pytest.raises(ValueError, match="duplicate"):
        write_embedding_shard(tmp_path, "a", ["x", "x"], np.zeros((2, DIM)), "s", "0")
    with pytest.raises(ValueError, match="non-finite"):
        write_embedding_shard(tmp_path, "a", ["x"], np.full((1, DIM), 1e6), "s", "0")
    with pytest.raises(ValueError, match="invalid embedding shard name"):
        write_embedding_shard(tmp_path, "../a", ["x"], np.zeros((1, DIM)), "s", "0")
    # A torch tensor works too, and write_manifest is usable on its own (rank 0 after a gather).
    records = [write_embedding_shard(tmp_path, "a", ["x", "y"], torch.ones(2, DIM), "s.tar", "0")]
    write_manifest(tmp_path, modality="texts", model="m", shards=records, normalized=True)
    cache = EmbeddingCache(tmp_path)
    assert cache.normalized and torch.equal(cache.lookup(["y"]), torch.ones(1, DIM))


def test_repeated_keys_are_an_error_and_hash_collisions_are_resolved(tmp_path, monkeypatch):
    write_embedding_shard(tmp_path, "a", ["k1", "k2"], np.zeros((2, DIM)), "a.tar", "0")
    write_embedding_shard(tmp_path, "b", ["k3", "k1"], np.ones((2, DIM)), "b.tar", "0")
    write_manifest(tmp_path, modality="images", model="m", shards=[
        {"name": "a", "source": "a.tar", "source_sha256": "0", "count": 2},
        {"name": "b", "source": "b.tar", "source_sha256": "0", "count": 2}])
    with pytest.raises(EmbeddingCacheError, match="'k1' appears more than once"):
        EmbeddingCache(tmp_path)

    write_embedding_shard(tmp_path, "b", ["k3", "k4"], np.ones((2, DIM)), "b.tar", "0")
    monkeypatch.setattr(embeddings, "hash", lambda k: 7 if k in ("k1", "k4", "absent") else builtins.hash(k),
                        raising=False)
    cache = EmbeddingCache(tmp_path)
    assert cache.lookup(["k4", "k1", "k3"])[:, 0].tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(KeyError, match="absent"):
        cache.lookup(["absent"])


def test_a_pickled_cache_reopens_its_directory(tmp_path):
    keys, _ = _write_cache(tmp_path)
    cache = EmbeddingCache(tmp_path)
    copy = pickle.loads(pickle.dumps(cache))
    assert torch.equal(copy.lookup(keys[1]), cache.lookup(keys[1]))
    assert len(pickle.dumps(cache)) < 1000  # the directory, not the arrays


def test_keys_and_row_ranges_across_shards(tmp_path):
    keys, arrays = _write_cache(tmp_path, sizes=(5, 3, 4))
    cache = EmbeddingCache(tmp_path)
    assert cache.keys() == [k for part in keys for k in part]
    stacked = np.concatenate(arrays).astype(np.float16)
    for start, stop in ((0, 12), (2, 4), (4, 9), (5, 8), (3, 100), (7, 7), (12, 20)):
        rows = cache.rows(start, stop)
        assert rows.dtype == np.float16 and rows.shape == (len(stacked[start:stop]), DIM)
        assert np.array_equal(rows, stacked[start:stop])


def _write_modality(directory, modality, model, dim=DIM):
    with EmbeddingShardWriter(directory, modality=modality, model=model) as w:
        w.write_shard("shard-000000", ["a", "b"], np.ones((2, dim), np.float32), "/x.tar", "0" * 64)


def test_image_text_caches_are_checked(tmp_path):
    with pytest.raises(EmbeddingCacheError, match="stage=embed"):
        embeddings.open_image_text_caches(tmp_path)
    _write_modality(tmp_path / "images", "images", "m")
    _write_modality(tmp_path / "texts", "images", "m")
    with pytest.raises(EmbeddingCacheError, match="holds images embeddings, not texts"):
        embeddings.open_image_text_caches(tmp_path)
    _write_modality(tmp_path / "texts", "texts", "other")
    with pytest.raises(EmbeddingCacheError, match="one teacher"):
        embeddings.open_image_text_caches(tmp_path)
    _write_modality(tmp_path / "texts", "texts", "m")
    images, texts = embeddings.open_image_text_caches(tmp_path)
    assert (images.manifest["modality"], texts.manifest["modality"], len(texts)) == ("images", "texts", 2)
