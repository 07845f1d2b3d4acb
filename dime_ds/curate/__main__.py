"""`python -m dime_ds.curate stage=metaclip|semantic_balance|cluster [hydra overrides]`: curate the pools
(on every rank of the job).

    python -m dime_ds.curate stage=metaclip curate.metadata=metadata.json curate.t=20000 data.corpus=/data/pool
    python -m dime_ds.curate stage=metaclip curate.metadata=entries.txt curate.target_size=30000000 ...

Reads data.corpus (else data.texts), writes the curated pool into curate.out_dir/corpus with
report.md/json; `match.pool=curated` makes the embed and match stages ground it.

    python -m dime_ds.curate stage=semantic_balance match.embed_dir=/data/emb balance.beta=0.1
    python -m dime_ds.curate stage=cluster match.embed_dir=/data/emb data.keep=/data/emb/balanced cluster.k=100000

CLIP-CID's image semantic balance reads the teacher's image embeddings (match.embed_dir/images) and
writes balance.out_dir/keep.txt and a report (`data.keep=<that directory>` trains on the kept
images); the cluster stage writes k-means pseudo-classes of the (kept) images into cluster.out_dir.
`stage=X` is shorthand for `curate.stage=X` (default: metaclip)."""
from __future__ import annotations

import sys
from typing import Sequence

from dime_ds.cli import run_entry
from dime_ds.config import load_config


def main(overrides: Sequence[str]) -> int:
    cfg = load_config([f"curate.{o}" if o.startswith("stage=") else o for o in overrides])
    # after validation: no heavy import for a bad config
    if cfg.curate.stage == "semantic_balance":
        from dime_ds.curate.balance_stage import run_semantic_balance as run
    elif cfg.curate.stage == "cluster":
        from dime_ds.curate.cluster_stage import run_cluster_stage as run
    else:
        from dime_ds.curate.stage import run_curate_stage as run
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main, usage=__doc__))
