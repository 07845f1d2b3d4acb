"""Teacher ensembles on 2 gloo ranks: the ensemble's losses and gradients equal one process holding
the whole global batch; the embed stage writes one cache per teacher with the same views; a live +
cached ensemble gives the all-live loss on those views; a killed ensemble run resumes to the
uninterrupted weights, and its export is the plain student."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dime_ds.config import load_config
from dime_ds.losses import functional
from tests.conftest import engine_overrides, ensemble_override
from tests.multirank.harness import RankError, run_ranks
from tests.multirank.test_engine_dist import _train

pytestmark = pytest.mark.slow
CFG = dict(w_vl=0.5, w_pvl=0.2, w_ud=0.3, t_vl=1.5, t_pvl=3.0, t_ud=7.0, scale=100.0)
D_IN, D_A, D_B, K = 6, 8, 5, 3


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.tower, self.txt = nn.Linear(D_IN, 7), nn.Linear(D_IN, D_A)
        self.head_a, self.head_b = nn.Linear(7, D_A), nn.Linear(7, D_B)

    def inputs(self, b: dict):
        h = self.tower(b["x_img"])
        return ((b["a_img"], b["a_txt"], self.head_a(h), self.txt(b["x_txt"])),
                [(b["b_img"], b["b_txt"], self.head_b(h))])


def _batch(n_img: int, n_txt: int) -> dict:
    g = torch.Generator().manual_seed(n_img * 10 + n_txt)
    return {"x_img": torch.randn(n_img, D_IN, generator=g), "x_txt": torch.randn(n_txt, D_IN, generator=g),
            "a_img": torch.randn(n_img, D_A, generator=g), "a_txt": torch.randn(n_txt, D_A, generator=g),
            "b_img": torch.randn(n_img, D_B, generator=g), "b_txt": torch.randn(n_txt, D_B, generator=g)}


ENSEMBLE = dict(weights=[0.4, 0.6], scales=[70.0, 60.0])


def _rank_losses(rank, world_size, batch, combine):
    from dime_ds.distributed import collectives as C
    from dime_ds.losses.dime import dime_loss, reduce_for_logging

    local = {k: v[rank * (len(v) // world_size):(rank + 1) * (len(v) // world_size)] for k, v in batch.items()}
    student = Student()
    first, extra = student.inputs(local)
    losses = dime_loss(*first, _Cfg(), extra, combine=combine, **ENSEMBLE)
    losses["total"].backward()
    grads = {n: C.all_reduce_mean(p.grad) for n, p in student.named_parameters() if p.grad is not None}
    return reduce_for_logging(losses), grads


class _Cfg:
    def __getattr__(self, key):
        return CFG[key]


@pytest.mark.parametrize("combine", ["prob", "logit"])
def test_ensemble_loss_and_gradients_on_two_ranks_equal_the_global_batch(combine):
    batch = _batch(8, 6)
    student = Student()
    first, extra = student.inputs(batch)
    want = functional.dime_losses(*first, **CFG, extra=extra, combine=combine, **ENSEMBLE)
    want["total"].backward()
    want_grads = {n: p.grad for n, p in student.named_parameters()}
    for logged, grads in run_ranks(_rank_losses, 2, batch, combine):
        for key in ("vl", "pvl", "ud", "total"):
            assert logged[key] == pytest.approx(want[key].item(), rel=1e-5, abs=1e-6), key
        assert grads.keys() == want_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=2e-5, msg=name)  # gradients ~10


def _embed(rank, world_size, overrides):
    from dime_ds.embed.stage import run_embed_stage

    return run_embed_stage(load_config(overrides))


@pytest.fixture(scope="module")
def ensemble_cache(tmp_path_factory, tiny_world, tiny_teacher_dir, tiny_teacher_b_dir):
    """`stage=embed` with a two-teacher ensemble and K views, on 2 ranks."""
    out = tmp_path_factory.mktemp("ensemble_cache")
    overrides = engine_overrides(out, tiny_world, tiny_teacher_dir, f"embed.views={K}", f"match.embed_dir={out}",
                                 "match.batch_size=16",
                                 ensemble_override(f"arch:'local-dir:{tiny_teacher_b_dir}',pretrained:null"))
    manifests = run_ranks(_embed, 2, overrides, timeout=300)
    assert manifests[0] == manifests[1]
    return out


def test_embed_stage_writes_one_cache_per_teacher_with_the_same_views(ensemble_cache, tiny_teacher_b_dir):
    from dime_ds.data.embeddings import EmbeddingCache

    a, b = EmbeddingCache(ensemble_cache / "images"), EmbeddingCache(ensemble_cache / "teacher1" / "images")
    assert (a.dim, b.dim) == (32, 24) and a.views == b.views == K
    assert b.model == f"local-dir:{tiny_teacher_b_dir}" and a.model != b.model
    keys = a.keys()
    assert keys == b.keys() and len(keys) == 64
    views = [v % K for v in range(len(keys))]
    assert np.array_equal(a.view_params(keys, views), b.view_params(keys, views))
    assert EmbeddingCache(ensemble_cache / "teacher1" / "texts").dim == 24


def test_live_and_cached_ensemble_gives_the_all_live_loss_on_the_same_views(ensemble_cache, tmp_path, tiny_world,
                                                                           tiny_teacher_dir, tiny_teacher_b_dir):
    b = f"arch:'local-dir:{tiny_teacher_b_dir}',pretrained:null,scale:60"
    common = ("data.augment=true", f"embed.views={K}", "optim.steps=2", "ensemble.weights=[1,2]")
    live = run_ranks(_train, 2, engine_overrides(tmp_path / "live", tiny_world, tiny_teacher_dir, *common,
                                                 ensemble_override(b)), timeout=300)[0]
    mixed = run_ranks(_train, 2, engine_overrides(tmp_path / "mixed", tiny_world, tiny_teacher_dir, *common,
                                                  ensemble_override(f"{b},source:cache,cache_dir:'{ensemble_cache}/teacher1'")),
                      timeout=300)[0]
    alone = run_ranks(_train, 2, engine_overrides(tmp_path / "alone", tiny_world, tiny_teacher_dir, *common[:3]),
                      timeout=300)[0]
    terms = ("loss/vl", "loss/pvl", "loss/ud", "loss/total")
    for key in terms:
        assert mixed["loss"][key] == pytest.approx(live["loss"][key], rel=2e-2), key
    assert any(alone["loss"][k] != pytest.approx(live["loss"][k], rel=5e-2) for k in terms)  # B takes part
    assert live["status"] == mixed["status"] == "completed"


def test_a_zero3_sharded_second_teacher_gives_the_replicated_loss(tmp_path, tiny_world, tiny_teacher_dir,
                                                                  tiny_teacher_b_dir):
    b = f"arch:'local-dir:{tiny_teacher_b_dir}',pretrained:null"
    common = ("data.augment=false", "optim.steps=2", "ensemble.combine=logit")
    runs = {shard: run_ranks(_train, 2, engine_overrides(tmp_path / shard, tiny_world, tiny_teacher_dir, *common,
                                                         ensemble_override(f"{b},shard:{shard}")), timeout=300)[0]
            for shard in ("replicate", "zero3")}
    for key in ("loss/vl", "loss/pvl", "loss/ud", "loss/total"):  # zero3 runs the teacher in half precision
        assert runs["zero3"]["loss"][key] == pytest.approx(runs["replicate"]["loss"][key], rel=2e-2), key


def test_a_cache_of_another_teacher_is_refused_naming_both(ensemble_cache, tmp_path, tiny_world, tiny_teacher_dir,
                                                          tiny_teacher_b_dir):
    from dime_ds.data.embeddings import EmbeddingCacheError

    wrong = ensemble_override(f"arch:'local-dir:{tiny_teacher_b_dir}',pretrained:null,source:cache,"
                              f"cache_dir:'{ensemble_cache}'")  # teacher A's cache
    with pytest.raises(RankError) as err:
        run_ranks(_train, 1, engine_overrides(tmp_path, tiny_world, tiny_teacher_dir, f"embed.views={K}", wrong),
                  timeout=300)
    text = str(err.value)
    assert EmbeddingCacheError.__name__ in text or "holds embeddings of" in text
    assert f"local-dir:{tiny_teacher_dir}" in text and f"local-dir:{tiny_teacher_b_dir}" in text
    assert "ensemble.teachers[0]" in text


def test_killed_ensemble_run_resumes_to_the_uninterrupted_weights(tmp_path, tiny_world, tiny_teacher_dir,
                                                                 tiny_teacher_b_dir):
    from safetensors.torch import load_file

    from tests.multirank.test_students_resume import KILL_AT, _export_loads_in_plain_open_clip, _overrides
    from tests.multirank.test_students_resume import _train as train_or_die

    b = ensemble_override(f"arch:'local-dir:{tiny_teacher_b_dir}',pretrained:null")
    extra = (b, "ensemble.combine=logit", "dist.ds_config=zero3")
    (s0, _), _ = run_ranks(train_or_die, 2, _overrides(tmp_path / "whole", tiny_world, tiny_teacher_dir, "vit", *extra),
                           timeout=600)
    want = load_file(s0["final_weights"])
    assert {k for k in want if k.startswith("ensemble_proj")} == {"ensemble_proj.0.weight"}
    assert want["ensemble_proj.0.weight"].shape == (24, 16)
    cut = _overrides(tmp_path / "cut", tiny_world, tiny_teacher_dir, "vit", *extra)
    with pytest.raises(RankError):
        run_ranks(train_or_die, 2, cut, KILL_AT, timeout=600)
    (s1, _), _ = run_ranks(train_or_die, 2, [*cut, "ckpt.resume=latest"], timeout=600)
    got = load_file(s1["final_weights"])
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    _export_loads_in_plain_open_clip(tmp_path / "cut" / "runs" / "demo", tmp_path / "exported")


def _one_round(similarity: np.ndarray) -> np.ndarray:
    """Algorithm 1 with stop_ratio=0 (one round): every image its best sentence, the first image keeps it."""
    best, taken, out = similarity.argmax(axis=1), set(), np.full(len(similarity), -1)
    for i, j in enumerate(best.tolist()):
        if j not in taken:
            out[i] = j
            taken.add(j)
    return out


@pytest.mark.parametrize("teacher", [None, 1])
def test_match_scores_pairs_by_the_weighted_mean_cosine_or_one_teacher(ensemble_cache, tmp_path, tiny_world,
                                                                      tiny_teacher_dir, tiny_teacher_b_dir, teacher):
    from dime_ds.data.embeddings import EmbeddingCache
    from dime_ds.match.stage import run_match_stage

    cfg = load_config(engine_overrides(tmp_path, tiny_world, tiny_teacher_dir, f"match.embed_dir={ensemble_cache}",
                                       f"match.out_dir={tmp_path / 'grounded'}", "match.stop_ratio=0",
                                       "ensemble.weights=[1,3]", "log.tensorboard=false",
                                       ensemble_override(f"arch:'local-dir:{tiny_teacher_b_dir}',pretrained:null"),
                                       *([f"match.teacher={teacher}"] if teacher is not None else [])))
    run_match_stage(cfg)
    got = np.load(tmp_path / "grounded" / "assignment.npy")

    def cosines(directory):
        img, txt = (EmbeddingCache(directory / m) for m in ("images", "texts"))
        a, b = (c.rows(0, len(c)).astype(np.float64) for c in (img, txt))
        a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
        return a @ b.T

    cos_a, cos_b = cosines(ensemble_cache), cosines(ensemble_cache / "teacher1")
    want = _one_round(cos_b if teacher == 1 else 0.25 * cos_a + 0.75 * cos_b)
    assert np.array_equal(got, want)
    assert not np.array_equal(got, _one_round(cos_a))  # not teacher A's grounding
