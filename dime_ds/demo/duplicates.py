"""How semantic balance did on the demo world, measured against what the world knows: the
near-duplicates it planted (`data.synthetic.duplicate_fraction`, world.json `duplicates`) and the
scene every image shows. Independent images may draw the same scene too (the world has a few
thousand single-object scenes), so a removed image counts as redundant when a kept image shows its
scene, and as lost when its scene has left the pool."""
from __future__ import annotations

import json
from typing import Iterable

from dime_ds.config.demo_schema import SyntheticConfig
from dime_ds.demo.synthetic import config_values, duplicate_plan, image_key, image_scenes


def _scene_id(scene: dict) -> str:
    return json.dumps(scene, sort_keys=True)


def balance_scorecard(cfg: SyntheticConfig, kept_keys: Iterable[str]) -> dict:
    """Counts for a keep list of the world's unpaired images:
    planted / planted_caught   planted (duplicate, source) pairs, and those not both kept;
    removed_redundant          removed images whose scene a kept image still shows;
    removed_lost               removed images whose scene no kept image shows;
    scenes_before / _after     distinct scenes in the pool before and after."""
    c = config_values(cfg)
    scenes = [_scene_id(s) for s in image_scenes(cfg)]
    kept_set = set(kept_keys)
    kept = [image_key(i) in kept_set for i in range(len(scenes))]
    kept_scenes = {s for s, k in zip(scenes, kept) if k}
    removed = [i for i, k in enumerate(kept) if not k]
    plan = duplicate_plan(c)
    redundant = sum(scenes[i] in kept_scenes for i in removed)
    return {"images": len(scenes), "kept": sum(kept), "removed": len(removed), "planted": len(plan),
            "planted_caught": sum(not (kept[d] and kept[s]) for d, s in plan.items()),
            "removed_redundant": redundant, "removed_lost": len(removed) - redundant,
            "scenes_before": len(set(scenes)), "scenes_after": len(kept_scenes)}
