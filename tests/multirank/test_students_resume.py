"""Students of every family on 2 ranks (ZeRO-1 and ZeRO-2), killed with SIGKILL after a checkpoint
and resumed: weights *and buffers* (BatchNorm running statistics) equal the uninterrupted run's;
every rank holds the same statistics at a checkpoint; the export loads in plain open_clip and gives
the student's embeddings."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from dime_ds.config import load_config
from tests.conftest import engine_overrides
from tests.multirank.harness import RankError, run_ranks

pytestmark = pytest.mark.slow
STEPS, EVERY, KILL_AT = 6, 2, 5
TEXT = {"context_length": 16, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
TOWERS = {  # scaled down to 32 px; each narrower than the tiny teacher (32), so projected
    "vit": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
    "resnet_bn": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
    "convnext": {"timm_model_name": "convnext_atto", "timm_pool": "avg", "timm_proj": None, "image_size": 32},
    "mci": {"timm_model_name": "fastvit_mci0", "timm_pool": "avg", "timm_proj": None, "image_size": 32},
}
STAGES = {"vit": "zero1", "resnet_bn": "zero2", "convnext": "zero2", "mci": "zero1"}


def _overrides(work, world, teacher, tower, *extra):
    """The student as a user gives their own: an OpenCLIP model-config JSON file as student.arch."""
    work.mkdir(parents=True, exist_ok=True)
    model_cfg = work / f"{tower}.json"
    model_cfg.write_text(json.dumps({"embed_dim": 16, "vision_cfg": TOWERS[tower], "text_cfg": TEXT}))
    return engine_overrides(work, world, teacher, f"optim.steps={STEPS}", f"ckpt.every_n_steps={EVERY}",
                            f"dist.ds_config={STAGES[tower]}", "dist.dead_rank_s=3", "optim.global_batch_size=8",
                            f"student.arch={model_cfg}", "student.model_cfg=null", "data.augment=true", *extra)


def _train(rank, world_size, overrides, kill_at=None):
    from dime_ds.engine import loop
    from dime_ds.training import run_training

    kept, train, step = {}, loop.Trainer.train, loop.Trainer._optimizer_step
    if kill_at is not None:
        done = [0]

        def dying(self):
            if done[0] == kill_at - 1 and rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # no handler, no checkpoint
            done[0] += 1
            return step(self)

        loop.Trainer._optimizer_step = dying

    def train_and_keep_buffers(trainer):
        summary = train(trainer)
        kept.update({k: v.detach().float().clone() for k, v in trainer.student.named_buffers()})
        return summary

    loop.Trainer.train = train_and_keep_buffers
    try:
        return run_training(load_config(overrides)), kept
    finally:
        loop.Trainer.train, loop.Trainer._optimizer_step = train, step


@pytest.mark.parametrize("tower", list(TOWERS))
def test_killed_and_resumed_equals_uninterrupted_weights_and_buffers(tmp_path, tiny_world, tiny_teacher_dir, tower):
    from safetensors.torch import load_file

    whole = _overrides(tmp_path / "whole", tiny_world, tiny_teacher_dir, tower)
    (s0, buffers0), (_, buffers1) = run_ranks(_train, 2, whole, timeout=600)
    assert s0["status"] == "completed"
    for name, value in buffers0.items():  # one set of statistics on every rank at the last checkpoint
        assert torch.equal(buffers1[name], value), name
    want = load_file(s0["final_weights"])
    if tower in ("resnet_bn", "mci"):
        stats = [k for k in want if k.endswith("running_var")]
        assert stats and any(not torch.allclose(want[k], torch.ones_like(want[k])) for k in stats)  # trained

    cut = _overrides(tmp_path / "cut", tiny_world, tiny_teacher_dir, tower)
    with pytest.raises(RankError):
        run_ranks(_train, 2, cut, KILL_AT, timeout=600)
    ckpt = tmp_path / "cut" / "runs" / "demo" / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step_{KILL_AT - 1:08d}"
    (s_resumed, _), _ = run_ranks(_train, 2, [*cut, "ckpt.resume=latest"], timeout=600)
    got = load_file(s_resumed["final_weights"])
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)

    _export_loads_in_plain_open_clip(tmp_path / "cut" / "runs" / "demo", tmp_path / "exported")


def _export_loads_in_plain_open_clip(run_dir, out):
    import open_clip

    from dime_ds.engine.consolidate import fp32_state_dict, resolve_checkpoint, student_from_state
    from dime_ds.export import export_student

    export_student(run_dir, out)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    cfg, ckpt_dir, tag = resolve_checkpoint(run_dir, None)
    student = student_from_state(cfg, fp32_state_dict(ckpt_dir, tag)).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(images), student.encode_image(images),
                                   rtol=1e-4, atol=1e-5)


def test_zero3_trains_a_batchnorm_student_with_one_set_of_statistics(tmp_path, tiny_world, tiny_teacher_dir):
    overrides = _overrides(tmp_path, tiny_world, tiny_teacher_dir, "resnet_bn", "dist.ds_config=zero3",
                           "optim.steps=2", "ckpt.every_n_steps=2")
    (s0, buffers0), (_, buffers1) = run_ranks(_train, 2, overrides, timeout=600)
    assert s0["status"] == "completed"
    assert buffers0.keys() == buffers1.keys() and all(torch.equal(buffers1[k], v) for k, v in buffers0.items())
