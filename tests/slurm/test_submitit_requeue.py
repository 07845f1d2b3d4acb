"""A stage that stopped after its checkpoint inside a submitit job: submitit's own job runner
(`submitit.core.submission.process_job`, what every task of a submitit job runs) with a stand-in
`scontrol`; no cluster needed. Rank 0 stores `checkpoint()` (ckpt.resume=latest) as the job and
requeues it; the other ranks exit with the stopped status; used-up time-outs end the job instead."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import submitit
from submitit.core.utils import JobPaths

from dime_ds import jobs
from dime_ds.launch import StageJob, submitit_signal

REPO = Path(__file__).resolve().parents[2]
JOB_ID = "4242"


class StoppingJob(StageJob):
    """Stands in for the trainer: replaces the signal handlers as StopRequested does, then stops."""

    def run_stage(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, lambda *_: None)
        return jobs.STOPPED


def _run_task(tmp_path: Path, rank: int, timeout_min: int, max_num_timeout: int, scontrol_status: int = 0):
    folder, bin_dir, calls = tmp_path / "job", tmp_path / "bin", tmp_path / "scontrol.calls"
    folder.mkdir(exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit {scontrol_status}\n')
    (bin_dir / "scontrol").chmod(0o755)
    pickle = JobPaths(folder, job_id=JOB_ID, task_id=rank).submitted_pickle
    job = submitit.helpers.DelayedSubmission(StoppingJob("distill", ["experiment=demo", "optim.steps=7"]))
    job.set_timeout(timeout_min, max_num_timeout)
    job.dump(pickle)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": JOB_ID, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2",
           "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1"}
    runner = "import sys; from submitit.core.submission import process_job; process_job(sys.argv[1])"
    run = subprocess.run([sys.executable, "-c", runner, str(folder)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    return run, pickle, (calls.read_text().splitlines() if calls.exists() else [])


def test_rank_0_requeues_the_job_resuming_from_latest(tmp_path):
    run, pickle, calls = _run_task(tmp_path, rank=0, timeout_min=60, max_num_timeout=3)
    assert calls == [f"requeue {JOB_ID}"], run.stderr
    again = submitit.helpers.DelayedSubmission.load(pickle).function
    assert isinstance(again, StageJob) and again.overrides == ["experiment=demo", "optim.steps=7", jobs.RESUME]
    assert run.returncode != 0 and "Requeued job" in run.stdout + run.stderr  # submitit exits for the requeue


def test_a_failed_requeue_on_preemption_leaves_the_job_to_slurm(tmp_path):
    """SLURM requeues a preempted job itself, and `scontrol requeue` then fails: no error result."""
    run, pickle, calls = _run_task(tmp_path, rank=0, timeout_min=60, max_num_timeout=3, scontrol_status=1)
    assert calls == [f"requeue {JOB_ID}"] and run.returncode == jobs.STOPPED, run.stderr
    assert submitit.helpers.DelayedSubmission.load(pickle).function.overrides[-1] == jobs.RESUME
    assert not JobPaths(pickle.parent, job_id=JOB_ID, task_id=0).result_pickle.exists()


def test_other_ranks_exit_stopped_without_requeueing(tmp_path):
    run, _, calls = _run_task(tmp_path, rank=1, timeout_min=60, max_num_timeout=3)
    assert calls == [] and run.returncode == jobs.STOPPED, run.stderr


def test_used_up_time_outs_end_the_job(tmp_path):
    """A stop this near the time limit counts as a time-out (submitit's max_num_timeout): none left."""
    run, _, calls = _run_task(tmp_path, rank=0, timeout_min=1, max_num_timeout=0)
    assert calls == [] and run.returncode != 0
    assert "timed-out too many times" in run.stdout + run.stderr


def test_the_signal_is_submitits():
    assert submitit_signal() == signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]
