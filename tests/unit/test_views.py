"""K-view teacher cache (dime_ds.data.views): views drawn from (seed, key, view) alone, stored with
their parameters, re-applied exactly for the student; old one-view caches still load; a cache of
other views is refused naming both."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dime_ds.config import load_config
from dime_ds.data.embeddings import EmbeddingCache, EmbeddingCacheError, read_manifest
from dime_ds.data.loaders import view_batches
from dime_ds.data.pipelines import decode_sample, iter_tar_samples
from dime_ds.data.shards import list_shards
from dime_ds.data.views import ViewRecipe, ViewSampler, apply_view, centre_box, check_cache_views, choose_view
from tests.conftest import engine_overrides

K = 4
# A student input unlike the teacher's (32 px, OpenAI mean/std): another size and normalisation.
STUDENT_PP = {"size": 24, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}


def test_view_params_come_from_seed_key_and_view_only():
    recipe = ViewRecipe(views=10, scale_min=0.3, seed=7)
    keys = [f"img{i:04d}" for i in range(200)]
    params = {k: recipe.params(k, 64, 48) for k in keys}
    # The same in any order and any process: nothing but (seed, key, view) goes in.
    for k in reversed(keys):
        assert np.array_equal(recipe.params(k, 64, 48), params[k])
    assert not np.array_equal(ViewRecipe(10, 0.3, seed=8).params(keys[0], 64, 48), params[keys[0]])
    assert np.array_equal(ViewRecipe(4, 0.3, seed=7).params(keys[0], 64, 48), params[keys[0]][:4])  # K-prefix
    stacked = np.stack(list(params.values()))
    assert stacked.dtype == np.int32 and stacked.shape == (200, 10, 5)
    assert (stacked[:, 0] == np.array([*centre_box(64, 48), 0])).all()  # view 0: the centre view
    x0, y0, w, h, flip = np.moveaxis(stacked[:, 1:], -1, 0)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 64).all() and (y0 + h <= 48).all()
    share = w * h / (64 * 48)
    assert share.min() >= 0.3 - 0.05 and share.max() <= 1.0 and share.std() > 0.1
    assert 0.4 < flip.mean() < 0.6
    assert len({tuple(p) for p in stacked[:, 1:].reshape(-1, 5).tolist()}) > 1500  # views differ


def test_view_choice_is_per_key_and_epoch():
    keys = [f"k{i}" for i in range(100)]
    rand = [[choose_view(k, e, K, seed=0, choice="random") for e in range(8)] for k in keys]
    assert rand == [[choose_view(k, e, K, seed=0, choice="random") for e in range(8)] for k in keys]
    assert {v for row in rand for v in row} == set(range(K))
    assert rand != [[choose_view(k, e, K, seed=1, choice="random") for e in range(8)] for k in keys]
    for k in keys:  # round robin: every view once in K epochs
        assert sorted(choose_view(k, e, K, seed=0, choice="round_robin") for e in range(K)) == list(range(K))


@pytest.fixture(scope="module")
def view_cache(tmp_path_factory, tiny_world, tiny_teacher_dir):
    """The tiny world's images embedded with K views by the embed stage's core, and the teacher."""
    from dime_ds.embed.stage import embed_shards
    from dime_ds.models import load_teacher

    work = tmp_path_factory.mktemp("views")
    cfg = load_config(engine_overrides(work, tiny_world, tiny_teacher_dir, f"embed.views={K}"))
    teacher = load_teacher(cfg.teacher, torch.device("cpu"))
    recipe = ViewRecipe.from_config(cfg)
    embed_shards(teacher, list_shards(cfg.data.images), work / "images", "images", cfg.teacher.arch, batch_size=16,
                 progress=False, views=recipe)
    return EmbeddingCache(work / "images"), teacher, recipe, cfg


def _originals(tiny_world) -> dict:
    return {s["key"]: s["image"] for s in map(decode_sample, iter_tar_samples(list_shards(str(tiny_world / "images"))))}


def test_the_cache_holds_k_views_and_their_parameters(view_cache, tiny_world):
    cache, teacher, recipe, _ = view_cache
    manifest = read_manifest(cache.directory)
    assert (manifest["views"], manifest["recipe"], manifest["view_seed"]) == (K, recipe.recipe(), 0)
    assert cache.shards[0].shape[1:] == (K, cache.dim) and cache._params[0].shape[1:] == (K, 5)
    originals = _originals(tiny_world)
    keys = sorted(originals)[::9]
    for v in range(K):
        params = cache.view_params(keys, [v] * len(keys))
        # The stored parameters are the recipe's, and re-applied at the teacher's preprocessing they
        # give the input whose embedding is stored for that view.
        assert all(np.array_equal(p, recipe.params(k, *originals[k].size)[v]) for k, p in zip(keys, params))
        inputs = torch.stack([apply_view(originals[k], p, teacher.preprocess_cfg) for k, p in zip(keys, params)])
        want = teacher.encode_image(inputs).float()
        got = cache.lookup(keys, [v] * len(keys))
        torch.testing.assert_close(got, want, rtol=1e-2, atol=2e-3)  # fp16 storage
        if v:
            assert not torch.allclose(got, cache.lookup(keys, [0] * len(keys)), atol=1e-2)  # another view's
    assert torch.equal(cache.lookup(keys), cache.lookup(keys, [0] * len(keys)))  # no views: the centre one
    assert np.array_equal(cache.rows(0, 5), cache.shards[0][:5, 0])  # one embedding per sample: view 0


def _stream(cache, recipe, tiny_world, *, rank=0, world=1, start=None, augment=True, choice="random"):
    sampler = ViewSampler(recipe, STUDENT_PP, seed=5, choice=choice, augment=augment, cache=cache)
    return view_batches(list_shards(str(tiny_world / "images")), sampler, 8, seed=5, rank=rank, world=world,
                        shuffle_buffer=8, start=start)


def _check_batches(batches, cache, originals):
    """Each student input is the recorded crop+flip of the view the batch names, at the student's size."""
    for batch in batches:
        assert batch["images"].shape[1:] == (3, 24, 24)
        views = batch["views"].tolist()
        recorded = cache.view_params(batch["keys"], views)
        assert np.array_equal(batch["view_params"].numpy(), recorded)
        for image, key, params in zip(batch["images"], batch["keys"], recorded):
            assert torch.equal(image, apply_view(originals[key], params, STUDENT_PP))


