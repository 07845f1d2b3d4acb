"""Training objectives: what a run optimises, as one object the trainer runs. An objective owns its
data streams, its teacher source and its loss terms, and returns named losses; the trainer
(engine/loop.py) knows none of them. DIME-FM (unpaired images and sentences, a frozen teacher) and
CLIP (paired shards: the demo teacher, the from-scratch baseline) are the two there are."""
from __future__ import annotations

from dime_ds.config.schema import RootConfig
from dime_ds.objectives.base import Objective, RunContext
from dime_ds.objectives.clip import ClipObjective
from dime_ds.objectives.dime import DimeObjective

OBJECTIVES = {"dime": DimeObjective, "clip": ClipObjective}


def build_objective(cfg: RootConfig, ctx: RunContext) -> Objective:
    """The objective `loss.objective` names, given the config sections it reads."""
    return OBJECTIVES[cfg.loss.objective].from_config(cfg, ctx)


__all__ = ["OBJECTIVES", "ClipObjective", "DimeObjective", "Objective", "RunContext", "build_objective"]
