"""The match stage on several ranks (search.py's multi-node plan: per-rank partial top-k over a
contiguous block of sentences, merged on rank 0) writes exactly what one rank writes, and what the
reference greedy matcher computes."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.multirank.harness import run_ranks

N_IMG, N_TXT, DIM = 300, 1000, 16
TEXT_SHARDS = (350, 250, 400)  # uneven source shards: rank blocks cut across them


def _write_caches(root: Path) -> Path:
    """Random image and text embedding caches over a real text source (the corpus writer reads it)."""
    from dime_ds.data.embeddings import EmbeddingShardWriter
    from dime_ds.data.shards import ShardWriter, sha256_file

    rng = np.random.default_rng(7)
    img = rng.standard_normal((N_IMG, DIM)).astype(np.float32)
    txt = rng.standard_normal((N_TXT, DIM)).astype(np.float32)
    embed = root / "emb"
    with EmbeddingShardWriter(embed / "images", modality="images", model="random") as w:
        for i, (lo, hi) in enumerate(((0, 120), (120, N_IMG))):
            w.write_shard(f"shard-{i:06d}", [f"img{j:04d}" for j in range(lo, hi)], img[lo:hi],
                          str(root / f"images-{i}.tar"), "0" * 64)
    with EmbeddingShardWriter(embed / "texts", modality="texts", model="random") as w:
        start = 0
        for i, count in enumerate(TEXT_SHARDS):
            keys = [f"txt{j:04d}" for j in range(start, start + count)]
            with ShardWriter(root / "source", prefix=f"texts{i}", maxcount=count) as src:
                for j, key in enumerate(keys):
                    src.write(key, {"txt": f"sentence {start + j}",
                                    "json": json.dumps({"kind": "describing" if j % 3 else "other_scene"})})
            source = src.paths[0]
            w.write_shard(f"shard-{i:06d}", keys, txt[start:start + count], source, sha256_file(source))
            start += count
    return embed


def _cfg(embed: Path, out: Path):
    from dime_ds.config import load_config

    return load_config(["experiment=demo", f"work_dir={out.parent}", f"match.embed_dir={embed}",
                        f"match.out_dir={out}", "device=cpu", "log.progress=false", "log.tensorboard=false",
                        "match.topk=2", "match.block_size=170", "match.shard_size=100", "match.stop_ratio=1.0"])


def _stage(rank, world_size, embed, out):
    from dime_ds.distributed import collectives as C
    from dime_ds.match import stage

    stage.IMAGE_CHUNK = 128  # several image chunks per text block
    report = stage.run_match_stage(_cfg(embed, out))
    return report, C.world_size()


def _corpus_keys(out: Path) -> list[str]:
    keys = []
    for shard in sorted((out / "corpus").glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += [m.name[:-4] for m in tar.getmembers() if m.name.endswith(".txt")]
    return keys


@pytest.fixture(scope="module")
def embed_dir(tmp_path_factory):
    return _write_caches(tmp_path_factory.mktemp("match_dist"))


def test_rank_rows_cover_the_corpus():
    from dime_ds.match.stage import rank_rows

    for n, world in ((1000, 2), (1000, 3), (2, 4), (0, 2)):
        blocks = [rank_rows(n, r, world) for r in range(world)]
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


def test_two_ranks_match_one_rank_and_the_reference(embed_dir, tmp_path):
    from dime_ds.data.embeddings import EmbeddingCache
    from dime_ds.match.algorithm1 import greedy_ground_reference
    from dime_ds.match.stage import run_match_stage

    one = run_match_stage(_cfg(embed_dir, tmp_path / "one"))
    reports = run_ranks(_stage, 2, embed_dir, tmp_path / "two", timeout=180)
    assert [w for _, w in reports] == [2, 2]
    two = reports[0][0]
    assert reports[1][0] == two  # every rank returns rank 0's report

    images, texts = EmbeddingCache(embed_dir / "images"), EmbeddingCache(embed_dir / "texts")
    ref = greedy_ground_reference(np.concatenate(images.shards), np.concatenate(texts.shards), 1.0)
    a1 = np.load(tmp_path / "one" / "assignment.npy")
    a2 = np.load(tmp_path / "two" / "assignment.npy")
    assert np.array_equal(a1, ref) and np.array_equal(a2, ref)
    assert (a2 >= 0).sum() == N_IMG
    assert two["requeried"] > 0 and two["rounds"] > 1  # top-2 lists ran out: rank 0 re-queried
    for r in (one, two):
        assert r["images_matched"] == N_IMG and r["exact"]
    assert [x["matched"] for x in two["per_round"]] == [x["matched"] for x in one["per_round"]]
    assert two["requeried"] == one["requeried"]
    keys = _corpus_keys(tmp_path / "one")
    assert keys == _corpus_keys(tmp_path / "two") and len(keys) == N_IMG
    j1 = json.loads((tmp_path / "one" / "assignment.json").read_text())["assignment"]
    j2 = json.loads((tmp_path / "two" / "assignment.json").read_text())["assignment"]
    assert j1 == j2
    assert not (tmp_path / "two" / "corpus.tmp").exists()


def _stage_failing_on_rank_1(rank, world_size, embed, out):
    from dime_ds.match import stage

    search = stage.rank_partial_topk

    def partial(*args, **kwargs):
        if rank == 1:
            raise MemoryError("out of memory in the partial top-k")
        return search(*args, **kwargs)

    stage.rank_partial_topk = partial
    try:
        stage.run_match_stage(_cfg(embed, out))
    except Exception as err:  # noqa: BLE001 - what every rank saw
        return type(err).__name__, str(err)
    return "ok", None


def test_a_failure_on_one_rank_fails_every_rank_before_anything_is_written(embed_dir, tmp_path):
    reports = run_ranks(_stage_failing_on_rank_1, 2, embed_dir, tmp_path / "out", timeout=180)
    assert reports[0] == reports[1] == ("StageError", "partial top-k failed on 1 rank(s):\n"
                                        "rank 1: MemoryError: out of memory in the partial top-k")
    assert not (tmp_path / "out").exists()
