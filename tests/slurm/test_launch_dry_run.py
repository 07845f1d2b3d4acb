"""`python -m dime_ds.launch --dry-run`: the sbatch script submitit would submit, without a cluster."""
from __future__ import annotations

import re
import subprocess
import sys

from dime_ds.launch import StageJob, RESUME


def _sbatch_flags(script: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, flags=re.M))


def test_dry_run_8_nodes_asks_for_64_tasks(tmp_path):
    run = subprocess.run([sys.executable, "-m", "dime_ds.launch", "--dry-run", "--nodes", "8",
                          "--job-dir", str(tmp_path / "jobs"), "stage=distill", "experiment=vitb32_from_vitl14"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    flags = _sbatch_flags(run.stdout)
    assert flags["nodes"] == "8" and flags["gpus-per-node"] == "8"
    assert int(flags["nodes"]) * int(flags["ntasks-per-node"]) == 64
    assert flags["signal"].startswith("USR1@")  # the trainer checkpoints on SIGUSR1
    assert "srun" in run.stdout and "submitit.core._submit" in run.stdout
    assert "name: vitb32_from_vitl14" in run.stdout  # the resolved config
    assert not (tmp_path / "jobs").exists()  # nothing submitted, nothing written


def test_dry_run_flags_override_config_and_cpu_tasks(tmp_path):
    run = subprocess.run([sys.executable, "-m", "dime_ds.launch", "--dry-run", "--nodes", "2", "--gpus-per-node", "0",
                          "--tasks-per-node", "3", "--partition", "cpu", "--time", "30", "--mem", "16",
                          "--job-dir", str(tmp_path), "stage=distill", "experiment=demo", "slurm.nodes=5"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    flags = _sbatch_flags(run.stdout)
    assert flags["nodes"] == "2" and flags["ntasks-per-node"] == "3" and "gpus-per-node" not in flags
    assert flags["partition"] == "cpu" and flags["time"] == "30" and flags["mem"] == "16GB"
    assert flags["output"].startswith(f"{tmp_path}/demo/%j/")


def test_bad_stage_is_a_user_error():
    run = subprocess.run([sys.executable, "-m", "dime_ds.launch", "--dry-run", "stage=train"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "stage" in run.stderr


def test_checkpoint_resubmits_with_resume_latest():
    job = StageJob("distill", ["experiment=demo", "ckpt.resume=null"])
    again = job.checkpoint().function.checkpoint().function
    assert again.overrides == ["experiment=demo", RESUME]
    assert StageJob("match", []).argv() == ["stage=match"]
    assert StageJob("curate", ["curate.t=5"]).argv() == ["stage=metaclip", "curate.t=5"]
    assert StageJob("semantic_balance", ["balance.beta=0.2"]).argv() == ["stage=semantic_balance", "balance.beta=0.2"]
    assert StageJob("cluster", []).argv() == ["stage=cluster"]


def test_dry_run_curate_stage(tmp_path):
    run = subprocess.run([sys.executable, "-m", "dime_ds.launch", "--dry-run", "--nodes", "2", "--job-dir", str(tmp_path),
                          "stage=curate", "experiment=demo", "curate.metadata=/data/metadata.json", "curate.t=20000"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert _sbatch_flags(run.stdout)["nodes"] == "2"
    assert "metadata: /data/metadata.json" in run.stdout and "# stage curate: dime_ds.curate stage=metaclip" in run.stdout
