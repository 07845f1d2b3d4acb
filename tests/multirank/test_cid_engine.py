"""CLIP-CID's learnable centres through the real Trainer on 2 gloo ranks: trained by the engine's
optimizer, saved in the checkpoint (not in the student's weights), and resumed exactly: a run
stopped at step 2 and resumed to step 4 ends with the student weights and centres of an uninterrupted
4-step run. Negative sampling is on (rate 0.5), so the resumed step counter matters too. A cached
teacher gives the live teacher's CID losses (labels by key). Two-pass
accumulation (grad_accum=2) ends where grad_accum=1 does, centres included. ZeRO-3 refuses learnable
centres with a ConfigError."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dime_ds.config import ConfigError, load_config
from tests.conftest import engine_overrides
from tests.multirank.harness import RankError, run_ranks
from tests.multirank.test_accumulate_engine import _initial_weights

pytestmark = pytest.mark.slow
TEACHER_DIM, K = 32, 40


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory, tiny_world):
    """Random pseudo-labels for every image key of the tiny world (the loss only needs them to exist)."""
    from dime_ds.data.pseudo_labels import write_pseudo_labels

    keys = sorted({Path(m).name.split(".")[0] for shard in sorted((Path(tiny_world) / "images").glob("*.tar"))
                   for m in tarfile.open(shard).getnames()})
    g = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("clusters")
    write_pseudo_labels(out, keys, g.integers(0, K, len(keys)), g.standard_normal((K, TEACHER_DIM)).astype(np.float32))
    return out


def _train(rank, world_size, overrides):
    from dime_ds.training import run_training

    return run_training(load_config(overrides))


def _overrides(work, tiny_world, tiny_teacher_dir, cluster_dir, *extra):
    return engine_overrides(work, tiny_world, tiny_teacher_dir, "loss.w_cluster=0.5", "loss.w_instance=0.5",
                            "loss.learn_centres=true", "loss.cluster_sample_rate=0.5", f"cluster.out_dir={cluster_dir}",
                            "optim.schedule=constant", "data.augment=true", *extra)


def _result(work: Path) -> tuple[dict, dict]:
    from dime_ds.engine.consolidate import fp32_objective_state_dict

    return (load_file(str(work / "runs" / "demo" / "final" / "student.safetensors")),
            fp32_objective_state_dict(work / "runs" / "demo" / "checkpoints"))


def test_learnable_centres_resume_exactly(tmp_path, tiny_world, tiny_teacher_dir, cluster_dir):
    from dime_ds.data.pseudo_labels import PseudoLabels

    base = (tiny_world, tiny_teacher_dir, cluster_dir)
    whole = _overrides(tmp_path / "whole", *base, "optim.steps=4", "ckpt.every_n_steps=2")
    summaries = run_ranks(_train, 2, whole, timeout=300)
    assert {"loss/cluster", "loss/instance"} <= set(summaries[0]["loss"])
    want_student, want_objective = _result(tmp_path / "whole")

    first = _overrides(tmp_path / "split", *base, "optim.steps=2", "ckpt.every_n_steps=2")
    assert run_ranks(_train, 2, first, timeout=300)[0]["status"] == "completed"
    resumed = _overrides(tmp_path / "split", *base, "optim.steps=4", "ckpt.every_n_steps=2", "ckpt.resume=latest")
    assert run_ranks(_train, 2, resumed, timeout=300)[0]["start_step"] == 2
    got_student, got_objective = _result(tmp_path / "split")

    initial = torch.from_numpy(PseudoLabels(cluster_dir).centroids)
    assert set(want_objective) == {"centres"} and not any(k.startswith("objective") for k in want_student)
    assert (want_objective["centres"] - initial).abs().max() > 1e-4, "the centres must have been trained"
    assert got_student.keys() == want_student.keys()
    for key, value in {**want_student, **{f"objective/{k}": v for k, v in want_objective.items()}}.items():
        got = got_student[key] if not key.startswith("objective/") else got_objective[key.split("/", 1)[1]]
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("ds_config", ["zero1", "zero2"])
def test_accumulated_run_ends_with_the_weights_and_centres_of_one_big_micro_batch(ds_config, tmp_path, tiny_world,
                                                                                  tiny_teacher_dir, cluster_dir):
    """As tests/multirank/test_accumulate_engine.py, with the CID terms on: per tensor, the runs differ
    by under 10 % of the tensor's own 3-step update (optim.eps=1: updates proportional to gradients)."""
    from dime_ds.data.pseudo_labels import PseudoLabels

    runs = {}
    for accum in (1, 2):
        work = tmp_path / f"accum{accum}"
        overrides = _overrides(work, tiny_world, tiny_teacher_dir, cluster_dir, f"dist.ds_config={ds_config}",
                               "optim.eps=1.0", f"optim.grad_accum={accum}", "data.augment=false")
        summaries = run_ranks(_train, 2, overrides, timeout=300)
        student, objective = _result(work)
        runs[accum] = (summaries[0]["loss"], {**student, "centres": objective["centres"]})
    (ref_loss, ref), (loss, got) = runs[1], runs[2]
    assert loss["loss/cluster"] == pytest.approx(ref_loss["loss/cluster"], rel=1e-2)
    assert loss["loss/total"] == pytest.approx(ref_loss["loss/total"], rel=1e-2)
    start = {**_initial_weights(overrides), "centres": torch.from_numpy(PseudoLabels(cluster_dir).centroids)}
    assert got.keys() == ref.keys() == start.keys()
    for key in ref:
        update = (ref[key].float() - start[key].float()).norm().item()
        assert update > 0, f"{key} must have moved"
        diff = (got[key].float() - ref[key].float()).norm().item()
        assert diff <= 0.1 * update, f"{key}: |A=2 - A=1| {diff:.3g}, its update {update:.3g}"


def test_cached_teacher_gives_the_live_cid_losses(tmp_path, tiny_world, tiny_teacher_dir, cluster_dir):
    """Labels are looked up by image key: a cached teacher (the embed stage's cache) reads the same
    pseudo-classes as a live one, so the first step's terms agree (to the cache's fp16 rounding)."""
    from tests.multirank.test_engine_dist import _write_cache

    common = (tiny_world, tiny_teacher_dir, cluster_dir, "optim.steps=1", "data.augment=false")
    live = _overrides(tmp_path / "live", *common)
    _write_cache(load_config(live), tmp_path / "cache")
    cached = _overrides(tmp_path / "cached", *common, "teacher.source=cache", f"teacher.cache_dir={tmp_path / 'cache'}")
    want, got = (run_ranks(_train, 2, o, timeout=300)[0]["loss"] for o in (live, cached))
    for key in ("loss/cluster", "loss/instance", "loss/total"):
        assert got[key] == pytest.approx(want[key], rel=2e-2), key


def test_zero3_refuses_learnable_centres(tmp_path, tiny_world, tiny_teacher_dir, cluster_dir):
    overrides = _overrides(tmp_path, tiny_world, tiny_teacher_dir, cluster_dir, "dist.ds_config=zero3")
    with pytest.raises(RankError, match=f"{ConfigError.__name__}.*learn_centres=true.*ZeRO stage 3"):
        run_ranks(_train, 1, overrides, timeout=300)
