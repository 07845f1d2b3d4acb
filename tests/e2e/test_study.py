"""`make study` end to end on a tiny world: two seeds per student, one comparison (balance) beside
the demo's models; mean ± sd cells, the paired differences, its files."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.e2e.test_demo import ENV, TINY

MODELS = ["teacher (CLIP, paired)", "student DIME-FM (unpaired)", "student DIME-FM (balanced images)",
          "student from scratch (paired)"]


def _study(work_dir, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dime_ds.demo.study", f"work_dir={work_dir}", *TINY,
                           "balance.beta=1e-4", *extra], capture_output=True, text=True, timeout=600, env=ENV)


@pytest.mark.slow
def test_study_over_two_seeds_reports_mean_and_sd(tmp_path):
    run = _study(tmp_path, "seeds=2", "demo.compare=[balance]")
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "study"
    record = json.loads((out / "study.json").read_text())
    assert record["seeds"] == 2 and record["compare"] == ["balance"]
    assert list(record["results"]) == MODELS
    assert len(record["results"][MODELS[0]]) == 1  # the teacher once
    for model in MODELS[1:]:
        assert len(record["results"][model]) == 2 and len(record["samples_per_s"][model]) == 2
        assert [s["run_dir"] for s in record["students"][model]] == [
            str(tmp_path / "runs" / f"study-{exp}-seed{k}") for exp in [
                {"student DIME-FM (unpaired)": "demo", "student DIME-FM (balanced images)": "demo_balanced",
                 "student from scratch (paired)": "demo_baseline"}[model]] for k in (0, 1)]
    for k in (0, 1):  # each seed is its own run, trained with that seed
        config = (tmp_path / "runs" / f"study-demo-seed{k}" / "config.yaml").read_text()
        assert re.search(rf"^seed: {k}$", config, re.M)
    assert record["balance"]["scorecard"]["images"] == 64

    md = (out / "study.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| metric (%)"))
    assert header == "| metric (%) | " + " | ".join(MODELS) + " |"
    shape = next(line for line in md.splitlines() if line.startswith("| shape zero-shot top-1"))
    cells = [c.strip() for c in shape.strip("|").split("|")][1:]
    assert re.fullmatch(r"\d+\.\d", cells[0])  # the teacher: one value
    assert all(re.fullmatch(r"\d+\.\d ± \d+\.\d", c) for c in cells[1:])  # students: mean ± sd over 2 seeds
    assert "| student from scratch (paired) |" in md and "paired by seed" in md
    assert "Semantic balance" in md and "![study](study.png)" in md
    assert (out / "study.png").read_bytes().startswith(b"\x89PNG")
    assert "make study: 2 seeds (0-1) per student" in run.stdout and " ± " in run.stdout


def test_study_refuses_a_bad_seed_count_before_any_work(tmp_path):
    for bad in ("seeds=0", "seeds=three"):
        run = _study(tmp_path, bad)
        assert run.returncode == 2 and "seeds" in run.stderr
    assert not (tmp_path / "synthetic").exists()
