"""Real SLURM (the local cluster of tests/slurm/cluster.py): the sbatch script, the submitit launcher,
and a preempted job that checkpoints, is requeued and resumes without repeating or skipping a step."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dime_ds import jobs
from tests.conftest import engine_overrides
from tests.slurm.test_launch_dry_run import _sbatch_flags

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(300)]
# 1 node, 2 CPU tasks, demo experiment: the overrides a CPU test cluster needs on the sbatch line.
SBATCH_CPU = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
              "--job-name=dime_test"]


def _overrides(work: Path, world: Path, teacher: Path, *extra: str) -> list[str]:
    # experiment= is the script's $EXPERIMENT, not an override (Hydra refuses it twice)
    return [o for o in engine_overrides(work, world, teacher, *extra) if not o.startswith("experiment=")]


def _script_env(**extra) -> dict:
    import os

    return {**os.environ, "PYTHON": sys.executable, "EXPERIMENT": "demo", **extra}


def _logged_steps(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"dime_ds\.engine\.loop: step (\d+)/\d+", text)]


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def test_sbatch_distill_script_two_ranks(slurm_cluster, tmp_path, tiny_world, tiny_teacher_dir):
    out = tmp_path / "slurm-%j.out"
    run = subprocess.run(["sbatch", "--wait", "--parsable", f"--output={out}", *SBATCH_CPU,
                          str(REPO / "slurm" / "distill_vitb32.sh"),
                          *_overrides(tmp_path, tiny_world, tiny_teacher_dir)],
                         capture_output=True, text=True, env=_script_env(), timeout=280)
    job_id = run.stdout.strip().split(";")[0]
    log = Path(str(out).replace("%j", job_id)).read_text()
    assert run.returncode == 0, f"{run.stderr}\n{log[-4000:]}"
    assert "rank 0/2" in log and "rank 1/2" in log  # both ranks joined the process group
    assert _logged_steps(log) == [1, 2, 3]
    run_dir = tmp_path / "runs" / "demo"
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert list((run_dir / "tensorboard").glob("events.*"))
    assert (run_dir / "final" / "student.safetensors").is_file()


def test_launch_distill_through_submitit(slurm_cluster, tmp_path, tiny_world, tiny_teacher_dir):
    launch = [sys.executable, "-m", "dime_ds.launch", "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
              "--cpus-per-task", "1", "--time", "10", "--job-dir", str(tmp_path / "jobs"), "stage=distill",
              *engine_overrides(tmp_path, tiny_world, tiny_teacher_dir)]
    run = subprocess.run([*launch, "--wait"], capture_output=True, text=True, timeout=280)
    job_dirs = list((tmp_path / "jobs" / "demo").iterdir())
    logs = {p.name: p.read_text() for d in job_dirs for p in d.glob("*_log.*")}
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n" + "\n".join(v[-2000:] for v in logs.values())
    assert re.search(r"submitted job \d+", run.stdout) and "tensorboard --logdir" in run.stdout
    err = {name[:-len("_log.err")].split("_")[-1]: text for name, text in logs.items() if name.endswith("_log.err")}
    assert set(err) == {"0", "1"}, sorted(logs)  # one log per rank
    assert "rank 0/2" in err["0"] and "rank 1/2" in err["1"]
    assert _logged_steps(err["0"]) == [1, 2, 3]
    assert list((tmp_path / "runs" / "demo" / "tensorboard").glob("events.*"))
    # submitit submitted exactly the request --dry-run prints (dime_ds/jobs.py)
    asked = _sbatch_flags(next((tmp_path / "jobs" / "demo").glob("*/*_submission.sh")).read_text())
    dry = subprocess.run([*launch, "--dry-run"], capture_output=True, text=True, timeout=120)
    planned = _sbatch_flags(dry.stdout)
    assert planned and {k: asked.get(k) for k in planned} == planned, (asked, planned)

    # The trained run evaluated by a 2-task job: each rank extracts half, rank 0 reports.
    run_dir = tmp_path / "runs" / "demo"
    ev = _launch(tmp_path, "eval", [f"model={run_dir}", "suite=synthetic", f"work_dir={tmp_path}",
                                    f"data.root={tiny_world}", "log.progress=false", "eval.workers=0", "device=cpu"])
    assert ev.returncode == 0, f"{ev.stdout}\n{ev.stderr}"
    report = json.loads((run_dir / "eval" / "synthetic.json").read_text())["results"]
    assert set(report) == {"teacher", "student"}
    assert report["student"]["shape"]["n"] == 32 and report["teacher"]["captions"]["texts"] == 64


@pytest.mark.parametrize("stop", ["preemption", "time_limit"])
def test_stopped_job_is_requeued_and_resumes_exactly(slurm_cluster, tmp_path, tiny_world, tiny_teacher_dir, stop):
    """preemption: SLURM requeues the job (SIGTERM); time_limit: SLURM's warning signal, and rank 0
    requeues the job itself (dime_ds/jobs.py)."""
    steps = 40
    out = tmp_path / "slurm.out"
    sub = subprocess.run(["sbatch", "--parsable", f"--output={out}", *SBATCH_CPU,
                          str(REPO / "slurm" / "distill_vitb32.sh"),
                          *_overrides(tmp_path, tiny_world, tiny_teacher_dir, f"optim.steps={steps}")],
                         capture_output=True, text=True, env=_script_env(), check=True)
    job_id = sub.stdout.strip().split(";")[0]
    deadline = time.time() + 200
    while not (out.is_file() and len(_logged_steps(out.read_text())) >= 3):
        assert time.time() < deadline, out.read_text() if out.is_file() else "no output"
        assert _sacct_state(job_id) not in ("COMPLETED", "FAILED", "CANCELLED"), out.read_text()
        time.sleep(0.2)
    if stop == "preemption":
        subprocess.run(["scontrol", "requeue", job_id], check=True)  # what preemption with requeue does
    else:  # what --signal=USR1@120 sends the tasks before the time limit
        subprocess.run(["scancel", f"--signal={jobs.SIGNAL}", job_id], check=True)
    while _sacct_state(job_id) != "COMPLETED":
        assert time.time() < deadline, f"state {_sacct_state(job_id)}\n{out.read_text()[-4000:]}"
        assert _sacct_state(job_id) not in ("FAILED", "CANCELLED", "NODE_FAIL"), out.read_text()[-4000:]
        time.sleep(1)
    log = out.read_text()
    assert "checkpointing at the next step" in log and "resumed from" in log, log[-4000:]
    assert "(restart 1)" in log
    if stop == "time_limit":  # nothing but rank 0's requeue restarts it
        assert f"requeueing job {job_id}" in log and "scontrol requeue" not in log, log[-4000:]
    logged = _logged_steps(log)
    assert logged == list(range(1, steps + 1)), logged  # no step twice, none skipped
    assert (tmp_path / "runs" / "demo" / "final" / "student.safetensors").is_file()


def _launch(tmp_path: Path, stage: str, overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dime_ds.launch", "--nodes", "1", "--gpus-per-node", "0",
                           "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10",
                           "--job-dir", str(tmp_path / "jobs"), "--wait", f"stage={stage}", *overrides],
                          capture_output=True, text=True, timeout=280)


def test_launch_embed_then_match_through_submitit(slurm_cluster, tmp_path, tiny_world, tiny_teacher_dir):
    overrides = ["experiment=demo", f"work_dir={tmp_path}", f"data.root={tiny_world}",
                 f"teacher.arch=local-dir:{tiny_teacher_dir}", "device=cpu", "log.progress=false", "match.topk=4",
                 "match.block_size=50", "match.shard_size=10", "match.stop_ratio=1.0"]
    for stage in ("embed", "match"):
        run = _launch(tmp_path, stage, overrides)
        logs = "\n".join(p.read_text()[-2000:] for p in sorted((tmp_path / "jobs").rglob("*_log.err")))
        assert run.returncode == 0, f"stage {stage}:\n{run.stdout}\n{run.stderr}\n{logs}"
    assert list((tmp_path / "grounded").rglob("*.tar"))


@pytest.mark.parametrize("stages", ["curate embed match", "embed match curate"])
def test_sbatch_match_corpus_script_curates_and_grounds(slurm_cluster, tmp_path, tiny_world, tiny_teacher_dir,
                                                         stages):
    """STAGES="curate embed match": the pool is curated on 2 tasks, then embedded and grounded;
    "embed match curate": the grounded corpus is curated after match (curate.input=grounded)."""
    from dime_ds.demo.synthetic import COLOUR_NAMES, SHAPES

    meta = tmp_path / "entries.txt"
    meta.write_text("\n".join([*SHAPES, *COLOUR_NAMES]) + "\n")
    out = tmp_path / "slurm-%j.out"
    overrides = [f"work_dir={tmp_path}", f"data.root={tiny_world}", f"teacher.arch=local-dir:{tiny_teacher_dir}",
                 "device=cpu", "log.progress=false", f"curate.metadata={meta}", "curate.t=3", "match.topk=4",
                 "match.stop_ratio=1.0"]
    run = subprocess.run(["sbatch", "--wait", "--parsable", f"--output={out}", *SBATCH_CPU,
                          str(REPO / "slurm" / "match_corpus.sh"), *overrides],
                         capture_output=True, text=True, env=_script_env(STAGES=stages), timeout=280)
    job_id = run.stdout.strip().split(";")[0]
    log = Path(str(out).replace("%j", job_id)).read_text()
    assert run.returncode == 0, f"{run.stderr}\n{log[-4000:]}"
    assert "curating" in log and "curated pool:" in log
    curated = json.loads((tmp_path / "curated" / "curate.json").read_text())
    manifest = json.loads((tmp_path / "embeddings" / "texts" / "manifest.json").read_text())
    sources = {Path(r["source"]).parent for r in manifest["shards"]}
    assert list((tmp_path / "grounded" / "corpus").glob("*.tar"))
    if stages.startswith("curate"):
        assert sources == {Path(curated["corpus"])}
    else:  # the raw pool grounded, then its grounded corpus curated
        assert sources == {tiny_world / "texts"}
        assert (curated["input"], curated["pool"]) == ("grounded", str(tmp_path / "grounded" / "corpus"))
        assert list((tmp_path / "curated" / "corpus").glob("*.tar"))
