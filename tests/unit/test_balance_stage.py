"""`python -m dime_ds.curate stage=semantic_balance` and `stage=cluster` in one process, on an image
embedding cache written over the tiny world's image keys with planted near-duplicates: the keep list
is the keys of `semantic_balance` (the flat path); the report and its plots; buckets approximate it
from above; k-means labels are reproducible from the seed and honour data.keep; clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dime_ds.cli import run_entry
from dime_ds.curate import semantic_balance
from dime_ds.curate.__main__ import main
from dime_ds.data.pseudo_labels import PseudoLabels
from dime_ds.data.embeddings import EmbeddingShardWriter
from dime_ds.data.keep import read_keep_keys
from dime_ds.data.pipelines import iter_tar_samples
from dime_ds.data.shards import list_shards


def planted(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    """n embeddings: a third random, the rest jittered copies of those (groups of 2-4)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n // 3, dim))
    parents = np.r_[np.arange(len(base)), rng.integers(0, len(base), n - len(base))]
    x = base[parents] + 0.03 * rng.normal(size=(n, dim)) * (np.arange(n) >= len(base))[:, None]
    return x[rng.permutation(n)].astype(np.float16)


def write_cache(embed_dir: Path, keys: list[str], x: np.ndarray, shards: int = 2) -> None:
    with EmbeddingShardWriter(embed_dir / "images", modality="images", model="test-teacher") as w:
        for s, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
            w.write_shard(f"shard{s}", [keys[i] for i in part], x[part], f"src{s}", "0" * 64)


@pytest.fixture(scope="module")
def cache(tiny_world, tmp_path_factory):
    keys = [s["__key__"] for s in iter_tar_samples(list_shards(str(tiny_world / "images")))]
    x = planted(len(keys))
    embed_dir = tmp_path_factory.mktemp("embed")
    write_cache(embed_dir, keys, x)
    return embed_dir, keys, x


def overrides(work: Path, embed_dir: Path, world: Path, *extra: str) -> list[str]:
    return ["experiment=demo", f"work_dir={work}", f"match.embed_dir={embed_dir}", f"data.images={world}/images",
            "device=cpu", "log.progress=false", *extra]


def test_keep_list_is_the_flat_semantic_balance(cache, tiny_world, tmp_path):
    embed_dir, keys, x = cache
    out = tmp_path / "balanced"
    assert run_entry(main, overrides(tmp_path, embed_dir, tiny_world, "stage=semantic_balance", "balance.beta=0.05",
                                     f"balance.out_dir={out}", "balance.k=2", "balance.max_k=3",
                                     "balance.block_size=20")) == 0
    expected = [keys[i] for i in semantic_balance(x, 0.05)]
    assert read_keep_keys(out / "keep.txt") == expected and len(expected) < len(keys)
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == len(keys) and report["kept"] == len(expected)
    assert report["removed_share"] == pytest.approx(1 - len(expected) / len(keys))
    assert sum(int(s) * c for s, c in report["group_sizes"].items()) == len(keys)
    assert report["search"]["researched"] > 0 and report["exact"]
    assert (out / "component_sizes.png").stat().st_size > 0 and (out / "removed_groups.png").stat().st_size > 0
    assert "removed_groups.png" in (out / "report.md").read_text()


def test_buckets_only_split_groups(cache, tiny_world, tmp_path):
    embed_dir, keys, x = cache
    flat = semantic_balance(x, 0.05)
    outs = {}
    for buckets in (1, 3):
        out = tmp_path / f"b{buckets}"
        assert run_entry(main, overrides(tmp_path, embed_dir, tiny_world, "stage=semantic_balance", "balance.beta=0.05",
                                         f"balance.buckets={buckets}", f"balance.out_dir={out}")) == 0
        outs[buckets] = read_keep_keys(out / "keep.txt")
    assert outs[1] == [keys[i] for i in flat]  # one bucket: every pair searched
    assert len(outs[3]) >= len(flat)  # a group split over buckets keeps one image per piece


def test_cluster_labels_reproducible_and_honour_keep(cache, tiny_world, tmp_path):
    embed_dir, keys, x = cache

    def cluster(name, *extra):
        out = tmp_path / name
        assert run_entry(main, overrides(tmp_path, embed_dir, tiny_world, "stage=cluster", "cluster.k=4",
                                         "cluster.niter=5", f"cluster.out_dir={out}", *extra)) == 0
        return PseudoLabels(out)

    a, b, c = cluster("a", "cluster.seed=3"), cluster("b", "cluster.seed=3"), cluster("c", "cluster.seed=4")
    assert a.k == 4 and len(a) == len(keys)
    assert np.array_equal(a.lookup(keys), b.lookup(keys)) and np.array_equal(a.centroids, b.centroids)
    assert not np.array_equal(a.centroids, c.centroids)  # another seed, other initial centres
    assert np.allclose(np.linalg.norm(a.centroids, axis=1), 1, atol=1e-5)  # spherical
    assert a.manifest["seed"] == 3 and a.manifest["niter"] == 5 and a.manifest["spherical"]

    balanced = tmp_path / "balanced"
    assert run_entry(main, overrides(tmp_path, embed_dir, tiny_world, "stage=semantic_balance", "balance.beta=0.05",
                                     f"balance.out_dir={balanced}")) == 0
    kept = read_keep_keys(balanced / "keep.txt")
    d = cluster("d", f"data.keep={balanced}")
    labels = d.lookup(keys)
    assert len(d) == len(kept) and (labels[[k in set(kept) for k in keys]] >= 0).all()
    assert (labels < 0).sum() == len(keys) - len(kept)  # removed images are unlabelled


@pytest.mark.parametrize("stage,extra,message", [
    ("semantic_balance", [], "stage=embed"),
    ("cluster", [], "stage=embed"),
    ("cluster", ["cluster.k=1000"], "exceeds the 64 images"),
    ("semantic_balance", ["balance.beta=-0.5"], "balance.beta"),
    ("cluster", ["data.keep=/nowhere/keep.txt"], "data.keep=/nowhere"),
])
def test_clear_errors(cache, tiny_world, tmp_path, capsys, stage, extra, message):
    embed_dir = tmp_path / "no_cache" if message == "stage=embed" else cache[0]
    assert run_entry(main, overrides(tmp_path, embed_dir, tiny_world, f"stage={stage}", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    if message == "stage=embed":
        assert str(embed_dir) in err
