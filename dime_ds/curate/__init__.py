"""Curation of the pools before grounding. Sentences, MetaCLIP's metadata matching and balancing:
metaclip.py the math (match, keep_probability, t), metadata.py the entry list, matches.py the
per-shard match records, stage.py `python -m dime_ds.curate stage=metaclip`, report.py its report,
pool.py which pool the embed and match stages read. Images, CLIP-CID: semantic.py the semantic
balance (union-find on teacher embeddings), balance_stage.py `stage=semantic_balance` and
balance_report.py its report; cluster_stage.py `stage=cluster` (k-means pseudo-classes, written by
pseudo_labels.py)."""
from dime_ds.curate.semantic import semantic_balance

__all__ = ["semantic_balance"]
