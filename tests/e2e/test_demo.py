"""`make demo`'s entry point end to end on a tiny world: world, teacher training, reload as a plain
OpenCLIP model directory, the DIME-FM student and the from-scratch one, the table and its PNG; a
second run reuses the teacher and both students. SIGTERM while a student trains: checkpoint, status
3, the message; a rerun resumes that student and completes."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = ["data.synthetic.n_images=64", "data.synthetic.n_texts=96", "data.synthetic.n_paired=64",
        "data.synthetic.n_eval=16", "data.synthetic.shard_size=32", "data.synthetic.image_size=32",
        "optim.steps=3", "optim.warmup_steps=1", "optim.global_batch_size=16", "data.workers=0",
        "pretrain.optim.steps=3", "pretrain.optim.warmup_steps=1", "pretrain.optim.global_batch_size=16",
        "data.shuffle_buffer=8", "log.progress=false", "eval.every_n_steps=0"]
MODELS = ("teacher (CLIP, paired)", "student DIME-FM (unpaired)", "student from scratch (paired)")
# As a user would start it, not from make (which `make test` is): the demo's messages name `dime-ds demo`.
ENV = {**{k: v for k, v in os.environ.items() if k != "MAKELEVEL"}, "PYTHONUNBUFFERED": "1"}


def _demo(work_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dime_ds.demo", f"work_dir={work_dir}", *TINY, *extra],
                          capture_output=True, text=True, timeout=600, env=ENV)


@pytest.mark.slow
def test_demo_end_to_end_then_reuses_teacher_and_students(tmp_path):
    first = _demo(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "teacher trained in" in first.stdout
    for column in MODELS:
        assert column in first.stdout
    for row in ("zero-shot top-1", "image->text R@1", "linear probe top-1", "image params", "train samples/s"):
        assert row in first.stdout
    assert "DIME-FM on unpaired data against CLIP from scratch on as many pairs: zero-shot shape top-1" in first.stdout
    run = tmp_path / "runs" / "demo"
    results = json.loads((run / "demo_results.json").read_text())
    assert list(results["eval"]) == list(MODELS)
    for per_set in results["eval"].values():
        for name in ("shape", "colour"):
            metrics = per_set[name]
            assert metrics["n"] == 16 and 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
        assert per_set["captions"]["images"] == 16 and per_set["captions"]["texts"] == 32
        assert 0.0 <= per_set["shape_probe"]["top1"] <= 1.0
    assert all(s["status"] == "completed" and s["samples_per_s"] > 0 for s in results["students"].values())
    png = (run / "demo_results.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    saved = json.loads((run / "eval" / "synthetic.json").read_text())
    assert saved["results"] == results["eval"]
    # the teacher, the DIME-FM student and the yardstick: nothing else trains
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith("demo_teacher-")) == [
        "demo", "demo_baseline"]
    for name in ("demo", "demo_baseline"):
        assert (tmp_path / "runs" / name / "config.yaml").is_file()
        assert (tmp_path / "runs" / name / "final" / "student.safetensors").is_file()
        assert list((tmp_path / "runs" / name / "tensorboard").glob("events.out.tfevents.*"))
        assert json.loads((tmp_path / "runs" / name / "demo_run.json").read_text())["status"] == "completed"

    # The teacher directory is a plain OpenCLIP model: loadable with no dime_ds code at all.
    probe = ("import open_clip, sys; m = open_clip.create_model(sys.argv[1]); "
             "assert 'dime_ds' not in sys.modules; print(sum(p.numel() for p in m.parameters()))")
    loaded = subprocess.run([sys.executable, "-c", probe, f"local-dir:{tmp_path / 'demo_teacher'}"],
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and int(loaded.stdout.strip().splitlines()[-1]) > 0, loaded.stderr[-2000:]

    again = _demo(tmp_path)  # everything finished: reused, evaluated again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher reused" in again.stdout
    assert again.stdout.count("finished earlier") == 2 and "training 3 steps" not in again.stdout
    assert json.loads((run / "demo_results.json").read_text())["eval"] == results["eval"]


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> re.Match:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = re.search(pattern, path.read_text() if path.exists() else "")
        if found:
            return found
        assert proc.poll() is None, f"ended ({proc.returncode}) before {pattern!r}:\n{path.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} within {timeout} s")


@pytest.mark.slow
def test_sigterm_checkpoints_the_student_ends_the_demo_and_a_rerun_resumes(tmp_path):
    """What `kill <pid>` (timeout, SLURM, CI cancellation) does: the student in training checkpoints,
    the demo ends with status 3 and says where; it never trains the next student nor evaluates this
    one. The rerun resumes from that step, trains the yardstick and shows the table."""
    steps = ["optim.steps=40", "log.every_n_steps=1"]
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "dime_ds.demo", f"work_dir={tmp_path}", *TINY, *steps],
                                stdout=stdout, stderr=stderr, env=ENV)
        try:
            _wait_for(err, r"step 3/40 ", proc)  # the DIME-FM student is training (the teacher runs 3 steps)
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert status == 3, err.read_text()[-3000:]
    said = re.search(r"stopped at step (\d+) of 40 \(student DIME-FM \(unpaired\), checkpoint in (\S+)\); "
                     r"rerun `dime-ds demo (work_dir=\S+ [^`]*)` to resume", err.read_text())
    assert said, err.read_text()[-3000:]
    stopped_at = int(said.group(1))
    assert said.group(3).split() == [f"work_dir={tmp_path}", *TINY, *steps]  # the rerun it names is this run
    assert 3 <= stopped_at < 40
    runs = tmp_path / "runs"
    assert not (runs / "demo_baseline").exists()  # the next student never started
    assert not (runs / "demo" / "demo_results.json").exists() and "suite synthetic" not in out.read_text()
    assert (runs / "demo" / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    assert json.loads((runs / "demo" / "demo_run.json").read_text())["status"] == "stopped"

    rerun = _demo(tmp_path, *steps)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "student DIME-FM (unpaired): resuming from its latest checkpoint" in rerun.stdout
    assert f"(step {stopped_at})" in rerun.stderr  # resumed there, not from step 0
    assert "teacher reused" in rerun.stdout and "student from scratch (paired): training 40 steps" in rerun.stdout
    results = json.loads((runs / "demo" / "demo_results.json").read_text())
    assert list(results["eval"]) == list(MODELS)
    student = results["students"]["student DIME-FM (unpaired)"]
    assert student["status"] == "completed" and student["step"] == 40 and student["resumed"]


def test_demo_bad_override_fails_fast_with_the_key(tmp_path):
    run = _demo(tmp_path, "optim.lr=fast")
    assert run.returncode == 2
    assert "optim.lr" in run.stderr
    assert not (tmp_path / "synthetic").exists()  # nothing heavy started


def test_demo_sends_comparisons_to_the_study(tmp_path):
    run = _demo(tmp_path, "demo.compare=[views]")
    assert run.returncode == 2 and "`dime-ds study seeds=1 demo.compare=[views]`" in run.stderr
    assert not (tmp_path / "synthetic").exists()
