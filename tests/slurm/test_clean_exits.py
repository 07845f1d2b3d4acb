"""A user error in a 2-task job on the local SLURM cluster, through the shipped sbatch scripts: srun
reports every task exited with status 2 (none terminated by srun --kill-on-bad-exit when another
ended first, none aborted), the job ends with 2, and the message is in the log once, without a
traceback. tests/multirank/test_clean_exits.py runs the same torchrun's way."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.slurm.test_slurm_jobs import REPO, SBATCH_CPU, _overrides, _script_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(300)]


def _sbatch(tmp_path: Path, script: str, args: list[str], **env) -> tuple[int, str]:
    out = tmp_path / "slurm-%j.out"
    run = subprocess.run(["sbatch", "--wait", "--parsable", f"--output={out}", *SBATCH_CPU,
                          str(REPO / "slurm" / script), *args],
                         capture_output=True, text=True, env=_script_env(**env), timeout=280)
    job_id = run.stdout.strip().split(";")[0]
    return run.returncode, Path(str(out).replace("%j", job_id)).read_text()


def _task_outcomes(log: str) -> dict[int, str]:
    """What srun says of each task that did not exit with 0: "srun: error: vm: tasks 0-1: Exited with
    exit code 2" -> {0: "Exited with exit code 2", 1: ...}."""
    outcomes = {}
    for tasks, outcome in re.findall(r"srun: error: \S+: tasks? ([\d,\-]+): (.+)", log):
        for part in tasks.split(","):
            lo, _, hi = part.partition("-")
            outcomes.update({t: outcome.strip() for t in range(int(lo), int(hi or lo) + 1)})
    return outcomes


def _assert_clean(returncode: int, log: str, message: str) -> None:
    assert returncode == 2, log[-4000:]
    assert _task_outcomes(log) == {0: "Exited with exit code 2", 1: "Exited with exit code 2"}, log[-4000:]
    assert log.count(message) == 1, log[-4000:]
    assert "terminate called" not in log and "Traceback" not in log, log[-4000:]


def test_a_user_error_in_the_distill_script_ends_every_task_alike(slurm_cluster, tmp_path, tiny_world,
                                                                 tiny_teacher_dir):
    """distill_vitb32.sh runs srun --kill-on-bad-exit: the first task to exit makes srun end the
    other, which still exits with its own status."""
    missing = tmp_path / "no_such_texts"
    _assert_clean(*_sbatch(tmp_path, "distill_vitb32.sh",
                           _overrides(tmp_path, tiny_world, tiny_teacher_dir, f"data.texts={missing}")),
                  f"no shards match '{missing}'")


def test_a_user_error_in_the_match_corpus_script_ends_every_task_alike(slurm_cluster, tmp_path, tiny_world,
                                                                       tiny_teacher_dir):
    missing = tmp_path / "no_such_images" / "x.tar"
    args = [f"work_dir={tmp_path}", f"data.root={tiny_world}", f"data.images={missing}",
            f"teacher.arch=local-dir:{tiny_teacher_dir}", "log.progress=false", "device=cpu"]
    _assert_clean(*_sbatch(tmp_path, "match_corpus.sh", args, STAGES="embed"), f"no shards match '{missing}'")
