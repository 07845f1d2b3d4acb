"""The requeue budget (dime_ds/jobs.py, slurm.max_requeues): a job requeued that many times in a row
without a newer checkpoint is not requeued again and ends with REQUEUES_SPENT and a message; the
count lives beside the checkpoints and survives the requeues (each run reads it afresh); a newer
checkpoint resets it. SLURM is a stand-in scontrol that records what it was asked, and the runs of
one job are its SLURM_RESTART_COUNT."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from dime_ds import jobs
from dime_ds.cli import run_entry
from dime_ds.distributed import stage
from dime_ds.jobs import REQUEUES_SPENT, RequeueBudget, RequeuesSpent, requeue_sbatch_job

JOB = "4242"


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    """A stand-in `scontrol` on PATH recording its arguments; a plain sbatch task of job JOB."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    return lambda: calls.read_text().splitlines() if calls.exists() else []


def _budget(tmp_path, max_requeues=2) -> RequeueBudget:
    """A fresh object for every run: what a requeued process knows is what the record says."""
    return RequeueBudget(tmp_path / "checkpoints", max_requeues)


def _checkpoint(tmp_path, tag: str) -> None:
    """Progress: the trainer wrote a newer complete checkpoint (`latest` names it)."""
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    (tmp_path / "checkpoints" / "latest").write_text(tag)


def _restart(monkeypatch, tmp_path, restart: int, max_requeues=2) -> int:
    """A run SLURM restarted: rank 0 counts it at its start (distributed.stage.count_requeue)."""
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
    stage.count_requeue(_budget(tmp_path, max_requeues))
    return json.loads((tmp_path / "checkpoints" / jobs.REQUEUE_RECORD).read_text())["requeues"]


def test_a_job_that_never_progresses_is_requeued_max_times_then_ends(scontrol, tmp_path, monkeypatch, caplog):
    with caplog.at_level("WARNING"):
        assert requeue_sbatch_job(JOB, "a rank was lost", budget=_budget(tmp_path))  # run 0
        assert _restart(monkeypatch, tmp_path, 1) == 1
        assert requeue_sbatch_job(JOB, "a rank was lost", budget=_budget(tmp_path))  # run 1
        assert _restart(monkeypatch, tmp_path, 2) == 2
    assert scontrol() == [f"requeue {JOB}"] * 2
    # each requeue logged its reason and its count
    assert "a rank was lost: requeueing job 4242" in caplog.text
    assert "requeue 1 of slurm.max_requeues=2" in caplog.text and "requeue 2 of slurm.max_requeues=2" in caplog.text
    with pytest.raises(RequeuesSpent) as spent:  # run 2: a third requeue in a row is past the budget
        requeue_sbatch_job(JOB, "a rank was lost", budget=_budget(tmp_path))
    assert scontrol() == [f"requeue {JOB}"] * 2  # nothing more asked
    assert spent.value.exit_status == REQUEUES_SPENT != jobs.STOPPED
    message = str(spent.value)
    assert "requeued 2 time(s) in a row without progress" in message and "slurm.max_requeues=2" in message
    assert "a rank was lost" in message


def test_a_newer_checkpoint_resets_the_count(scontrol, tmp_path, monkeypatch):
    """A long run that loses a node now and then goes on: each requeue after progress is the first."""
    _checkpoint(tmp_path, "step_00000004")
    for restart, tag in enumerate(["step_00000008", "step_00000012", "step_00000016", "step_00000020"], 1):
        requeue_sbatch_job(JOB, "a rank was lost", budget=_budget(tmp_path, max_requeues=1))
        assert _restart(monkeypatch, tmp_path, restart, max_requeues=1) == 1
        _checkpoint(tmp_path, tag)  # the restarted run got further before the next loss
    requeue_sbatch_job(JOB, "a rank was lost", budget=_budget(tmp_path, max_requeues=1))
    assert _restart(monkeypatch, tmp_path, 5, max_requeues=1) == 1
    assert scontrol() == [f"requeue {JOB}"] * 5
    # this run made no progress: a second requeue in a row is past a budget of one
    with pytest.raises(RequeuesSpent):
        requeue_sbatch_job(JOB, "a rank was lost", budget=_budget(tmp_path, max_requeues=1))


def test_a_requeue_slurm_made_itself_is_counted_once_and_can_end_the_job(scontrol, tmp_path, monkeypatch):
    """A lost node or a preemption requeues the job without dime_ds asking: the next run counts it at
    its start, once however many stages open there, and past the budget ends before any work."""
    assert [_restart(monkeypatch, tmp_path, r) for r in (1, 1, 2, 2)] == [1, 1, 2, 2]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    with pytest.raises(RequeuesSpent, match="requeued 2 time"):
        stage.count_requeue(_budget(tmp_path))
    assert scontrol() == []


