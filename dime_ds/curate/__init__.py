"""Curation of the sentence pool before grounding, MetaCLIP's metadata matching and balancing:
metaclip.py the math (match, keep_probability, t), metadata.py the entry list, matches.py the
per-shard match records, stage.py `python -m dime_ds.curate stage=metaclip`, report.py its report,
pool.py which pool the embed and match stages read."""
