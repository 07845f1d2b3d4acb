"""Exact resume: a distillation killed with SIGKILL and resumed with ckpt.resume=latest ends with
the same weights as a run that was never interrupted; SIGTERM checkpoints before exiting."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import engine_overrides

pytestmark = pytest.mark.slow
STEPS = 24


def _cmd(work: Path, world: Path, teacher: Path, *extra: str) -> list[str]:
    # Augmentation on, loader workers on: both must be reproduced exactly after the restart.
    return [sys.executable, "-m", "dime_ds.distill",
            *engine_overrides(work, world, teacher, f"optim.steps={STEPS}", "ckpt.every_n_steps=4",
                              "log.every_n_steps=4", "data.workers=2", "data.augment=true"), *extra]


def _wait_for_checkpoint(proc: subprocess.Popen, ckpt_dir: Path, at_least: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = ckpt_dir / "latest"
        if latest.is_file() and int(latest.read_text().strip().split("_")[-1]) >= at_least:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before its checkpoint:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    raise TimeoutError(f"no checkpoint >= {at_least} in {ckpt_dir}")


def _final(work: Path) -> dict:
    return load_file(str(work / "runs" / "demo" / "final" / "student.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_world, tiny_teacher_dir):
    work = tmp_path_factory.mktemp("uninterrupted")
    run = subprocess.run(_cmd(work, tiny_world, tiny_teacher_dir), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return _final(work)


def test_sigkill_then_resume_latest_equals_uninterrupted(tmp_path, tiny_world, tiny_teacher_dir, uninterrupted):
    ckpt = tmp_path / "runs" / "demo" / "checkpoints"
    proc = subprocess.Popen(_cmd(tmp_path, tiny_world, tiny_teacher_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(proc, ckpt, at_least=8)
    proc.kill()  # SIGKILL: no handler, no final checkpoint
    proc.wait()
    killed_at = int((ckpt / "latest").read_text().strip().split("_")[-1])
    assert killed_at < STEPS and not (tmp_path / "runs" / "demo" / "final").exists()

    resumed = subprocess.run(_cmd(tmp_path, tiny_world, tiny_teacher_dir, "ckpt.resume=latest"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and f"(step {killed_at})" in resumed.stderr
    final = _final(tmp_path)
    assert final.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_sigterm_checkpoints_before_exit(tmp_path, tiny_world, tiny_teacher_dir):
    ckpt = tmp_path / "runs" / "demo" / "checkpoints"
    proc = subprocess.Popen(_cmd(tmp_path, tiny_world, tiny_teacher_dir, "optim.steps=100000",
                                 "optim.warmup_steps=1", "ckpt.every_n_steps=0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list((tmp_path / "runs" / "demo").glob("tensorboard/events.*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 3, err[-3000:]  # stopped, not completed: a requeue would resume it
    step = int((ckpt / "latest").read_text().strip().split("_")[-1])
    assert 0 < step < 100000
