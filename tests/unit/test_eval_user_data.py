"""Evaluation data of the user's own from the command line: `+eval.datasets.NAME.path=DIR` and
`suite=/path/suite.yaml` evaluate an ImageFolder through `python -m dime_ds.eval` and during
distillation; a typo, a missing directory or a missing suite file is a clear error naming it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dime_ds.cli import run_entry
from dime_ds.config import ConfigError, load_config
from dime_ds.eval.__main__ import main as eval_main
from tests.conftest import engine_overrides
from tests.multirank.harness import run_ranks

CLASSES = {"red": ((220, 30, 30), 4), "blue": ((30, 30, 220), 2)}  # class: (colour, images)


@pytest.fixture(scope="module")
def user_imagefolder(tmp_path_factory) -> Path:
    """test/<class>/*.png, two classes of solid colours, unequal counts (so `n` tells the sets apart)."""
    root = tmp_path_factory.mktemp("user_data") / "colours"
    for name, (rgb, count) in CLASSES.items():
        (root / "test" / name).mkdir(parents=True)
        for i in range(count):
            shade = tuple(max(0, c - 10 * i) for c in rgb)
            Image.new("RGB", (32, 32), shade).save(root / "test" / name / f"{i}.png")
    return root


def _eval(tmp_path: Path, model: Path, *overrides: str) -> int:
    return eval_main([f"work_dir={tmp_path}", f"model={model}", f"eval.out_dir={tmp_path / 'report'}",
                      "eval.workers=0", "log.progress=false", *overrides])


def _report(tmp_path: Path, suite: str) -> dict:
    return json.loads((tmp_path / "report" / f"{suite}.json").read_text())["results"]["model"]


def test_dataset_added_on_the_command_line_is_evaluated_beside_the_suite(tmp_path, tiny_teacher_dir, user_imagefolder):
    assert _eval(tmp_path, tiny_teacher_dir, "suite=imagenet", f"+eval.datasets.mine.path={user_imagefolder}") == 0
    results = _report(tmp_path, "imagenet")
    assert set(results) == {"imagenet1k", "mine"} and results["imagenet1k"]["missing"] is True  # no eval.root here
    mine = results["mine"]
    assert mine["task"] == "zeroshot" and mine["n"] == 6 and mine["classes"] == 2 and mine["skipped"] == 0
    assert 0.0 <= mine["top1"] <= 1.0


def test_suite_file_outside_the_package_is_the_suite(tmp_path, tiny_teacher_dir, user_imagefolder):
    suite = tmp_path / "my_suite.yaml"
    suite.write_text(f"datasets:\n  colours: {{path: {user_imagefolder}}}\n"
                     f"  colours_probe: {{path: {user_imagefolder}, task: linear_probe}}\n"
                     f"  absent: {{path: {tmp_path}/not_here}}\n")
    # eval.* overrides still apply to the file's datasets, after it.
    assert _eval(tmp_path, tiny_teacher_dir, f"suite={suite}", "eval.datasets.colours_probe.task=zeroshot") == 0
    results = _report(tmp_path, "my_suite")  # no `suite:` key: named after the file
    assert set(results) == {"colours", "colours_probe", "absent"}
    assert results["colours"]["n"] == 6 and results["colours"]["classes"] == 2
    assert results["colours_probe"]["task"] == "zeroshot"
    assert results["absent"]["missing"] is True  # a suite's dataset may be absent, as in shipped suites


@pytest.mark.parametrize("overrides, words", [
    (["+eval.datasets.mine.pth=/x"], "'pth' is not a key of an evaluation dataset (known: path"),
    (["+eval.datasets.mine.path={missing}"], "eval.datasets.mine.path={missing}: no such file or directory"),
    (["+eval.datasets.mine.task=retrieval"], "add its data with +eval.datasets.mine.path=DIR"),
    (["+eval.datasets.mine.path={data}", "+eval.datasets.mine.task=zero_shot"],
     "eval.datasets.mine.task='zero_shot': Invalid value 'zero_shot', "
     "expected one of [zeroshot, retrieval, linear_probe]"),
    (["suite={missing}.yaml"], "suite={missing}.yaml: no such suite file (shipped suites, by name: elevater"),
    (["eval.suite={tmp}/typo.yaml"], "suite file {tmp}/typo.yaml, key datasets.colours.tsk: Key 'tsk'"),
    (["suite={tmp}/no_path.yaml"], "suite file {tmp}/no_path.yaml: dataset colours has no path"),
])
def test_typos_and_missing_paths_are_named(tmp_path, user_imagefolder, capsys, overrides, words):
    (tmp_path / "typo.yaml").write_text(f"datasets:\n  colours: {{path: {user_imagefolder}, tsk: zeroshot}}\n")
    (tmp_path / "no_path.yaml").write_text("datasets:\n  colours: {task: zeroshot}\n")
    names = dict(missing=tmp_path / "missing", data=user_imagefolder, tmp=tmp_path)
    overrides = [o.format(**names) for o in overrides]
    assert run_entry(eval_main, [f"work_dir={tmp_path}", "model=ViT-B-32", *overrides]) == 2
    err = capsys.readouterr().err
    assert words.format(**names) in err and "Traceback" not in err, err


def test_a_suite_file_is_not_left_behind_for_the_next_config(tmp_path, user_imagefolder):
    suite = tmp_path / "once.yaml"
    suite.write_text(f"suite: once\ndatasets:\n  colours: {{path: {user_imagefolder}}}\n")
    assert load_config([f"eval={suite}"]).eval.suite == "once"
    assert load_config([]).eval.suite == "none" and not load_config([]).eval.datasets  # the default again
    with pytest.raises(ConfigError) as err:
        load_config(["eval=elevatr"])
    assert "_suite_file" not in str(err.value) and "elevater" in str(err.value)


def _train(rank, world_size, overrides):
    from dime_ds.training import run_training

    return run_training(load_config(overrides))


@pytest.mark.slow
def test_periodic_eval_during_distillation_reads_the_users_data(tmp_path, tiny_world, tiny_teacher_dir,
                                                                user_imagefolder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    suite = tmp_path / "suite.yaml"
    suite.write_text(f"suite: mine\ndatasets:\n  from_file: {{path: {user_imagefolder}}}\n")
    overrides = engine_overrides(tmp_path / "work", tiny_world, tiny_teacher_dir, "eval.every_n_steps=3",
                                 f"suite={suite}", f"+eval.datasets.from_cli.path={user_imagefolder}")
    summary = run_ranks(_train, 1, overrides, timeout=300)[0]
    assert summary["status"] == "completed"
    events = EventAccumulator(str(tmp_path / "work" / "runs" / "demo" / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("zeroshot_student/from_file", "zeroshot_student/from_cli", "zeroshot_teacher/from_cli"):
        assert tag in scalars, sorted(scalars)
    assert not any(t.endswith(("/shape", "/colour")) for t in scalars)  # the file replaced the default suite
