"""A rank SIGKILLed in a stage other than distillation (a stage through the stage runner, the embed
stage): the survivor ends as a training job's does (tests/multirank/test_dying_rank.py), from the
heartbeats, with status 3 and a message naming the dead rank, instead of raising the broken
collective's error or waiting for the collective timeout."""
from __future__ import annotations

import json
import os
import signal

import pytest

from tests.multirank.harness import RankError, run_ranks

pytestmark = pytest.mark.slow

# What the survivor says of the victim: rank 1 stops beating; rank 0 takes the store with it.
SAID = {1: "stopped beating", 0: "is unreachable (the rendezvous store it holds"}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no handler, no goodbye


def _runner_stage(rank, world_size, overrides, victim):
    """A small stage through the runner: both ranks agree once, the victim dies, the survivor waits
    in the next agreement for a rank that is gone."""
    from dime_ds.config import load_config
    from dime_ds.distributed import collectives as C
    from dime_ds.distributed.stage import agreed, stage

    cfg = load_config(overrides)
    with stage(cfg.dist, "cpu"):
        agreed(C.all_gather_object, rank, what="the first share")
        if rank == victim:
            _die()
        agreed(C.all_gather_object, rank, what="the second share")
    return "finished"


def _overrides(tmp_path, *extra):
    # dist.timeout_min far above the harness's limit: only the heartbeats can end the survivor in time
    return [f"work_dir={tmp_path}", "dist.dead_rank_s=3", "dist.timeout_min=30", *extra]


def _assert_ended_by_heartbeat(shown: str, stderr: str, victim: int) -> None:
    survivor = 1 - victim
    assert f"rank {victim} died without a result (exit code -9)" in shown
    assert f"rank {survivor} died without a result (exit code 3)" in shown  # the training job's status
    assert f"dime_ds: rank {survivor}: rank {victim} of 2 {SAID[victim]}" in stderr


@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_in_a_runner_stage_ends_the_survivor_like_training(tmp_path, capfd, victim):
    with pytest.raises(RankError) as err:
        run_ranks(_runner_stage, 2, _overrides(tmp_path), victim, timeout=120)
    _assert_ended_by_heartbeat(str(err.value), capfd.readouterr().err, victim)


def test_without_heartbeats_the_survivor_raises_the_broken_collective_instead(tmp_path):
    """The same stage with dist.dead_rank_s=0: what the heartbeats change (an error, not status 3)."""
    with pytest.raises(RankError) as err:
        run_ranks(_runner_stage, 2, [f"work_dir={tmp_path}", "dist.dead_rank_s=0"], 1, timeout=120)
    assert "rank 0:\nTraceback" in str(err.value) and "exit code 3" not in str(err.value)


def _embed_until_killed(rank, world_size, overrides, victim):
    from dime_ds.config import load_config
    from dime_ds.embed import stage as embed

    if rank == victim:
        embed._encode = lambda *args, **kwargs: _die()
    return embed.run_embed_stage(load_config(overrides))


def test_a_rank_killed_in_the_embed_stage_ends_the_survivor_like_training(tmp_path, capfd, tiny_world,
                                                                          tiny_teacher_dir):
    overrides = _overrides(tmp_path, "experiment=demo", f"data.root={tiny_world}",
                           f"teacher.arch=local-dir:{tiny_teacher_dir}", f"match.embed_dir={tmp_path}/emb",
                           "log.progress=false", "device=cpu", "match.batch_size=16")
    with pytest.raises(RankError) as err:
        run_ranks(_embed_until_killed, 2, overrides, 1, timeout=180)
    _assert_ended_by_heartbeat(str(err.value), capfd.readouterr().err, 1)


def _scontrol(tmp_path):
    """A stand-in `scontrol` that records what it was asked; the env of a plain sbatch task."""
    bin_dir, asked = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {asked}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "3", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return env, lambda: asked.read_text().splitlines() if asked.exists() else []


def _record(tmp_path, requeues: int) -> None:
    """The job was requeued `requeues` times in a row without progress, the last time into this run."""
    from dime_ds import jobs

    ckpt = tmp_path / "runs" / "dime_ds" / "checkpoints"  # ckpt.dir of the runner stage's config
    ckpt.mkdir(parents=True)
    (ckpt / jobs.REQUEUE_RECORD).write_text(json.dumps({"job": "4242", "restart": 3, "requeues": requeues,
                                                        "progress": None}))


@pytest.mark.parametrize("requeues, status", [(1, 3), (3, 4)])  # slurm.max_requeues=3 by default
def test_under_sbatch_the_survivor_requeues_within_the_budget_only(tmp_path, capfd, requeues, status):
    from dime_ds import jobs

    env, asked = _scontrol(tmp_path)
    _record(tmp_path, requeues)
    with pytest.raises(RankError, match=rf"rank 0 died without a result \(exit code {status}\)"):
        run_ranks(_runner_stage, 2, _overrides(tmp_path), 1, timeout=120, env=env)
    stderr = capfd.readouterr().err
    if status == jobs.STOPPED:
        assert asked() == ["requeue 4242"]
    else:
        assert status == jobs.REQUEUES_SPENT and asked() == []
        assert "requeued 3 time(s) in a row without progress" in stderr and "not requeueing it again" in stderr
    assert "dime_ds: rank 0: rank 1 of 2 stopped beating" in stderr


def _stage_entry(rank, world_size, overrides):
    """An entry point whose stage opens the runner: its exit status."""
    from dime_ds.cli import run_entry
    from dime_ds.config import load_config
    from dime_ds.distributed.stage import stage

    def main(argv):
        with stage(load_config(overrides).dist, "cpu"):
            return 0

    return run_entry(main, [])


def test_a_restart_past_the_budget_ends_every_rank_before_any_work(tmp_path, capfd):
    """SLURM requeued the job once more on its own (a lost node): the run counts it at its start and
    every rank ends with REQUEUES_SPENT, the message printed once."""
    from dime_ds import jobs

    env, asked = _scontrol(tmp_path)
    env["SLURM_RESTART_COUNT"] = "4"
    _record(tmp_path, 3)
    assert run_ranks(_stage_entry, 2, _overrides(tmp_path), timeout=120, env=env) == [jobs.REQUEUES_SPENT] * 2
    assert capfd.readouterr().err.count("not requeueing it again") == 1
    assert asked() == []
