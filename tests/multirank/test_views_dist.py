"""K-view teacher cache on 2 gloo ranks: the embed stage writes K views per image, and distilling
from them gives the loss of a live teacher shown the same views; a student with its own text tower
distils from cached text embeddings as from the live teacher."""
from __future__ import annotations

import numpy as np
import pytest

from dime_ds.config import load_config
from tests.conftest import engine_overrides
from tests.multirank.harness import run_ranks
from tests.multirank.test_engine_dist import _train

pytestmark = pytest.mark.slow
K = 4


def _embed(rank, world_size, overrides):
    from dime_ds.embed.stage import run_embed_stage

    return run_embed_stage(load_config(overrides))


@pytest.fixture(scope="module")
def view_cache(tmp_path_factory, tiny_world, tiny_teacher_dir):
    """`python -m dime_ds.match stage=embed embed.views=K` on 2 ranks."""
    out = tmp_path_factory.mktemp("view_cache")
    manifests = run_ranks(_embed, 2, engine_overrides(out, tiny_world, tiny_teacher_dir, f"embed.views={K}",
                                                      f"match.embed_dir={out}", "match.batch_size=16"), timeout=300)
    assert manifests[0] == manifests[1]
    return out


def test_embed_stage_writes_k_views_on_two_ranks(view_cache, tiny_world):
    from dime_ds.data.embeddings import EmbeddingCache
    from dime_ds.data.pipelines import decode_sample, iter_tar_samples
    from dime_ds.data.shards import list_shards
    from dime_ds.data.views import ViewRecipe

    images, texts = EmbeddingCache(view_cache / "images"), EmbeddingCache(view_cache / "texts")
    assert (images.views, texts.views, texts.recipe) == (K, 1, None)  # the text side: one per sentence
    recipe = ViewRecipe(K, 0.8)  # the demo's data.crop_scale_min
    assert images.recipe == recipe.recipe()
    samples = list(map(decode_sample, iter_tar_samples(list_shards(str(tiny_world / "images")))))
    assert len(images) == len(samples) == 64  # every shard, whichever rank embedded it
    for s in samples[::7]:  # the views any rank split draws: the recipe's, from (seed, key, view)
        got = images.view_params([s["key"]] * K, list(range(K)))
        assert np.array_equal(got, recipe.params(s["key"], *s["image"].size))


@pytest.mark.parametrize("text", ["teacher", "own"])
def test_cached_views_give_the_live_loss_on_the_same_views(view_cache, tmp_path, tiny_world, tiny_teacher_dir, text):
    common = ("data.augment=true", f"embed.views={K}", "optim.steps=2", f"student.text={text}")
    live = run_ranks(_train, 2, engine_overrides(tmp_path / "live", tiny_world, tiny_teacher_dir, *common),
                     timeout=300)[0]["loss"]
    cached = run_ranks(_train, 2, engine_overrides(tmp_path / "cached", tiny_world, tiny_teacher_dir, *common,
                                                   "teacher.source=cache", f"teacher.cache_dir={view_cache}"),
                       timeout=300)[0]["loss"]
    terms = ("loss/vl", "loss/pvl", "loss/ud", "loss/total")
    for key in terms:
        assert cached[key] == pytest.approx(live[key], rel=2e-2), key
    if text == "own":
        return
    # The same views matter: the live teacher's loss on plain random crops is another one.
    other = run_ranks(_train, 2, engine_overrides(tmp_path / "rrc", tiny_world, tiny_teacher_dir, *common[:1],
                                                  *common[2:]), timeout=300)[0]["loss"]
    assert any(other[key] != pytest.approx(live[key], rel=2e-2) for key in terms)
