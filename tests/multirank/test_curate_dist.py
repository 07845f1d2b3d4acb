"""The curation stage on 2 gloo ranks writes exactly the corpus one rank writes (counts summed over
ranks, t bisected on exact integer sums): byte-identical shards, the same t and report counts."""
from __future__ import annotations

import json

import pytest

from tests.multirank.harness import run_ranks
from tests.unit.test_curate_stage import overrides, read_corpus, write_pool


def _curate(rank, world_size, work, pool, meta, extra):
    from dime_ds.config import load_config
    from dime_ds.curate.stage import run_curate_stage

    report = run_curate_stage(load_config(overrides(work, pool, meta, *extra)))
    return report["t"], report["sentences_kept"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return write_pool(tmp_path_factory.mktemp("dist_pool"), shards=(40, 30, 50, 20, 60), seed=1)


@pytest.mark.parametrize("extra", [["curate.t=9", "curate.seed=3"], ["curate.target_size=75"]])
def test_two_ranks_curate_what_one_rank_curates(pool, tmp_path, extra):
    one = run_ranks(_curate, 1, tmp_path / "one", *pool, extra, timeout=120)
    two = run_ranks(_curate, 2, tmp_path / "two", *pool, extra, timeout=120)
    assert two[0] == two[1] == one[0]
    corpus_one, corpus_two = read_corpus(tmp_path / "one/curated"), read_corpus(tmp_path / "two/curated")
    assert corpus_one == corpus_two and len(corpus_one["shards"]) == 5
    report_one = json.loads((tmp_path / "one/curated/report.json").read_text())
    report_two = json.loads((tmp_path / "two/curated/report.json").read_text())
    for key in ("t", "sentences", "sentences_matched", "sentences_kept", "expected_kept", "entries", "matches",
                "largest"):
        assert report_one[key] == report_two[key], key