def test_student_inputs_are_the_recorded_views_on_one_and_two_ranks_and_after_resume(view_cache, tiny_world):
    cache, _, recipe, _ = view_cache
    originals = _originals(tiny_world)
    one = _stream(cache, recipe, tiny_world)
    full = [next(one) for _ in range(12)]  # 96 draws of 64 images: two epochs
    _check_batches(full, cache, originals)
    assert len({v for b in full for v in b["views"].tolist()}) == K
    seen: dict = {}
    for b in full:  # a key may show another view in the next epoch, never two in one
        for k, v in zip(b["keys"], b["views"].tolist()):
            seen.setdefault(k, set()).add(v)
    assert any(len(v) > 1 for v in seen.values())

    first = _stream(cache, recipe, tiny_world)
    [next(first) for _ in range(5)]
    resumed = _stream(cache, recipe, tiny_world, start=first.state_dict())
    for want in full[5:]:
        got = next(resumed)
        assert got["keys"] == want["keys"] and torch.equal(got["views"], want["views"])
        assert torch.equal(got["images"], want["images"])

    ranks = [_stream(cache, recipe, tiny_world, rank=r, world=2) for r in (0, 1)]
    per_rank = [[next(s) for _ in range(4)] for s in ranks]  # one epoch of each rank's 32 images
    for batches in per_rank:
        _check_batches(batches, cache, originals)
    keys = [{k for b in batches for k in b["keys"]} for batches in per_rank]
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 64
    # The view of (key, epoch) does not depend on the rank split.
    single = {k: v for b in full[:8] for k, v in zip(b["keys"], b["views"].tolist())}
    assert all(single[k] == v for batches in per_rank for b in batches for k, v in zip(b["keys"], b["views"].tolist()))


def test_without_augmentation_every_image_shows_the_centre_view(view_cache, tiny_world):
    cache, _, recipe, _ = view_cache
    batches = [next(_stream(cache, recipe, tiny_world, augment=False))]
    assert batches[0]["views"].tolist() == [0] * 8
    _check_batches(batches, cache, _originals(tiny_world))


