"""docs/config.md, the config reference generated from the schema by scripts/config_reference.py:
it is current, it names every key a composed config has, and a field added to the schema without
regenerating the page is caught."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from dime_ds.config import load_config
from dime_ds.config.demo_schema import DemoRootConfig
from dime_ds.config.schema import DataConfig, RootConfig, positive

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "config_reference.py"
PAGE = REPO / "docs" / "config.md"


def _load_script():
    spec = importlib.util.spec_from_file_location("config_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


ref = _load_script()


def _leaves(node: DictConfig, prefix: str = "") -> set[str]:
    """Dotted keys of a composed config, down through schema sections only: a dict-valued field
    (eval.datasets, student.model_cfg) and a list field are one key each."""
    out = set()
    for key in node:
        name = f"{prefix}{key}"
        if not OmegaConf.is_missing(node, key):
            child = node[key]
            if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
                out |= _leaves(child, f"{name}.")
                continue
        out.add(name)
    return out


def test_page_is_the_scripts_output():
    expected = ref.render()
    current = PAGE.read_text() if PAGE.is_file() else None
    problems = ref.stale(current, expected)
    assert not problems, ("docs/config.md is stale: regenerate it with `python scripts/config_reference.py "
                          "--write`\n  - " + "\n  - ".join(problems))


@pytest.mark.parametrize("overrides", [[], ["experiment=demo"]], ids=["default", "demo"])
def test_every_key_of_a_composed_config_is_documented(overrides, tmp_path):
    cfg = load_config([*overrides, f"work_dir={tmp_path}"])
    documented = set(ref.page_rows(ref.render()))
    keys = _leaves(cfg)
    assert {"eval.datasets", "student.model_cfg", "ensemble.teachers", "data.images"} <= keys
    if overrides:
        assert {"data.root", "data.synthetic.head_skew", "demo.compare"} <= keys
    assert keys - documented == set(), "keys the page lacks: regenerate it, or extend the script"


def test_page_shows_interpolations_as_written_and_no_machine_path():
    page = ref.render()
    rows = ref.page_rows(page)
    assert "`${work_dir}/runs/${name}`" in rows["run_dir"]
    assert "`${match.embed_dir}/balanced`" in rows["balance.out_dir"]
    assert str(REPO) not in page and str(Path.home()) not in page
    assert "`zero3`" in rows["teacher.shard"] and "positive_fraction" in rows["loss.cluster_sample_rate"]
    assert "list of `teacher` sections" in rows["ensemble.teachers"]
    assert "eval.datasets.<name>.path" in rows and "eval.probe.reg" in rows


# A schema grown by one field, as someone would add it to DataConfig, and the page not regenerated.
@dataclass
class _GrownData(DataConfig):
    brand_new_knob: int = positive(7)  # a knob added without regenerating the page
    silent_knob: int = 0


@dataclass
class _GrownRoot(RootConfig):
    data: _GrownData = field(default_factory=_GrownData)


def test_a_field_added_to_the_schema_makes_the_page_stale(tmp_path, monkeypatch, capsys):
    current, grown = ref.render(), ref.render(_GrownRoot, DemoRootConfig)
    row = ref.page_rows(grown)["data.brand_new_knob"]
    assert "`7`" in row and "positive (> 0)" in row and "a knob added without regenerating the page" in row
    assert "key not in the page: data.brand_new_knob" in ref.stale(current, grown)
    assert ref.stale(grown, grown) == []

    # The script's --check names it and says how to regenerate.
    page = tmp_path / "config.md"
    page.write_text(current)
    monkeypatch.setattr(ref, "PAGE", page)
    monkeypatch.setattr(ref, "REPO", tmp_path)
    monkeypatch.setattr(ref, "render", lambda *a: grown)
    assert ref.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "data.brand_new_knob" in err and "config_reference.py --write" in err
    assert ref.main(["--write"]) == 0 and page.read_text() == grown
    assert ref.main(["--check"]) == 0


def test_comment_above_a_field_is_its_meaning_and_none_is_a_dash():
    rows = ref.page_rows(ref.render())
    assert "OpenCLIP architecture name" in rows["teacher.arch"]  # the comment block above the field
    assert "fixed logit scale of the cosine similarities" in rows["loss.scale"]  # the trailing comment
    grown = ref.page_rows(ref.render(_GrownRoot, DemoRootConfig))
    assert grown["data.silent_knob"].rstrip(" |").endswith(ref.NONE)  # no comment at all
