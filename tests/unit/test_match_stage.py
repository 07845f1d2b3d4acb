"""The match stage end to end on the tiny synthetic world: embed with a (random) teacher, Algorithm 1,
grounded corpus readable by the distill text stream, assignment, report, TensorBoard."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dime_ds.cli import run_entry
from dime_ds.match.__main__ import main, split_stage


def _overrides(work, world, teacher, *extra):
    return ["experiment=demo", f"work_dir={work}", f"data.root={world}", f"teacher.arch=local-dir:{teacher}",
            "device=cpu", "log.progress=false", "match.topk=4", "match.block_size=50", "match.shard_size=10",
            "match.stop_ratio=1.0", *extra]


@pytest.fixture(scope="module")
def matched(tmp_path_factory, tiny_world, tiny_teacher_dir):
    work = tmp_path_factory.mktemp("match_work")
    assert run_entry(main, _overrides(work, tiny_world, tiny_teacher_dir, "stage=all")) == 0
    return work


def _text_meta(world: Path) -> dict:
    """key -> source json of every sentence of the world."""
    meta = {}
    for shard in sorted((world / "texts").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta[member.name[:-5]] = json.loads(tar.extractfile(member).read())
    return meta


def test_outputs_are_consistent(matched, tiny_world):
    from dime_ds.data.embeddings import EmbeddingCache
    from dime_ds.match.algorithm1 import greedy_ground_reference

    out = matched / "grounded"
    report = json.loads((out / "report.json").read_text())
    images, texts = EmbeddingCache(matched / "embeddings/images"), EmbeddingCache(matched / "embeddings/texts")
    assignment = np.load(out / "assignment.npy", allow_pickle=False)
    assert assignment.shape == (len(images),) and assignment.dtype == np.int64
    # the stage ran Algorithm 1 exactly (blocks of 50 rows, top-4 lists) on the cached embeddings
    ref = greedy_ground_reference(np.concatenate(images.shards), np.concatenate(texts.shards), 1.0)
    assert np.array_equal(assignment, ref)
    kept = int((assignment >= 0).sum())
    assert report["images_matched"] == report["sentences_kept"] == kept > 0
    assert report["images"] == len(images) and report["sentences"] == len(texts)
    assert [r["matched"] for r in report["per_round"]] and sum(r["matched"] for r in report["per_round"]) == kept
    assert report["rounds"] == len(report["per_round"]) and report["exact"]
    assert sum(report["similarity"]["histogram"]["counts"]) == kept
    assert len(report["examples"]) == min(10, kept) and all(e["text"] for e in report["examples"])

    image_keys, text_keys = images.keys(), texts.keys()
    pairs = json.loads((out / "assignment.json").read_text())["assignment"]
    assert pairs == {image_keys[i]: text_keys[assignment[i]] for i in np.flatnonzero(assignment >= 0)}

    # the precision on the synthetic world (meaningless for a random teacher: only computed, not judged)
    meta = _text_meta(tiny_world)
    kinds = [meta[k]["kind"] for k in pairs.values()]
    assert report["kinds"]["kept"] == {k: kinds.count(k) for k in set(kinds)}
    assert sum(report["kinds"]["corpus"].values()) == len(texts)

    md = (out / "report.md").read_text()
    assert "Rounds" in md and "similarity_hist.png" in md
    from PIL import Image

    assert Image.open(out / "similarity_hist.png").size == (720, 420)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_corpus_is_read_by_the_text_stream(matched):
    from dime_ds.data.loaders import text_batches
    from dime_ds.data.shards import list_shards

    out = matched / "grounded"
    pairs = json.loads((out / "assignment.json").read_text())["assignment"]
    shards = list_shards(out / "corpus")
    report = json.loads((out / "report.json").read_text())
    assert len(shards) == -(-len(pairs) // 10) and report["corpus"]["shards"] == shards
    stream = text_batches(shards, None, len(pairs), seed=0, shuffle_buffer=1)
    batch = next(stream)
    stream.close()
    assert sorted(batch["keys"]) == sorted(pairs.values()) and all(batch["texts"])
    image_of = {v: k for k, v in pairs.items()}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    info = json.loads(tar.extractfile(member).read())
                    assert info["source_key"] == member.name[:-5]
                    assert info["image_key"] == image_of[info["source_key"]]
                    assert info["meta"]["kind"] in ("describing", "other_scene", "nonvisual")


def test_rerun_match_is_deterministic(matched, tiny_world, tiny_teacher_dir):
    out = matched / "grounded"
    before = np.load(out / "assignment.npy")
    shard_bytes = [p.read_bytes() for p in sorted((out / "corpus").glob("*.tar"))]
    # block path vs one resident index: the same corpus, byte for byte
    assert run_entry(main, _overrides(matched, tiny_world, tiny_teacher_dir, "stage=match",
                                      "match.block_size=1000000", "match.topk=16")) == 0
    assert np.array_equal(np.load(out / "assignment.npy"), before)
    assert [p.read_bytes() for p in sorted((out / "corpus").glob("*.tar"))] == shard_bytes
    assert not (out / "corpus.tmp").exists()


def test_cli_errors_are_messages(tmp_path, capsys):
    assert split_stage(["stage=embed", "x=1"]) == ["match.stage=embed", "x=1"]
    assert run_entry(main, ["experiment=demo", f"work_dir={tmp_path}", "stage=bogus"]) == 2
    assert "match.stage" in capsys.readouterr().err
    # no embeddings yet: a message naming the stage to run, not a traceback
    assert run_entry(main, ["experiment=demo", f"work_dir={tmp_path}", "stage=match"]) == 2
    assert "stage=embed" in capsys.readouterr().err
