"""`python -m dime_ds.match stage=embed|match|all [hydra overrides]`: the grounded-corpus stages.

- stage=embed  the teacher (teacher.*) embeds data.images and data.texts into match.embed_dir;
- stage=match  DIME-FM's Algorithm 1 over those caches, grounded corpus + report in match.out_dir;
- stage=all    both, in that order.
`stage=X` is shorthand for the config key `match.stage=X` (default: match)."""
from __future__ import annotations

import sys
from typing import Sequence

from dime_ds.cli import run_entry
from dime_ds.config import load_config


def split_stage(overrides: Sequence[str]) -> list[str]:
    """`stage=X` -> `match.stage=X`; every other override passes through unchanged."""
    return [f"match.{o}" if o.startswith("stage=") else o for o in overrides]


def main(overrides: Sequence[str]) -> int:
    cfg = load_config(split_stage(overrides))
    from dime_ds.distributed.stage import stage  # after validation: no heavy import for a bad config

    with stage(cfg.dist, cfg.device):  # one process group for both stages of stage=all
        if cfg.match.stage in ("embed", "all"):
            from dime_ds.embed.stage import run_embed_stage

            run_embed_stage(cfg)
        if cfg.match.stage in ("match", "all"):
            from dime_ds.match.stage import run_match_stage

            run_match_stage(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main, usage=__doc__))
