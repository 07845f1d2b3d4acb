"""A training run that stopped after its checkpoint, in a plain sbatch job: rank 0 requeues the job,
every rank waits for it; nothing is asked under submitit or outside SLURM."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from dime_ds.distributed import stage
from dime_ds.distributed.stage import requeue_stopped


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    """A stand-in `scontrol` on PATH that records its arguments (and fails with FAKE_SCONTROL_FAIL)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n'
                                      'if [ -n "$FAKE_SCONTROL_FAIL" ]; then echo "already requeued" >&2; exit 1; fi\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for key in ("SUBMITIT_EXECUTOR", "FAKE_SCONTROL_FAIL"):
        monkeypatch.delenv(key, raising=False)
    return lambda: calls.read_text().splitlines() if calls.exists() else []


def _sbatch_task(monkeypatch) -> list[str]:
    """A task of a plain sbatch job; the process group's barrier recorded."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    calls: list[str] = []
    monkeypatch.setattr(stage.C, "barrier", lambda: calls.append("barrier"))
    return calls


def _rank(r: int) -> SimpleNamespace:
    return SimpleNamespace(rank=r)


def test_stopped_run_under_sbatch_is_requeued_by_rank_0(scontrol, monkeypatch, caplog):
    group = _sbatch_task(monkeypatch)
    with caplog.at_level("WARNING"):
        requeue_stopped(_rank(0))
    assert scontrol() == ["requeue 77"] and "requeueing job 77" in caplog.text
    assert group == ["barrier"]  # the other ranks wait for the requeue before they exit
    requeue_stopped(_rank(1))
    assert scontrol() == ["requeue 77"]  # rank 1 asks nothing
    assert group == ["barrier", "barrier"]


def test_failed_requeue_is_a_warning(scontrol, monkeypatch, caplog):
    _sbatch_task(monkeypatch)
    monkeypatch.setenv("FAKE_SCONTROL_FAIL", "1")
    with caplog.at_level("WARNING"):
        requeue_stopped(_rank(0))
    assert "already requeued" in caplog.text


def test_no_requeue_under_submitit_or_outside_slurm(scontrol, monkeypatch):
    group = _sbatch_task(monkeypatch)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # submitit requeues its own jobs (launch.StageJob)
    requeue_stopped(_rank(0))
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    monkeypatch.delenv("SLURM_JOB_ID")
    requeue_stopped(_rank(0))
    assert scontrol() == [] and group == []
