"""A checkpoint save that fails part-way (the disk fills while a file is written) leaves the previous
checkpoint intact and `latest` naming it, stops the run on every rank with a message, and a resume
from latest then ends exactly as a run that never failed."""
from __future__ import annotations

import errno
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from dime_ds.config import load_config
from tests.conftest import engine_overrides
from tests.multirank.harness import RankError, run_ranks

pytestmark = pytest.mark.slow
STEPS = 8


def _train(rank, world_size, overrides, fail_on=None):
    """Training; with `fail_on`, any checkpoint file whose path matches that pattern (DeepSpeed prefixes
    bf16_ to a bf16 run's optimizer shards) is cut short by a full disk."""
    from dime_ds.training import run_training

    if fail_on is not None:
        real = torch.save

        def disk_full(obj, path, *args, **kwargs):
            if re.search(fail_on, str(path)):
                with open(path, "wb") as f:
                    f.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(obj, path, *args, **kwargs)

        torch.save = disk_full
    return run_training(load_config(overrides))


def _overrides(work, world, teacher, *extra):
    return engine_overrides(work, world, teacher, f"optim.steps={STEPS}", "ckpt.every_n_steps=4", "ckpt.keep_last=1",
                            "data.augment=true", *extra)


def _final(work):
    return load_file(str(work / "runs" / "demo" / "final" / "student.safetensors"))


@pytest.mark.parametrize("world_size, fail_on", [(1, "step_00000008"), (2, "step_00000008/(bf16_)?zero_pp_rank_1")])
def test_a_save_cut_by_a_full_disk_keeps_the_previous_checkpoint(tmp_path, tiny_world, tiny_teacher_dir,
                                                                 world_size, fail_on):
    work, ckpt = tmp_path / "work", tmp_path / "work" / "runs" / "demo" / "checkpoints"
    overrides = _overrides(work, tiny_world, tiny_teacher_dir)
    with pytest.raises(RankError) as err:
        run_ranks(_train, world_size, overrides, fail_on, timeout=300)
    shown = str(err.value)
    # Every rank stops with the same message (none waits in a collective for the one that failed).
    assert shown.count("CheckpointWriteError") >= world_size
    assert "checkpoint step_00000008 could not be written" in shown and "No space left on device" in shown
    assert "step_00000004 stays the latest" in shown
    assert (ckpt / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_00000004"]  # keep_last=1 kept it

    resumed = run_ranks(_train, world_size, [*overrides, "ckpt.resume=latest"], timeout=300)
    assert [s["start_step"] for s in resumed] == [4] * world_size
    assert [s["status"] for s in resumed] == ["completed"] * world_size
    resumed_weights = _final(work)
    run_ranks(_train, world_size, _overrides(tmp_path / "clean", tiny_world, tiny_teacher_dir), timeout=300)
    for key, value in _final(tmp_path / "clean").items():
        assert torch.equal(resumed_weights[key], value), key


def test_a_checkpoint_of_another_zero_stage_is_refused_naming_both(tmp_path, tiny_world, tiny_teacher_dir):
    """DeepSpeed itself fails with a TypeError deep in its optimizer; the run names both layouts, and the
    checkpoint stays loadable by the layout that wrote it."""
    work, ckpt = tmp_path / "work", tmp_path / "work" / "runs" / "demo" / "checkpoints"
    overrides = [*_overrides(work, tiny_world, tiny_teacher_dir), "optim.steps=4", "ckpt.every_n_steps=2"]
    run_ranks(_train, 1, [*overrides, "dist.ds_config=zero1"], timeout=300)
    with pytest.raises(RankError) as err:
        run_ranks(_train, 1, [*overrides, "dist.ds_config=zero0", "optim.steps=6", "ckpt.resume=latest"], timeout=300)
    shown = str(err.value)
    assert "CheckpointLayoutError" in shown and "step_00000004" in shown
    assert "written by an engine with ZeRO stage 1" in shown and "this run's engine has ZeRO stage 0" in shown
    resumed = run_ranks(_train, 1, [*overrides, "dist.ds_config=zero1", "optim.steps=6", "ckpt.resume=latest"],
                        timeout=300)
    assert resumed[0]["start_step"] == 4 and resumed[0]["status"] == "completed"
    assert (ckpt / "latest").read_text() == "step_00000006"


def test_a_rerun_under_the_same_name_replaces_an_earlier_layouts_checkpoint(tmp_path, tiny_world, tiny_teacher_dir):
    """ZeRO-1 writes optimizer shards that ZeRO-0 does not: left in the step's folder, they made the
    rerun's consolidation read the earlier run's shards and fail."""
    work, ckpt = tmp_path / "work", tmp_path / "work" / "runs" / "demo" / "checkpoints"
    overrides = [*_overrides(work, tiny_world, tiny_teacher_dir), "optim.steps=2", "ckpt.every_n_steps=2"]
    run_ranks(_train, 1, [*overrides, "dist.ds_config=zero1"], timeout=300)
    assert list((ckpt / "step_00000002").glob("*optim_states.pt"))
    rerun = run_ranks(_train, 1, [*overrides, "dist.ds_config=zero0"], timeout=300)
    assert rerun[0]["status"] == "completed" and rerun[0]["start_step"] == 0
    assert not list((ckpt / "step_00000002").glob("*optim_states.pt"))
    assert json.loads((ckpt / "step_00000002" / "engine_layout.json").read_text())["zero_stage"] == 0
    assert _final(work)  # consolidated from the rerun's own files


def test_student_precision_sets_the_engines_and_a_resume_in_another_is_refused(tmp_path, tiny_world,
                                                                              tiny_teacher_dir):
    """`student.precision` overrides the policy's auto (bf16 on this CPU only where it has native bf16)."""
    work, ckpt = tmp_path / "work", tmp_path / "work" / "runs" / "demo" / "checkpoints"
    overrides = [*_overrides(work, tiny_world, tiny_teacher_dir), "optim.steps=2", "ckpt.every_n_steps=2"]
    run_ranks(_train, 1, [*overrides, "student.precision=bf16"], timeout=300)
    assert json.loads((ckpt / "step_00000002" / "engine_layout.json").read_text())["bf16"] is True
    with pytest.raises(RankError) as err:
        run_ranks(_train, 1, [*overrides, "student.precision=fp32", "optim.steps=4", "ckpt.resume=latest"],
                  timeout=300)
    assert "ZeRO stage 0, bf16" in str(err.value) and "ZeRO stage 0, fp32" in str(err.value)
    run_ranks(_train, 1, [*overrides, "student.precision=fp32", "ckpt.resume=latest", "name=fp32"], timeout=300)
    layout = json.loads((work / "runs" / "fp32" / "checkpoints" / "step_00000002" / "engine_layout.json").read_text())
    assert layout["bf16"] is False and layout["fp16"] is False
