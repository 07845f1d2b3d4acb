"""A rank killed with SIGKILL mid-run: the survivor notices within seconds (heartbeats, not the
30-minute collective timeout), ends with the stopped status (3, requeued by the launchers) and a
message naming the dead rank, and `latest` still names the last complete checkpoint."""
from __future__ import annotations

import os
import signal

import pytest

from dime_ds.config import load_config
from tests.conftest import engine_overrides
from tests.multirank.harness import RankError, run_ranks

pytestmark = pytest.mark.slow


def _train_until_killed(rank, world_size, overrides, victim, die_at_step):
    from dime_ds.engine import loop
    from dime_ds.training import run_training

    if rank == victim:
        original, done = loop.Trainer._optimizer_step, [0]

        def step(self):
            if done[0] == die_at_step - 1:
                os.kill(os.getpid(), signal.SIGKILL)  # no handler, no checkpoint, no goodbye
            done[0] += 1
            return original(self)

        loop.Trainer._optimizer_step = step
    return run_training(load_config(overrides))


@pytest.mark.parametrize("victim", [1, 0])  # rank 0 also holds the rendezvous store
def test_the_survivor_names_the_dead_rank_and_latest_stays_complete(tmp_path, tiny_world, tiny_teacher_dir,
                                                                    capfd, victim):
    work = tmp_path / "work"
    overrides = engine_overrides(work, tiny_world, tiny_teacher_dir, "optim.steps=12", "ckpt.every_n_steps=4",
                                 "dist.dead_rank_s=3", "dist.timeout_min=30")
    # The harness's own limit (120 s) is far below the collective timeout: a hang fails as TimeoutError.
    with pytest.raises(RankError) as err:
        run_ranks(_train_until_killed, 2, overrides, victim, 7, timeout=120)
    survivor = 1 - victim
    shown = str(err.value)
    assert f"rank {victim} died without a result (exit code -9)" in shown
    assert f"rank {survivor} died without a result (exit code 3)" in shown  # the stopped status
    stderr = capfd.readouterr().err
    expected = "stopped beating" if victim == 1 else "is unreachable (the rendezvous store it holds"
    assert f"dime_ds: rank {survivor}: rank {victim} of 2 {expected}" in stderr
    ckpt = work / "runs" / "demo" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000004"
    assert not (work / "runs" / "demo" / "final").exists()


def test_under_sbatch_the_survivor_requeues_the_job(tmp_path, tiny_world, tiny_teacher_dir):
    """A plain sbatch job whose rank died: the survivor asks SLURM to requeue it before it ends (the
    job resumes from latest); scontrol is a stand-in that records what it was asked."""
    bin_dir, asked = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {asked}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    overrides = engine_overrides(tmp_path / "work", tiny_world, tiny_teacher_dir, "optim.steps=12",
                                 "ckpt.every_n_steps=4", "dist.dead_rank_s=3")
    with pytest.raises(RankError, match=r"rank 0 died without a result \(exit code 3\)"):
        run_ranks(_train_until_killed, 2, overrides, 1, 7, timeout=120, env=env)
    assert asked.read_text().split("\n")[0] == "requeue 4242"
