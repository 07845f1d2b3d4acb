"""data.workers=auto: loader processes from the cores a rank may use; bad values are refused by name."""
from __future__ import annotations

import pytest

from dime_ds.config import ConfigError, load_config
from dime_ds.data import workers
from dime_ds.data.workers import loader_workers


@pytest.mark.parametrize("cores, local_ranks, expected", [(2, 1, 0), (1, 1, 0), (4, 1, 2), (16, 1, 8),
                                                          (64, 1, 8), (16, 8, 0), (96, 8, 8), (40, 4, 8), (32, 8, 2)])
def test_auto_keeps_two_cores_per_rank_for_compute(monkeypatch, cores, local_ranks, expected):
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert loader_workers("auto", local_ranks) == expected


def test_a_count_is_taken_as_given_and_is_the_default_auto():
    assert loader_workers(3) == 3 and loader_workers(0) == 0
    assert load_config(["experiment=demo"]).data.workers == "auto"


@pytest.mark.parametrize("bad", ["autoo", "-1", "two", "true"])
def test_a_bad_value_is_refused_naming_the_key(bad):
    with pytest.raises(ConfigError, match=r"data\.workers=.*auto or a number of loader processes >= 0"):
        load_config(["experiment=demo", f"data.workers={bad}"])
