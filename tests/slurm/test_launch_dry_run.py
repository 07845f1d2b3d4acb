"""`python -m dime_ds.launch --dry-run`: the sbatch request, without a cluster; and each slurm/*.sh
script asks SLURM for what the launch it names asks for (pure parsing: runs everywhere)."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dime_ds import jobs
from dime_ds.launch import StageJob

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
# a script's own: its job's name and log file (submitit keeps its logs in the job folder)
SCRIPT_ONLY = {"job-name", "output", "error"}


def _sbatch_flags(text: str) -> dict:
    """#SBATCH options -> value (True for a bare flag); `##SBATCH` lines are comments."""
    flags = {}
    for key, value in re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?\s*$", text, flags=re.M):
        flags[key] = value or True
    return flags


def _minutes(value: str) -> int:
    """SLURM's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    if "-" in value:
        days, rest = value.split("-", 1)
        h, m = ([int(p) for p in rest.split(":")] + [0])[:2]
        return int(days) * 1440 + h * 60 + m
    parts = [int(p) for p in value.split(":")]
    return parts[0] if len(parts) <= 2 else parts[0] * 60 + parts[1]


def _request(flags: dict) -> dict:
    out = {k: v for k, v in flags.items() if k not in SCRIPT_ONLY}
    if "time" in out:
        out["time"] = _minutes(str(out["time"]))
    return out


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dime_ds.launch", "--dry-run", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_time_formats():
    assert [_minutes(t) for t in ("30", "3-00:00:00", "1-00:00:00", "2:30:00", "1-12", "45:10")] == \
        [30, 4320, 1440, 150, 2160, 45]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_asks_what_its_launch_asks(script, tmp_path):
    """The #SBATCH lines of each script equal the dry-run request of the launch its header names."""
    text = script.read_text()
    named = re.search(r"^# launch-equivalent: python -m dime_ds\.launch (.+)$", text, flags=re.M)
    assert named, f"{script.name} names no `# launch-equivalent: python -m dime_ds.launch ...` line"
    run = _dry_run("--job-dir", str(tmp_path), *shlex.split(named.group(1)))
    assert run.returncode == 0, run.stderr
    ours, launch = _request(_sbatch_flags(text)), _request(_sbatch_flags(run.stdout))
    assert ours == launch, f"{script.name}: #SBATCH {ours}\n launch --dry-run {named.group(1)}: {launch}"
    assert launch["signal"] == f"{jobs.SIGNAL}@{jobs.SIGNAL_LEAD_S}" and launch["requeue"] is True


def test_scripts_run_python_only():
    """Stage order and the requeue are Python's: the scripts start one srun and decide nothing."""
    for script in SCRIPTS:
        body = [line for line in script.read_text().splitlines() if line.strip() and not line.startswith("#")]
        assert sum("srun" in line for line in body) == 1, script.name
        assert not any(re.search(r"\b(scontrol|case|for|if)\b", line) for line in body), script.name


def test_dry_run_paper_job_asks_for_64_tasks(tmp_path):
    run = _dry_run("--job-dir", str(tmp_path / "jobs"), "stage=distill", "experiment=vitb32_from_vitl14")
    assert run.returncode == 0, run.stderr
    flags = _sbatch_flags(run.stdout)
    assert flags["nodes"] == "8" and flags["gpus-per-node"] == "8"  # the experiment's slurm section
    assert int(flags["nodes"]) * int(flags["ntasks-per-node"]) == 64
    assert flags["signal"].startswith("USR1@")  # the trainer checkpoints on SIGUSR1
    assert "srun starts 64 task(s)" in run.stdout and "dime_ds.distill" in run.stdout
    assert "name: vitb32_from_vitl14" in run.stdout  # the resolved config
    assert not (tmp_path / "jobs").exists()  # nothing submitted, nothing written


def test_dry_run_flags_override_config_and_cpu_tasks(tmp_path):
    run = _dry_run("--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "3", "--partition", "cpu",
                   "--time", "30", "--mem", "16", "--job-dir", str(tmp_path), "stage=distill", "experiment=demo",
                   "slurm.nodes=5")
    assert run.returncode == 0, run.stderr
    flags = _sbatch_flags(run.stdout)
    assert flags["nodes"] == "2" and flags["ntasks-per-node"] == "3" and "gpus-per-node" not in flags
    assert flags["partition"] == "cpu" and flags["time"] == "30" and flags["mem"] == "16G"
    assert f"# job folder: {tmp_path}/demo/%j" in run.stdout


def test_bad_stage_is_a_user_error():
    run = _dry_run("stage=train")
    assert run.returncode == 2 and "stage" in run.stderr


def test_checkpoint_resubmits_with_resume_latest():
    job = StageJob("distill", ["experiment=demo", "ckpt.resume=null"])
    again = job.checkpoint().function.checkpoint().function
    assert again.overrides == ["experiment=demo", jobs.RESUME]
    assert StageJob("match", []).argv() == ["match.stage=match"]
    assert StageJob("curate", ["curate.t=5"]).argv() == ["curate.stage=metaclip", "curate.t=5"]
    assert StageJob("semantic_balance", ["balance.beta=0.2"]).argv() == ["curate.stage=semantic_balance",
                                                                          "balance.beta=0.2"]
    assert StageJob("cluster", []).argv() == ["curate.stage=cluster"]


def test_eval_shorthands_are_spelled_out_as_the_eval_entry_point_reads_them():
    """The launcher composes eval's config without importing it (no torch); eval's main reads the same table."""
    given = ["model=/runs/x", "pretrained=openai", "suite=synthetic", "eval.workers=0"]
    assert jobs.config_overrides("eval", given) == ["eval.model=/runs/x", "eval.pretrained=openai",
                                                    "suite=synthetic", "eval.workers=0"]


def test_dry_run_curate_stage(tmp_path):
    run = _dry_run("--nodes", "2", "--job-dir", str(tmp_path), "stage=curate", "experiment=demo",
                   "curate.metadata=/data/metadata.json", "curate.t=20000")
    assert run.returncode == 0, run.stderr
    assert _sbatch_flags(run.stdout)["nodes"] == "2"
    assert "metadata: /data/metadata.json" in run.stdout
    assert "each running stage curate: dime_ds.curate curate.stage=metaclip" in run.stdout
