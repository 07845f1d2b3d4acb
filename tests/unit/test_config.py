"""Config: composition of the shipped experiments, and errors that name the key before any work."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from dime_ds.config import ConfigError, load_config, save_config


def test_paper_experiment_has_the_published_setting():
    cfg = load_config(["experiment=vitb32_from_vitl14"])
    assert (cfg.teacher.arch, cfg.teacher.pretrained) == ("ViT-L-14", "openai")
    assert cfg.student.arch == "ViT-B-32" and cfg.student.text == "teacher"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.schedule) == ("adamw", 8e-4, 0.05, "cosine")
    assert cfg.optim.warmup_steps > 0
    assert (cfg.loss.w_vl, cfg.loss.w_pvl, cfg.loss.w_ud) == (0.7, 0.3, 0.0)
    assert (cfg.loss.t_vl, cfg.loss.t_pvl, cfg.loss.t_ud, cfg.loss.scale) == (1.0, 3.0, 7.0, 100.0)


def test_demo_experiment_resolves_paths_under_work_dir(tmp_path):
    cfg = load_config(["experiment=demo", f"work_dir={tmp_path}"])
    assert cfg.teacher.arch == f"local-dir:{tmp_path}/demo_teacher"
    assert cfg.data.images == f"{tmp_path}/synthetic/images"
    assert cfg.student.model_cfg.embed_dim != 128  # narrower than the demo teacher: a projection is needed
    assert OmegaConf.is_readonly(cfg)


def test_relative_work_dir_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(["work_dir=rel"]).work_dir == str(tmp_path / "rel")


@pytest.mark.parametrize("override, key", [
    ("optim.lr=fast", "optim.lr"),
    ("optim.steps=1.5", "optim.steps"),
    ("+teacher.shrad=zero3", "teacher.shrad"),
    ("teacher.shrad=zero3", "teacher.shrad"),
    ("teacher.shard=zero4", "teacher.shard"),
    ("loss.t_pvl=0", "loss.t_pvl"),
    ("match.stop_ratio=1.5", "match.stop_ratio"),
    ("student.text=both", "student.text"),
])
def test_bad_values_and_unknown_keys_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([override])


@pytest.mark.parametrize("overrides, words", [
    (["teacher.source=cache"], "teacher.cache_dir"),
    (["teacher.source=cache", "teacher.cache_dir=/x", "teacher.shard=zero3"], "contradicts"),
    (["optim.steps=10", "optim.warmup_steps=20"], "optim.warmup_steps"),
    (["loss.w_vl=0", "loss.w_pvl=0"], "switched off"),
    (["optim.global_batch_size=10", "optim.grad_accum=3"], "divisible"),
    (["loss=clip"], "student.text=own"),
])
def test_contradictory_settings_are_refused(overrides, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(overrides)


def test_unknown_key_in_a_yaml_file_is_refused(tmp_path, monkeypatch):
    import shutil

    from dime_ds.config import config_dir

    configs = tmp_path / "configs"
    shutil.copytree(config_dir(), configs)
    (configs / "experiment" / "typo.yaml").write_text("# @package _global_\noptim:\n  learning_rate: 1.0\n")
    monkeypatch.setenv("DIME_DS_CONFIG_DIR", str(configs))
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(["experiment=typo"])


def test_saved_config_is_resolved_and_reloads_identically(tmp_path):
    cfg = load_config(["experiment=demo", f"work_dir={tmp_path}"])
    path = save_config(cfg, tmp_path / "run")
    text = path.read_text()
    assert "${" not in text
    assert OmegaConf.to_container(OmegaConf.load(path)) == OmegaConf.to_container(cfg, resolve=True)


def test_stage_requirements_are_reported_before_any_work(capsys):
    from dime_ds.cli import run_entry
    from dime_ds.distill import main as distill_main

    # The paper's experiment leaves the data to the user: a message, exit 2, no traceback.
    assert run_entry(distill_main, ["experiment=vitb32_from_vitl14"]) == 2
    err = capsys.readouterr().err
    assert "data.images=<value>" in err and "data.texts=<value>" in err and "Traceback" not in err


def test_missing_shards_are_a_user_error():
    from dime_ds.data.shards import list_shards
    from dime_ds.errors import UserError

    with pytest.raises(UserError, match="no shards match"):
        list_shards("/nowhere/shard-*.tar")


def test_no_yaml_restates_a_schema_default():
    """Each default lives in the schema alone: a YAML value equal to the schema's default for its key
    is a second copy that drifts (an experiment that changes it says so, with a different value)."""
    import yaml

    from dime_ds.config import config_dir
    from dime_ds.config.demo_schema import DemoRootConfig

    schema = OmegaConf.structured(DemoRootConfig)  # the library's keys and the demo's
    restated = []
    for path in sorted(config_dir().rglob("*.yaml")):
        text = path.read_text()
        group = path.parent.name if path.parent != config_dir() else None
        prefix = "" if group in (None, "experiment") or text.startswith("# @package _global_") else f"{group}."

        def walk(node, keys):
            if isinstance(node, dict):
                for k, v in node.items():
                    if k != "defaults":
                        walk(v, [*keys, str(k)])
                return
            key = prefix + ".".join(keys)
            default = OmegaConf.select(schema, key, throw_on_missing=False, default="<no default>")
            if OmegaConf.is_config(default):
                default = OmegaConf.to_container(default)
            if _same(node, default):
                restated.append(f"{path.relative_to(config_dir())}: {key}={node!r}")

        walk(yaml.safe_load(text) or {}, [])
    assert not restated, "YAML values equal to the schema's defaults:\n" + "\n".join(restated)


def _same(value, default) -> bool:
    if isinstance(value, str) and isinstance(default, float):
        try:
            value = float(value)  # YAML 1.1 reads 8e-4 as a string; OmegaConf as a float
        except ValueError:
            return False
    return value == default


def test_allowed_values_are_enum_fields_and_range_checks_sit_on_the_fields():
    """A value outside a field's enum is refused while composing, naming the key and the choices; a
    range rule is the field's own metadata, applied wherever the field is."""
    with pytest.raises(ConfigError, match=r"(?s)'grounde', expected one of \[pool, grounded\].*curate\.input"):
        load_config(["curate.input=grounde"])
    with pytest.raises(ConfigError, match=r"eval\.probe\.val_fraction=1\.5 must lie in \[0, 1\]"):
        load_config(["eval.probe.val_fraction=1.5"])
    cfg = load_config(["teacher.shard=zero3"])
    assert cfg.teacher.shard == "zero3" and f"{cfg.teacher.shard}" == "zero3"  # a member reads as its string
    assert "shard: zero3" in OmegaConf.to_yaml(cfg)


def test_the_library_config_carries_no_demo_section():
    cfg = load_config([])
    assert "demo" not in cfg and "root" not in cfg.data and "synthetic" not in cfg.data
    assert not cfg.eval.datasets  # no suite until one is picked
    demo = load_config(["experiment=demo"])
    assert demo.demo.compare and demo.data.synthetic.head_skew > 0 and demo.eval.suite == "synthetic"