def _write_format1_cache(directory, keys, array, model="old"):
    """A cache exactly as written before views (format_version 1): [count, dim], no view fields."""
    directory.mkdir(parents=True)
    np.save(directory / "shard-000000.npy", array.astype(np.float16), allow_pickle=False)
    (directory / "shard-000000.keys.txt").write_text("".join(k + "\n" for k in keys), encoding="utf-8")
    manifest = {"format_version": 1, "modality": "images", "model": model, "dim": array.shape[1],
                "dtype": "float16", "normalized": False, "count": len(keys),
                "shards": [{"name": "shard-000000", "source": "/x.tar", "source_sha256": "0" * 64,
                            "count": len(keys)}], "skipped": []}
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def test_old_and_k_view_caches_load_and_other_views_are_refused(view_cache, tmp_path):
    cache, _, recipe, _ = view_cache
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    _write_format1_cache(tmp_path / "old", ["a", "b", "c"], array)
    old = EmbeddingCache(tmp_path / "old")
    assert (old.views, old.recipe) == (1, None)
    assert torch.equal(old.lookup(["c", "a"]), torch.from_numpy(array[[2, 0]]))
    assert torch.equal(old.lookup(["c"], [0]), torch.from_numpy(array[[2]]))
    check_cache_views(old, None)
    check_cache_views(cache, recipe)
    with pytest.raises(ValueError, match="one unaugmented view"):
        old.view_params(["a"], [0])
    with pytest.raises(ValueError, match="holds 1 view"):
        old.lookup(["a"], [1])

    with pytest.raises(EmbeddingCacheError) as err:  # a K-view request of an old cache
        check_cache_views(old, recipe)
    assert "1 unaugmented view per image" in str(err.value) and f"{K} views, recipe rrc_flip v1" in str(err.value)
    with pytest.raises(EmbeddingCacheError) as err:  # K mismatch
        check_cache_views(cache, ViewRecipe(K + 2, recipe.scale_min))
    assert f"holds {K} views" in str(err.value) and f"requests {K + 2} views" in str(err.value)
    with pytest.raises(EmbeddingCacheError) as err:  # recipe mismatch: another crop scale
        check_cache_views(cache, ViewRecipe(K, 0.2))
    assert f"scale_min={recipe.scale_min}" in str(err.value) and "scale_min=0.2" in str(err.value)
    with pytest.raises(EmbeddingCacheError, match="the run requests 1 unaugmented view"):
        check_cache_views(cache, None)


def test_a_distill_run_refuses_a_cache_of_other_views(view_cache, tmp_path, tiny_world, tiny_teacher_dir, caplog):
    from dime_ds.objectives.teacher_source import TeacherSource

    cache = view_cache[0]
    _write_format1_cache(tmp_path / "texts", ["t"], np.ones((1, cache.dim), np.float32), cache.model)
    (tmp_path / "images").symlink_to(cache.directory)

    def source(*overrides):
        cfg = load_config(engine_overrides(tmp_path, tiny_world, tiny_teacher_dir, "teacher.source=cache",
                                           f"teacher.cache_dir={tmp_path}", *overrides))
        return TeacherSource(cfg.teacher, torch.device("cpu"), 4, augmented=cfg.data.augment,
                             views=ViewRecipe.from_config(cfg))

    with caplog.at_level("WARNING"):
        source(f"embed.views={K}")
    assert "unaugmented" not in caplog.text  # the cache's views are augmented ones
    with pytest.raises(EmbeddingCacheError, match=rf"teacher.cache_dir: .* holds {K} views.*requests 2 views"):
        source("embed.views=2")
    with pytest.raises(EmbeddingCacheError, match=r"holds 4 views.*scale_min=0.8.*requests 4 views.*scale_min=0.3"):
        source(f"embed.views={K}", "data.crop_scale_min=0.3")


def test_embed_stage_recomputes_a_shard_of_other_views(view_cache, tmp_path, tiny_world):
    from dime_ds.embed.stage import embed_shard, finished_record
    from dime_ds.data.shards import sha256_file

    cache, teacher, recipe, _ = view_cache
    url = list_shards(str(tiny_world / "images"))[0]
    record, computed = embed_shard(teacher, url, tmp_path, "shard-000000", "images", "tiny", 16, views=recipe)
    assert computed and record["views"]["views"] == K
    assert finished_record(tmp_path, "shard-000000", url, sha256_file(url), "images", "tiny", recipe) is not None
    for other in (None, ViewRecipe(K, 0.2), ViewRecipe(K + 1, recipe.scale_min)):
        assert finished_record(tmp_path, "shard-000000", url, sha256_file(url), "images", "tiny", other) is None


