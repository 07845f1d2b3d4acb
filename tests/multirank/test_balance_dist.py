"""Semantic balance on 2 gloo ranks (each searching its share of the queries, forests gathered to
rank 0, one union-find) writes the keep list of one rank and of the flat `semantic_balance`, with a
tiny k that queries outgrow (re-searched, then range-searched); with buckets, 2 ranks equal 1."""
from __future__ import annotations

import json

import pytest

from dime_ds.curate import semantic_balance
from dime_ds.data.keep import read_keep_keys
from tests.multirank.harness import run_ranks
from tests.unit.test_balance_stage import cache, overrides  # noqa: F401 - the module fixture


def _balance(rank, world_size, work, embed_dir, world, extra):
    from dime_ds.config import load_config
    from dime_ds.curate.balance_stage import run_semantic_balance

    return run_semantic_balance(load_config(overrides(work, embed_dir, world, "curate.stage=semantic_balance",
                                                      "balance.beta=0.05", f"balance.out_dir={work}/balanced",
                                                      *extra)))["kept"]


@pytest.mark.parametrize("extra", [["balance.k=2", "balance.max_k=3", "balance.block_size=20"],
                                   ["balance.buckets=3", "balance.block_size=16"]])
def test_two_ranks_keep_what_one_rank_keeps(cache, tiny_world, tmp_path, extra):  # noqa: F811
    embed_dir, keys, x = cache
    one = run_ranks(_balance, 1, tmp_path / "one", embed_dir, tiny_world, extra, timeout=120)
    two = run_ranks(_balance, 2, tmp_path / "two", embed_dir, tiny_world, extra, timeout=120)
    assert two[0] == two[1] == one[0]
    kept_one = read_keep_keys(tmp_path / "one/balanced/keep.txt")
    assert read_keep_keys(tmp_path / "two/balanced/keep.txt") == kept_one
    report_one, report_two = (json.loads((tmp_path / w / "balanced/report.json").read_text()) for w in ("one", "two"))
    assert report_two["ranks"] == 2
    for key in ("kept", "groups", "group_sizes", "largest_group"):
        assert report_one[key] == report_two[key], key
    if "balance.buckets=3" not in extra:  # the flat path: exactly the library function
        assert kept_one == [keys[i] for i in semantic_balance(x, 0.05)]
        assert report_two["search"]["researched"] > 0 and report_two["search"]["range_searched"] > 0