def test_the_count_is_the_jobs_own(scontrol, tmp_path, monkeypatch):
    """A new submission of the same run (another job id) starts with the whole budget."""
    for restart in (1, 2):
        _restart(monkeypatch, tmp_path, restart)
    with pytest.raises(RequeuesSpent):
        _budget(tmp_path).check(JOB)
    assert _budget(tmp_path).check("4343") == 1


def test_max_requeues_0_never_requeues(scontrol, tmp_path):
    with pytest.raises(RequeuesSpent):
        requeue_sbatch_job(JOB, budget=_budget(tmp_path, max_requeues=0))
    assert scontrol() == []


def test_the_record_is_written_atomically_and_read_back(scontrol, tmp_path, monkeypatch):
    _checkpoint(tmp_path, "step_00000004")
    _restart(monkeypatch, tmp_path, 1)
    record = tmp_path / "checkpoints" / jobs.REQUEUE_RECORD
    assert json.loads(record.read_text()) == {"job": JOB, "restart": 1, "requeues": 1, "progress": "step_00000004"}
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    record.write_text("{not json")  # a foreign or damaged file: counting starts over, with a warning
    assert _budget(tmp_path).check(JOB) == 1


def test_every_rank_of_a_stopped_run_past_the_budget_raises_and_only_rank_0_prints(scontrol, tmp_path,
                                                                                   monkeypatch, capsys):
    """requeue_stopped: no requeue past the budget; each rank reads the same record, so all raise
    RequeuesSpent; rank 1's copy is marked for cli.run_entry to exit quietly with the same status."""
    monkeypatch.setattr(stage.C, "barrier", lambda: None)
    budget = _budget(tmp_path, max_requeues=0)
    statuses = []
    for rank in (0, 1):
        monkeypatch.setattr(stage.C, "rank", lambda rank=rank: rank)

        def main(argv, rank=rank):
            stage.requeue_stopped(SimpleNamespace(rank=rank), budget)
            return jobs.STOPPED

        statuses.append(run_entry(main, []))
    assert statuses == [REQUEUES_SPENT, REQUEUES_SPENT]
    assert capsys.readouterr().err.count("not requeueing it again") == 1
    assert scontrol() == []


def test_the_budget_comes_from_the_stages_config(tmp_path):
    from dime_ds.config import load_config

    cfg = load_config([f"work_dir={tmp_path}", "slurm.max_requeues=5", f"ckpt.dir={tmp_path}/ck"])
    assert stage.job_budget(cfg.dist) == RequeueBudget(tmp_path / "ck", 5)
    assert stage.job_budget(SimpleNamespace(backend="auto", timeout_min=1)) is None


def test_max_requeues_is_checked():
    from dime_ds.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="max_requeues"):
        load_config(["slurm.max_requeues=-1"])


@pytest.mark.parametrize("requeues, status", [(0, jobs.STOPPED), (1, REQUEUES_SPENT)])
def test_a_submitit_stop_is_handed_to_submitit_within_the_budget_only(scontrol, tmp_path, monkeypatch,
                                                                      requeues, status):
    """launch.StageJob: submitit requeues a stop itself; past the budget the stop is not handed to it
    (no requeue) and the task fails with REQUEUES_SPENT."""
    from dime_ds.launch import StageJob

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    budget = _budget(tmp_path, max_requeues=1)  # launch.main hands the job the one of its config
    budget.ckpt_dir.mkdir()
    budget.path.write_text(json.dumps({"job": JOB, "restart": 1, "requeues": requeues, "progress": None}))
    handed = []

    class Stopping(StageJob):
        def run_stage(self) -> int:
            return jobs.STOPPED

        def _requeue(self, handler) -> None:
            handed.append(handler)

    with pytest.raises(RuntimeError, match=f"exited with status {status}"):
        Stopping("distill", ["experiment=demo"], budget)()
    assert len(handed) == (1 if status == jobs.STOPPED else 0)
    # the requeued job keeps it
    assert Stopping("distill", ["experiment=demo"], budget).checkpoint().function.budget == budget


def test_progress_is_what_the_checkpoint_directorys_latest_names():
    """jobs.py (no torch) reads the file engine/checkpoint.py writes last for a complete checkpoint."""
    from dime_ds.engine.checkpoint import LATEST

    assert jobs.PROGRESS_MARK == LATEST
