"""The DeepSpeed engine on 2 gloo ranks: ZeRO stages 1-3 train, a ZeRO-3-partitioned teacher
embeds like the replicated one, a cached teacher gives the live teacher's loss."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from dime_ds.config import load_config
from tests.conftest import engine_overrides
from tests.multirank.harness import run_ranks

pytestmark = pytest.mark.slow


def _train(rank, world_size, overrides):
    from dime_ds.training import run_training

    return run_training(load_config(overrides))


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, tiny_world, tiny_teacher_dir):
    runs = {}
    for stage in (1, 2, 3):
        work = tmp_path_factory.mktemp(f"zero{stage}")
        summaries = run_ranks(_train, 2, engine_overrides(work, tiny_world, tiny_teacher_dir,
                                                          f"dist.ds_config=zero{stage}", "eval.every_n_steps=3"),
                              timeout=300)
        runs[stage] = (summaries, load_file(str(work / "runs" / "demo" / "final" / "student.safetensors")))
    return runs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_a_tiny_student_on_two_ranks(zero_runs, stage):
    summaries, weights = zero_runs[stage]
    assert [s["status"] for s in summaries] == ["completed", "completed"]
    assert all(s["step"] == 3 for s in summaries)
    assert summaries[0]["loss"] == summaries[1]["loss"]  # logged losses are reduced over ranks
    assert math.isfinite(summaries[0]["loss"]["loss/total"])
    assert "image_proj.weight" in weights and weights["image_proj.weight"].shape == (32, 64)
    # Periodic eval with each rank extracting its share (in lockstep: ZeRO-3 forwards are collective)
    evals = [s["eval"] for s in summaries]
    assert evals[0] == evals[1]
    assert evals[0]["student"]["shape"]["n"] == 32 and evals[0]["student"]["captions"]["texts"] == 64
    assert set(evals[0]) == {"student", "teacher"} and "shape_probe" not in evals[0]["student"]


def test_zero_stages_agree(zero_runs):
    """Same data, same init: partitioning must not change the result beyond bf16 rounding."""
    reference = zero_runs[1][1]
    for stage in (2, 3):
        for key, value in reference.items():
            torch.testing.assert_close(zero_runs[stage][1][key], value, rtol=0.05, atol=0.02, msg=key)


def _teacher_embeddings(rank, world_size, overrides, images, tokens):
    from dime_ds.engine.zero3_teacher import zero3_inference
    from dime_ds.objectives.teacher_source import TeacherSource

    cfg = load_config(overrides)
    source = TeacherSource(cfg.teacher, torch.device("cpu"), 4, zero3_wrap=zero3_inference)
    return source.embed(images, tokens)


def test_zero3_teacher_matches_replicated_teacher(tmp_path, tiny_world, tiny_teacher_dir):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(1, 1000, (4, 32), generator=torch.Generator().manual_seed(1))
    base = engine_overrides(tmp_path, tiny_world, tiny_teacher_dir)
    replicated = run_ranks(_teacher_embeddings, 2, base + ["teacher.shard=replicate"], images, tokens)
    zero3 = run_ranks(_teacher_embeddings, 2, base + ["teacher.shard=zero3"], images, tokens)
    for (r_img, r_txt), (z_img, z_txt) in zip(replicated, zero3):
        torch.testing.assert_close(z_img, r_img, rtol=2e-2, atol=2e-2)  # bf16 tolerance
        torch.testing.assert_close(z_txt, r_txt, rtol=2e-2, atol=2e-2)


def _write_cache(cfg, out_dir):
    """Teacher embeddings of every unaugmented image and sentence, by the embed stage's core."""
    from dime_ds.data.shards import list_shards
    from dime_ds.embed.stage import embed_shards
    from dime_ds.models import load_teacher

    teacher = load_teacher(cfg.teacher, torch.device("cpu"))
    for modality, spec in (("images", cfg.data.images), ("texts", cfg.data.texts)):
        embed_shards(teacher, list_shards(spec), out_dir / modality, modality, cfg.teacher.arch, progress=False)


