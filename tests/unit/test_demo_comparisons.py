"""The demo's comparisons: which ones `demo.compare` selects, and the semantic-balance scorecard
against the world's planted duplicates (dime_ds.demo.duplicates) on hand-made keep lists."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from dime_ds.config import ConfigError, load_config
from dime_ds.config.demo_schema import DemoComparison, SyntheticConfig
from dime_ds.demo import synthetic as syn
from dime_ds.demo.comparisons import COMPARISONS, selected
from dime_ds.demo.duplicates import balance_scorecard

WORLD = dict(seed=5, image_size=16, n_images=60, n_texts=40, n_paired=8, n_eval=8, shard_size=20,
             duplicate_fraction=0.25)


def _cfg(**overrides):
    return OmegaConf.structured(SyntheticConfig(**{**WORLD, **overrides}))


def test_selection_keeps_the_registry_order_and_cid_brings_its_balanced_pool():
    assert [c.name for c in selected(["views", "curation"])] == ["curation", "views"]
    assert [c.name for c in selected(["cid"])] == ["balance", "cid"]
    assert selected([]) == []
    assert load_config(["experiment=demo"]).demo.compare == list(COMPARISONS)  # all of them by default
    assert DemoComparison.values() == tuple(COMPARISONS)  # the config's allowed values are the registry's
    for c in COMPARISONS.values():  # every student's experiment exists and is a DIME-FM run
        for s in c.students:
            assert load_config([f"experiment={s.experiment}"]).loss.objective == "dime"


def test_an_unknown_comparison_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"(?s)'cdi', expected one of "
                                          r"\[curation, balance, cid, views, families, ensemble\].*demo\.compare"):
        load_config(["experiment=demo", "demo.compare=[views,cdi]"])


def test_scorecard_counts_caught_pairs_redundant_and_lost_images():
    cfg = _cfg()
    c = syn.config_values(cfg)
    plan = syn.duplicate_plan(c)
    keys = [syn.image_key(i) for i in range(c["n_images"])]
    scenes = [json.dumps(s, sort_keys=True) for s in syn.image_scenes(cfg)]
    assert len(plan) == 15 and all(scenes[d] == scenes[s] for d, s in plan.items())

    everything = balance_scorecard(cfg, keys)
    assert everything == {"images": 60, "kept": 60, "removed": 0, "planted": 15, "planted_caught": 0,
                          "removed_redundant": 0, "removed_lost": 0, "scenes_before": len(set(scenes)),
                          "scenes_after": len(set(scenes))}

    no_copies = balance_scorecard(cfg, [k for i, k in enumerate(keys) if i not in plan])
    assert no_copies["planted_caught"] == 15 and no_copies["removed"] == 15
    assert no_copies["removed_redundant"] == 15 and no_copies["removed_lost"] == 0
    assert no_copies["scenes_after"] == no_copies["scenes_before"]

    # an original nobody copied, with a scene of its own, removed: its scene leaves the pool
    lonely = next(i for i in range(60) if i not in plan and i not in plan.values() and scenes.count(scenes[i]) == 1)
    one_lost = balance_scorecard(cfg, [k for i, k in enumerate(keys) if i != lonely])
    assert (one_lost["removed"], one_lost["removed_lost"], one_lost["planted_caught"]) == (1, 1, 0)
    assert one_lost["scenes_after"] == one_lost["scenes_before"] - 1

    # a source removed while its copy stays still catches the pair, and its scene stays
    dup, src = next(iter(plan.items()))
    swapped = balance_scorecard(cfg, [k for i, k in enumerate(keys) if i != src])
    assert (swapped["planted_caught"], swapped["removed_redundant"], swapped["removed_lost"]) == (
        sum(s == src for s in plan.values()), 1, 0)
