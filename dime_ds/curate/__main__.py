"""`python -m dime_ds.curate stage=metaclip [hydra overrides]`: curate the sentence pool before it is
grounded (MetaCLIP's metadata matching and balancing, on every rank of the job).

    python -m dime_ds.curate stage=metaclip curate.metadata=metadata.json curate.t=20000 data.corpus=/data/pool
    python -m dime_ds.curate stage=metaclip curate.metadata=entries.txt curate.target_size=30000000 ...

Reads data.corpus (else data.texts), writes the curated pool into curate.out_dir/corpus with
report.md/json; `curate.enabled=true` makes the embed and match stages ground it.
`stage=X` is shorthand for `curate.stage=X` (default: metaclip)."""
from __future__ import annotations

import sys
from typing import Sequence

from dime_ds.cli import run_entry
from dime_ds.config import load_config


def main(overrides: Sequence[str]) -> int:
    cfg = load_config([f"curate.{o}" if o.startswith("stage=") else o for o in overrides])
    from dime_ds.curate.stage import run_curate_stage  # after validation: no heavy import for a bad config

    run_curate_stage(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main, usage=__doc__))
