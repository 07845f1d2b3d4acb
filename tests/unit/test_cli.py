"""The `dime-ds` console script runs each entry point's own main; an unknown command is refused; a
stage that stopped after its checkpoint is requeued by rank 0 of a plain sbatch job."""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

from dime_ds import jobs
from dime_ds.cli import COMMANDS, console, run_entry


def test_subcommand_runs_the_modules_main_with_its_usage(capsys):
    assert console(["distill", "--help"]) == 0
    assert "python -m dime_ds.distill" in capsys.readouterr().out


def test_argparse_subcommand_keeps_its_own_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        console(["export", "--help"])
    assert exit_.value.code == 0 and "--tag" in capsys.readouterr().out


def test_unknown_command_lists_the_commands(capsys):
    assert console(["distil"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'distil'" in err and all(name in err for name in COMMANDS)
    assert console([]) == 0 and "dime-ds <command>" in capsys.readouterr().out


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


def _sbatch_task(monkeypatch, rank: int | None = None) -> list[str]:
    """A task of a plain sbatch job after its stage ran; `rank`: in a process group the stage left up
    (a stand-in for torch.distributed, which records the barrier)."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    calls: list[str] = []
    if rank is not None:
        group = SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, get_rank=lambda: rank,
                                barrier=lambda: calls.append("barrier"))
        monkeypatch.setitem(sys.modules, "torch.distributed", group)
    return calls


def _stopped(argv):
    return jobs.STOPPED


def test_stopped_stage_under_sbatch_is_requeued_by_rank_0(scontrol, monkeypatch, capsys):
    group = _sbatch_task(monkeypatch, rank=0)
    assert run_entry(_stopped, []) == jobs.STOPPED
    assert scontrol() == ["requeue 77"] and "requeueing job 77" in capsys.readouterr().err
    assert group == ["barrier"]  # the other ranks wait for the requeue before they exit
    group = _sbatch_task(monkeypatch, rank=1)
    assert run_entry(_stopped, []) == jobs.STOPPED and scontrol() == ["requeue 77"]  # rank 1 asks nothing
    assert group == ["barrier"]


def test_a_stage_without_a_process_group_requeues_alone(scontrol, monkeypatch):
    _sbatch_task(monkeypatch)
    monkeypatch.setitem(sys.modules, "torch.distributed", None)
    assert run_entry(_stopped, []) == jobs.STOPPED and scontrol() == ["requeue 77"]


def test_failed_requeue_is_a_warning(scontrol, monkeypatch, capsys):
    _sbatch_task(monkeypatch, rank=0)
    monkeypatch.setenv("FAKE_SCONTROL_FAIL", "1")
    assert run_entry(_stopped, []) == jobs.STOPPED
    assert "already requeued" in capsys.readouterr().err


def test_no_requeue_under_submitit_outside_slurm_or_when_done(scontrol, monkeypatch):
    group = _sbatch_task(monkeypatch, rank=0)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # submitit requeues its own jobs (launch.StageJob)
    assert run_entry(_stopped, []) == jobs.STOPPED
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    assert run_entry(lambda argv: 0, []) == 0
    monkeypatch.delenv("SLURM_JOB_ID")
    assert run_entry(_stopped, []) == jobs.STOPPED
    assert scontrol() == [] and group == []
