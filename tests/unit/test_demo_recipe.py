"""The demo teacher's recipe: what retrains the cached teacher and what must not."""
from __future__ import annotations

import dataclasses

from dime_ds.config import load_config
from dime_ds.config.schema import LossConfig
from dime_ds.demo.teacher import recipe_hash, set_values


def test_a_knob_added_with_its_default_leaves_the_recipe_alone():
    defaults = dataclasses.asdict(LossConfig())
    values = {**defaults, "objective": "clip"}
    old_schema = {k: v for k, v in defaults.items() if k != "w_cluster"}  # before the knob existed
    old_values = {k: v for k, v in values.items() if k != "w_cluster"}
    assert set_values(values, defaults) == set_values(old_values, old_schema) == {"objective": "clip"}
    assert set_values({**values, "w_cluster": 0.5}, defaults) == {"objective": "clip", "w_cluster": 0.5}


def test_recipe_changes_with_a_value_that_shapes_the_teacher(tmp_path, tiny_world):
    base = ["experiment=demo_teacher", f"work_dir={tmp_path}", f"data.root={tiny_world}"]
    first = recipe_hash(load_config(base))
    assert recipe_hash(load_config(base)) == first
    assert recipe_hash(load_config([*base, "optim.lr=2e-3"])) != first
    assert recipe_hash(load_config([*base, "loss.t_vl=2.0"])) != first
    assert recipe_hash(load_config([*base, "log.every_n_steps=3"])) == first  # logging shapes nothing


def test_the_students_seed_leaves_the_teacher_alone():
    from dime_ds.demo.teacher import student_overrides, teacher_overrides

    given = ["seed=3", "pretrain.seed=2", "optim.steps=5", "work_dir=/w"]
    assert teacher_overrides(given) == ["seed=2", "work_dir=/w"]
    assert student_overrides(given) == ["seed=3", "optim.steps=5", "work_dir=/w"]
