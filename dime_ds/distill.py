"""`python -m dime_ds.distill experiment=<name> [overrides]`: DIME-FM distillation (or, with
loss=clip, CLIP training on pairs) on every rank that torchrun, srun or submitit started."""
from __future__ import annotations

import sys
from typing import Sequence

from dime_ds.cli import run_entry
from dime_ds.config import load_config, require
from dime_ds.jobs import STOPPED


def main(overrides: Sequence[str]) -> int:
    cfg = load_config(overrides)
    require(cfg, *(("data.paired",) if cfg.loss.objective == "clip" else ("data.images", "data.texts")))
    from dime_ds.training import run_training  # after validation: no heavy import for a bad config

    summary = run_training(cfg)
    return 0 if summary["status"] == "completed" else STOPPED


if __name__ == "__main__":
    sys.exit(run_entry(main, usage=__doc__))