def test_cached_teacher_gives_the_live_loss(tmp_path, tiny_world, tiny_teacher_dir):
    live_overrides = engine_overrides(tmp_path / "live", tiny_world, tiny_teacher_dir,
                                      "data.augment=false", "optim.steps=1")
    _write_cache(load_config(live_overrides), tmp_path / "cache")
    cache_overrides = engine_overrides(tmp_path / "cached", tiny_world, tiny_teacher_dir, "data.augment=false",
                                       "optim.steps=1", "teacher.source=cache",
                                       f"teacher.cache_dir={tmp_path / 'cache'}")
    live = run_ranks(_train, 2, live_overrides, timeout=300)[0]["loss"]
    cached = run_ranks(_train, 2, cache_overrides, timeout=300)[0]["loss"]
    for key in ("loss/vl", "loss/pvl", "loss/total"):
        assert cached[key] == pytest.approx(live[key], rel=2e-2), key


def _world_with_bad_samples(src, dst):
    """The tiny world plus one shard per stream holding a corrupt JPEG and an empty sentence."""
    import shutil

    from dime_ds.data.shards import ShardWriter

    shutil.copytree(src, dst)
    good_jpeg = next((dst / "images").glob("*.tar")).read_bytes()  # any bytes that are not a JPEG
    with ShardWriter(dst / "images", prefix="shard-bad", maxcount=10) as w:
        w.write("bad-image", {"jpg": b"\xff\xd8\xff\xe0 truncated" + good_jpeg[:10], "json": b"{}"})
    with ShardWriter(dst / "texts", prefix="shard-bad", maxcount=10) as w:
        w.write("bad-text", {"txt": b"   \n", "json": b"{}"})
    return dst


def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path, tiny_world, tiny_teacher_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    world = _world_with_bad_samples(tiny_world, tmp_path / "world")
    # 16 steps x 16 samples: more than one pass over 65 images / 97 sentences, bad ones included.
    overrides = engine_overrides(tmp_path / "work", world, tiny_teacher_dir, "optim.steps=16", "log.every_n_steps=4",
                                 "eval.every_n_steps=8")
    summary = run_ranks(_train, 1, overrides, timeout=300)[0]
    assert summary["status"] == "completed" and summary["step"] == 16
    assert summary["skipped"]["images"] >= 1 and summary["skipped"]["texts"] >= 1

    events = EventAccumulator(str(tmp_path / "work" / "runs" / "demo" / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("loss/total", "loss/vl", "loss/pvl", "loss/ud", "optim/lr", "optim/grad_norm",
                "perf/samples_per_s", "perf/teacher_s_per_step", "perf/student_s_per_step",
                "data/skipped_images", "data/skipped_texts", "memory/host_max_rss_gb",
                "zeroshot_student/shape", "zeroshot_teacher/colour", "retrieval_student/captions_image_to_text_R@1",
                "retrieval_teacher/captions_text_to_image_R@1"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("zeroshot_student/shape")] == [8, 16]
    assert not any(t.startswith("linear_probe") for t in scalars)  # not in eval.periodic_tasks
    assert [e.step for e in events.Scalars("loss/total")] == [4, 8, 12, 16]
    assert events.Scalars("data/skipped_images")[-1].value >= 1
    assert "similarity/teacher_vs_student" in events.Tags()["images"]
    assert any("config" in tag for tag in events.Tags()["tensors"])


def test_fp32_without_zero_logs_the_gradient_norm_zero_reports(tmp_path, tiny_world, tiny_teacher_dir):
    """DeepSpeed's plain fp32 optimizer (stage 0, no bf16: a CPU without native bf16) records no
    gradient norm; the loop's own, on 2 ranks, equals the one ZeRO-1's optimizer reports."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    norms = {}
    for stage in (0, 1):
        ds = tmp_path / f"fp32_zero{stage}.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": stage}, "bf16": {"enabled": False},
                                  "fp16": {"enabled": False}}))
        work = tmp_path / f"zero{stage}"
        run_ranks(_train, 2, engine_overrides(work, tiny_world, tiny_teacher_dir, f"dist.ds_config={ds}",
                                              "optim.steps=4"), timeout=300)
        events = EventAccumulator(str(work / "runs" / "demo" / "tensorboard"))
        events.Reload()
        norms[stage] = [(e.step, e.value) for e in events.Scalars("optim/grad_norm")]
    assert [step for step, _ in norms[0]] == [1, 2, 3, 4]
    assert all(math.isfinite(v) and v > 0 for _, v in norms[0])
    for (_, own), (_, zero) in zip(norms[0], norms[1]):
        assert own == pytest.approx(zero, rel=1e-4)