def test_the_teacher_saw_exactly_the_stored_views(view_cache, tmp_path, tiny_world, monkeypatch):
    from dime_ds.embed.stage import embed_shard

    _, teacher, recipe, _ = view_cache
    seen = []
    encode = teacher.encode_image
    monkeypatch.setattr(teacher, "encode_image", lambda x: (seen.append(x.clone()), encode(x))[1])
    url = list_shards(str(tiny_world / "images"))[1]
    embed_shard(teacher, url, tmp_path, "shard-000001", "images", "tiny", 12, views=recipe)
    inputs = torch.cat(seen)  # every view of every image, in row order
    cache_params = np.load(tmp_path / "shard-000001.views.npy", allow_pickle=False)
    keys = (tmp_path / "shard-000001.keys.txt").read_text().splitlines()
    originals = _originals(tiny_world)
    want = torch.stack([apply_view(originals[k], p, teacher.preprocess_cfg) for k, ps in zip(keys, cache_params)
                        for p in ps])
    assert inputs.shape == (len(keys) * K, 3, 32, 32) and torch.equal(inputs, want)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_objective_shows_the_same_views_and_targets(view_cache, tmp_path, tiny_world, tiny_teacher_dir,
                                                            workers):
    """The DIME objective over a K-view cache (2 loader processes included): the student's inputs are
    the recorded views at its own preprocessing, the targets those views' embeddings, and a resumed
    objective continues with the batches and targets of the uninterrupted one."""
    from dime_ds.distributed.env import WorldInfo
    from dime_ds.models import PRECISIONS, build_student, student_preprocess_cfg
    from dime_ds.objectives.base import RunContext
    from dime_ds.objectives.dime import DimeObjective

    cache = view_cache[0]
    (tmp_path / "images").symlink_to(cache.directory)
    from dime_ds.embed.stage import embed_shards

    cfg = load_config(engine_overrides(tmp_path, tiny_world, tiny_teacher_dir, f"embed.views={K}",
                                       "teacher.source=cache", f"teacher.cache_dir={tmp_path}",
                                       f"data.workers={workers}", "embed.choice=round_robin"))
    embed_shards(view_cache[1], list_shards(cfg.data.texts), tmp_path / "texts", "texts", cfg.teacher.arch,
                 progress=False)
    world = WorldInfo(0, 0, 1, 1, "127.0.0.1", 0, "single")
    ctx = RunContext(world, torch.device("cpu"), 8, PRECISIONS["fp32"], seed=cfg.seed)
    student = build_student(cfg.student, cache.dim)
    pp = student_preprocess_cfg(student.model_cfg)
    originals = _originals(tiny_world)

    def steps(objective, n):
        out = []
        for _ in range(n):
            batch = objective.next_batch()
            out.append((batch, objective.targets(batch)))
        return out

    full = DimeObjective.from_config(cfg, ctx)
    full.start(student, None)
    run = steps(full, 10)  # more than an epoch of 64 images: round robin moves every image to its next view
    for batch, targets in run:
        keys, views = batch["images"]["keys"], batch["images"]["views"].tolist()
        params = cache.view_params(keys, views)
        want = torch.stack([apply_view(originals[k], p, pp) for k, p in zip(keys, params)])
        assert torch.equal(batch["student"]["images"], want)
        assert torch.equal(targets["image"], cache.lookup(keys, views))
    first_epoch = {k: v for b, _ in run[:8] for k, v in zip(b["images"]["keys"], b["images"]["views"].tolist())}
    second = [(k, v) for b, _ in run[8:] for k, v in zip(b["images"]["keys"], b["images"]["views"].tolist())]
    assert all(v == (first_epoch[k] + 1) % K for k, v in second)

    part = DimeObjective.from_config(cfg, ctx)
    part.start(student, None)
    steps(part, 6)
    resumed = DimeObjective.from_config(cfg, ctx)
    resumed.start(student, json.loads(json.dumps(part.state_dict())))
    for (want_b, want_t), (got_b, got_t) in zip(run[6:], steps(resumed, 4)):
        assert got_b["images"]["keys"] == want_b["images"]["keys"]
        assert torch.equal(got_b["student"]["images"], want_b["student"]["images"])
        assert torch.equal(got_t["image"], want_t["image"]) and torch.equal(got_t["text"], want_t["text"])
    for objective in (full, part, resumed):
        objective.images.close()
        objective.texts.close()
