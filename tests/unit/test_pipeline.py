"""`python -m dime_ds.pipeline stages=...`: the stage order is checked, and curation before or after
match tells each stage what it needs (what slurm/match_corpus.sh's STAGES runs)."""
from __future__ import annotations

import pytest

from dime_ds.errors import UserError
from dime_ds.pipeline import parse_stages, stage_argv


def _plan(stages: str, *overrides: str) -> list[tuple[str, list[str]]]:
    return stage_argv(*parse_stages([f"stages={stages}", *overrides]))


def test_embed_then_match_by_default_spelling():
    for spelling in ("embed match", "embed,match", "[embed,match]", " embed , match "):
        assert _plan(spelling, "x=1") == [("embed", ["match.stage=embed", "x=1"]),
                                          ("match", ["match.stage=match", "x=1"])]


def test_curate_first_reads_the_curated_pool_everywhere():
    plan = _plan("curate embed match", "curate.t=3")
    assert [name for name, _ in plan] == ["curate", "embed", "match"]
    assert all(args[1:] == ["match.pool=curated", "curate.t=3"] for _, args in plan)
    assert _plan("curate") == [("curate", ["curate.stage=metaclip", "match.pool=curated"])]


def test_curate_after_match_balances_the_grounded_corpus():
    plan = dict(_plan("embed match curate"))
    assert plan["curate"] == ["curate.stage=metaclip", "curate.input=grounded"]
    assert plan["embed"] == ["match.stage=embed"] and plan["match"] == ["match.stage=match"]
    assert dict(_plan("match curate"))["curate"] == ["curate.stage=metaclip", "curate.input=grounded"]


@pytest.mark.parametrize("argv, words", [
    (["stages=embed curate match"], "curate runs first"),
    (["stages=match embed"], "embed runs before match"),
    (["stages=embed embed"], "twice"),
    (["stages=embed distill"], "unknown: distill"),
    (["stages="], "give the stages once"),
    (["x=1"], "give the stages once"),
    (["stages=embed", "stages=match"], "got 2"),
    (["stages=embed", "stage=match"], "stage= runs one stage"),
])
def test_bad_stage_lists_are_user_errors(argv, words):
    with pytest.raises(UserError, match=words):
        parse_stages(argv)
