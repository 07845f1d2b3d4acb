"""The embed stage on several ranks: the same cache as one rank, resumable (with or without a
manifest), and a corrupt sample skipped and listed in the manifest."""
from __future__ import annotations

import json
import shutil
import tarfile
import time

import numpy as np
import pytest

from tests.multirank.harness import run_ranks


def _world_with_bad_samples(src, dst):
    """The tiny world plus one shard per stream holding a good sample and a bad one (a corrupt JPEG,
    an empty sentence)."""
    from dime_ds.data.shards import ShardWriter

    shutil.copytree(src, dst)
    first = {}
    for stream in ("images", "texts"):
        with tarfile.open(sorted((dst / stream).glob("*.tar"))[0]) as tar:
            members = tar.getmembers()
            key = members[0].name.rsplit(".", 1)[0]
            first[stream] = {m.name.rsplit(".", 1)[1]: tar.extractfile(m).read() for m in members
                             if m.name.rsplit(".", 1)[0] == key}
    with ShardWriter(dst / "images", prefix="shard-bad", maxcount=10) as w:
        w.write("extra-image", first["images"])
        w.write("bad-image", {"jpg": b"\xff\xd8\xff\xe0 truncated" + first["images"]["jpg"][:10], "json": b"{}"})
    with ShardWriter(dst / "texts", prefix="shard-bad", maxcount=10) as w:
        w.write("extra-text", first["texts"])
        w.write("bad-text", {"txt": b"   \n", "json": b"{}"})
    return dst


@pytest.fixture(scope="module")
def bad_world(tmp_path_factory, tiny_world):
    return _world_with_bad_samples(tiny_world, tmp_path_factory.mktemp("embed_world") / "world")


def _overrides(work, world, teacher):
    return ["experiment=demo", f"work_dir={work}", f"data.root={world}", f"teacher.arch=local-dir:{teacher}",
            f"match.embed_dir={work}/emb", "log.progress=false", "device=cpu", "match.batch_size=16"]


def _embed(rank, world_size, overrides):
    """run_embed_stage on this rank; returns its manifests and how many batches it encoded."""
    from dime_ds.config import load_config
    from dime_ds.embed import stage as embed

    calls = [0]
    encode = embed._encode

    def counting(*args, **kwargs):
        calls[0] += 1
        return encode(*args, **kwargs)

    embed._encode = counting
    try:
        manifests = embed.run_embed_stage(load_config(overrides))
    finally:
        embed._encode = encode
    return manifests, calls[0]


def _snapshot(emb):
    """name -> mtime of every shard file of the cache."""
    return {p.relative_to(emb).as_posix(): p.stat().st_mtime_ns for p in sorted(emb.rglob("shard-*"))}


def _cache(emb, modality):
    from dime_ds.data.embeddings import EmbeddingCache
    cache = EmbeddingCache(emb / modality)
    return cache.keys(), np.concatenate(cache.shards)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, bad_world, tiny_teacher_dir):
    work = tmp_path_factory.mktemp("embed2")
    results = run_ranks(_embed, 2, _overrides(work, bad_world, tiny_teacher_dir), timeout=300)
    return work, results


def test_two_ranks_write_what_one_rank_writes(tmp_path, two_rank_run, bad_world, tiny_teacher_dir):
    work2, results = two_rank_run
    (m0, calls0), (m1, calls1) = results
    assert m0 == m1 and calls0 > 0 and calls1 > 0  # both ranks worked and return the same manifests
    (one, calls), = run_ranks(_embed, 1, _overrides(tmp_path, bad_world, tiny_teacher_dir), timeout=300)
    assert one == m0  # same shards, sources, checksums, counts, skipped
    for modality in ("images", "texts"):
        keys1, emb1 = _cache(tmp_path / "emb", modality)
        keys2, emb2 = _cache(work2 / "emb", modality)
        assert keys1 == keys2
        assert np.array_equal(emb1, emb2)
    # shard names follow the input shard index, whatever the world size
    assert [r["name"] for r in m0["images"]["shards"]] == ["shard-000000", "shard-000001", "shard-000002"]


