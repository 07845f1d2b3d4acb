"""`make demo`'s entry point end to end on a tiny world: world, teacher training, reload as a plain
OpenCLIP model directory, zero-shot table; a second run reuses the cached teacher."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["data.synthetic.n_images=64", "data.synthetic.n_texts=96", "data.synthetic.n_paired=64",
        "data.synthetic.n_eval=16", "data.synthetic.shard_size=32", "data.synthetic.image_size=32",
        "optim.steps=3", "optim.warmup_steps=1", "optim.global_batch_size=16", "data.workers=0",
        "pretrain.optim.steps=3", "pretrain.optim.warmup_steps=1", "pretrain.optim.global_batch_size=16",
        "data.shuffle_buffer=8", "log.progress=false", "cluster.k=2", "balance.beta=1e-4"]


def _demo(work_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dime_ds.demo", f"work_dir={work_dir}", *TINY, *extra],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_demo_end_to_end_then_reuses_teacher(tmp_path):
    first = _demo(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "teacher trained in" in first.stdout
    models = ("teacher (CLIP, paired)", "student DIME-FM (raw pool)", "student DIME-FM (curated pool)",
              "student DIME-FM (curated grounded)",
              "student DIME-FM (balanced images)", "student DIME-FM + CID (balanced)",
              "student DIME-FM (cache K=1, no aug)", "student DIME-FM (cache K=4 views)",
              "student DIME-FM (timm MobileNet)", "student DIME-FM (teacher B)", "student DIME-FM (teachers A+B)",
              "student from scratch (paired)")
    for column in models:
        assert column in first.stdout
    for row in ("zero-shot top-1", "image->text R@1", "linear probe top-1", "image params"):
        assert row in first.stdout
    results = json.loads((tmp_path / "runs" / "demo" / "demo_results.json").read_text())
    assert list(results["eval"]) == list(models)
    assert results["compare"] == ["curation", "balance", "cid", "views", "families", "ensemble"]
    for per_set in results["eval"].values():
        for name in ("shape", "colour"):
            metrics = per_set[name]
            assert metrics["n"] == 16 and 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
        assert per_set["captions"]["images"] == 16 and per_set["captions"]["texts"] == 32
        assert 0.0 <= per_set["shape_probe"]["top1"] <= 1.0
    # MetaCLIP curation beside it: per shape class, sentences in every pool and per-class zero-shot
    assert "MetaCLIP curation" in first.stdout and "grounded corpus (curated pool)" in first.stdout
    coverage = results["curation"]["coverage"]
    assert set(coverage["sizes"]) == {"raw pool", "curated pool", "grounded raw", "grounded curated",
                                      "grounded, then curated"}
    assert coverage["sizes"]["curated pool"] == results["curation"]["report"]["sentences_kept"]
    assert coverage["sizes"]["curated pool"] <= coverage["sizes"]["raw pool"]
    after = results["curation"]["grounded_report"]  # the grounded corpus curated after Algorithm 1
    assert after["input"] == "grounded" and after["pool"] == str(tmp_path / "grounded" / "corpus")
    assert coverage["sizes"]["grounded, then curated"] == after["sentences_kept"] <= coverage["sizes"]["grounded raw"]
    assert "curated_grounded/corpus" in (tmp_path / "runs" / "demo_curated_grounded" / "config.yaml").read_text()
    for per_class in coverage["zero_shot_per_class"].values():
        assert len(per_class) == 8
    # Semantic balance, scored against the world's planted duplicates (13 of the 64 images), and the
    # balanced student trained on the kept images only
    score = results["balance"]["scorecard"]
    assert score["images"] == 64 and score["planted"] == 13 and score["kept"] + score["removed"] == 64
    assert score["kept"] == results["balance"]["report"]["kept"]
    assert score["removed_redundant"] + score["removed_lost"] == score["removed"]
    assert "Semantic balance" in first.stdout and "Planted near-duplicate pairs: 13" in first.stdout
    keep = (tmp_path / "embeddings" / "balanced" / "keep.txt").read_text().split()
    assert len(keep) == score["kept"]
    for run in ("demo_balanced", "demo_cid"):
        assert f"keep: {tmp_path / 'embeddings' / 'balanced'}" in (tmp_path / "runs" / run / "config.yaml").read_text()
    assert results["cid"]["clusters"]["k"] == 2 and results["cid"]["clusters"]["count"] == score["kept"]
    # The teacher cache: K=1 without augmentation, K=4 views with it, each faster than the live teacher
    assert "Teacher cache" in first.stdout
    assert results["views"]["embed"]["images"]["views"] == 4
    # A second student family: a timm tower with BatchNorm, with what a user picks a student by
    assert "Student families" in first.stdout
    family = results["families"]
    for column in ("student DIME-FM (raw pool)", "student DIME-FM (timm MobileNet)"):
        r = family[column]
        assert r["image_params"] > 0 and r["flops_per_image"] > 0 and 0 < r["latency_ms_batch1"]
        assert r["zero_shot_shape"] == results["eval"][column]["shape"]["top1"]
    # A teacher ensemble: teacher B trained from another seed, students of A, of B and of A+B
    assert "Teacher ensemble" in first.stdout
    assert set(results["ensemble"]) == {"A", "B", "A+B"}
    assert results["ensemble"]["A+B"]["shape"] == results["eval"]["student DIME-FM (teachers A+B)"]["shape"]["top1"]
    teacher_b = json.loads((tmp_path / "demo_teacher_b" / "open_clip_config.json").read_text())
    teacher_a = json.loads((tmp_path / "demo_teacher" / "open_clip_config.json").read_text())
    assert teacher_b["dime_ds"]["recipe"] != teacher_a["dime_ds"]["recipe"]  # another seed
    assert "ensemble" in (tmp_path / "runs" / "demo_ensemble" / "config.yaml").read_text()
    saved = json.loads((tmp_path / "runs" / "demo" / "eval" / "synthetic.json").read_text())
    assert saved["results"] == results["eval"]
    for run in ("demo", "demo_curated", "demo_curated_grounded", "demo_balanced", "demo_cid", "demo_cached",
                "demo_views", "demo_mobile", "demo_from_b", "demo_ensemble", "demo_baseline"):
        assert (tmp_path / "runs" / run / "config.yaml").is_file()
        assert (tmp_path / "runs" / run / "final" / "student.safetensors").is_file()
        assert list((tmp_path / "runs" / run / "tensorboard").glob("events.out.tfevents.*"))

    # The teacher directory is a plain OpenCLIP model: loadable with no dime_ds code at all.
    probe = ("import open_clip, sys; m = open_clip.create_model(sys.argv[1]); "
             "assert 'dime_ds' not in sys.modules; print(sum(p.numel() for p in m.parameters()))")
    loaded = subprocess.run([sys.executable, "-c", probe, f"local-dir:{tmp_path / 'demo_teacher'}"],
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and int(loaded.stdout.strip().splitlines()[-1]) > 0, loaded.stderr[-2000:]

    again = _demo(tmp_path, "demo.compare=[]")  # only the DIME-FM student and the yardstick
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher reused" in again.stdout
    assert list(json.loads((tmp_path / "runs" / "demo" / "demo_results.json").read_text())["eval"]) == [
        models[0], models[1], models[-1]]


def test_demo_bad_override_fails_fast_with_the_key(tmp_path):
    run = _demo(tmp_path, "optim.lr=fast")
    assert run.returncode == 2
    assert "optim.lr" in run.stderr
    assert not (tmp_path / "synthetic").exists()  # nothing heavy started
