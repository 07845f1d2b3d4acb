"""`make study`'s arithmetic (dime_ds/demo/study.py, dime_ds/demo/summary.py): the seeds argument,
results averaged over seeds, mean ± sd cells, differences paired by seed, the PNG."""
from __future__ import annotations

import pytest

from dime_ds.config import ConfigError
from dime_ds.demo.study import differences, mean_results, parse_seeds
from dime_ds.demo.summary import bar_chart, cell, markdown, rows


def _result(shape: float, i2t: float = 0.5) -> dict:
    return {"shape": {"top1": shape, "per_class": [shape, 1.0], "task": "zeroshot"},
            "colour": {"top1": 1.0}, "captions": {"image_to_text_R@1": i2t, "text_to_image_R@1": i2t},
            "shape_probe": {"top1": shape}}


def test_seeds_is_the_studys_own_argument():
    assert parse_seeds(["seeds=2", "optim.steps=5"]) == (2, ["optim.steps=5"])
    assert parse_seeds(["seed=4"]) == (3, ["seed=4"])  # the default count; seed= is Hydra's
    for bad in (["seeds=0"], ["seeds=two"]):
        with pytest.raises(ConfigError, match="seeds"):
            parse_seeds(bad)


def test_results_average_leaf_by_leaf():
    mean = mean_results([_result(0.25), _result(0.75)])
    assert mean["shape"] == {"top1": 0.5, "per_class": [0.5, 1.0], "task": "zeroshot"}
    assert mean_results([_result(0.25)]) == _result(0.25)


def test_cells_and_paired_differences():
    assert cell([0.5]) == "50.0"
    assert cell([0.4, 0.6]) == "50.0 ± 14.1"  # sample sd
    assert cell([100.0, 300.0], 1.0, 0) == "200 ± 141"
    results = {"teacher": [_result(0.9)], "dime": [_result(0.4), _result(0.6)],
               "scratch": [_result(0.1), _result(0.4)]}
    table = rows(results, {"teacher": [300.0], "dime": [400.0, 420.0]})
    assert table[0] == ["shape zero-shot top-1", "90.0", "50.0 ± 14.1", "25.0 ± 21.2"]
    assert table[-1] == ["train samples/s", "300", "410 ± 14", "-"]
    diff = differences(results, "dime", ["dime", "scratch"])
    assert diff == [["scratch", "-25.0 ± 7.1", "0.0 ± 0.0", "0.0 ± 0.0", "0.0 ± 0.0", "-25.0 ± 7.1"]]
    assert markdown(["a", "b"], [["x", "1"]]) == "| a | b |\n|---|--:|\n| x | 1 |\n"


def test_the_chart_is_a_png(tmp_path):
    results = {"teacher": [_result(0.9)], "dime": [_result(0.4), _result(0.6)]}
    path = bar_chart(tmp_path / "sub" / "chart.png", results, {"teacher": [300.0], "dime": [400.0, 420.0]},
                     "title", notes=["a note"])
    assert path.read_bytes().startswith(b"\x89PNG") and not list(path.parent.glob("*.tmp*"))