def test_corrupt_samples_are_skipped_and_listed(two_rank_run, bad_world):
    work, ((manifests, _), _) = two_rank_run
    images, texts = manifests["images"], manifests["texts"]
    assert images["count"] == 64 + 1 and texts["count"] == 96 + 1
    bad_image = str(sorted((bad_world / "images").glob("shard-bad-*.tar"))[0])
    assert [(s["key"], s["source"]) for s in images["skipped"]] == [("bad-image", bad_image)]
    assert [s["key"] for s in texts["skipped"]] == ["bad-text"] and texts["skipped"][0]["reason"]
    on_disk = json.loads((work / "emb" / "images" / "manifest.json").read_text())
    assert on_disk["skipped"] == images["skipped"] and on_disk["model"].startswith("local-dir:")
    assert on_disk["dim"] == 32 and on_disk["normalized"] is False
    keys, _ = _cache(work / "emb", "images")
    assert "extra-image" in keys and "bad-image" not in keys


def test_rerun_skips_finished_shards(tmp_path, bad_world, tiny_teacher_dir):
    overrides = _overrides(tmp_path, bad_world, tiny_teacher_dir)
    first = run_ranks(_embed, 2, overrides, timeout=300)
    emb = tmp_path / "emb"
    before = _snapshot(emb)
    time.sleep(0.01)

    again = run_ranks(_embed, 2, overrides, timeout=300)
    assert [calls for _, calls in again] == [0, 0]
    assert again[0][0] == first[0][0] and _snapshot(emb) == before

    # a killed run: no manifests, one shard never finished (files, no sidecar), one not even started
    for modality in ("images", "texts"):
        (emb / modality / "manifest.json").unlink()
    (emb / "texts" / "shard-000001.record.json").unlink()
    for path in (emb / "images").glob("shard-000002*"):
        path.unlink()
    resumed = run_ranks(_embed, 2, overrides, timeout=300)
    assert resumed[0][0] == first[0][0]
    assert resumed[0][1] > 0 and resumed[1][1] > 0  # rank 0 owns images/2, rank 1 texts/1
    after = _snapshot(emb)
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {f"images/shard-000002{s}" for s in (".npy", ".keys.txt", ".record.json")} \
        | {f"texts/shard-000001{s}" for s in (".npy", ".keys.txt", ".record.json")}
    for modality in ("images", "texts"):
        assert (emb / modality / "manifest.json").is_file()


def test_single_process_embed_shards_resumes(tmp_path, bad_world, tiny_teacher_dir):
    """The single-process API (distill cache tests, benchmarks): same files, skip on rerun."""
    import torch

    from dime_ds.config import load_config
    from dime_ds.data.shards import list_shards
    from dime_ds.embed import stage as embed
    from dime_ds.models import load_teacher

    cfg = load_config(_overrides(tmp_path, bad_world, tiny_teacher_dir))
    teacher = load_teacher(cfg.teacher, torch.device("cpu"))
    urls = list_shards(cfg.data.images)
    manifest = embed.embed_shards(teacher, urls, tmp_path / "c", "images", "m", batch_size=16, progress=False)
    assert manifest["count"] == 65 and [s["key"] for s in manifest["skipped"]] == ["bad-image"]
    before = _snapshot(tmp_path / "c")
    (tmp_path / "c" / "manifest.json").unlink()
    assert embed.embed_shards(teacher, urls, tmp_path / "c", "images", "m", progress=False) == manifest
    assert _snapshot(tmp_path / "c") == before
    # another model is not the same cache
    other = embed.embed_shards(teacher, urls, tmp_path / "c", "images", "other", progress=False)
    assert other["model"] == "other" and _snapshot(tmp_path / "c") != before
