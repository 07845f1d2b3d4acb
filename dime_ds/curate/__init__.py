"""Curation of the sentence pool before grounding: MetaCLIP's metadata matching and balancing
(metaclip.py: the math; metadata.py: the entry list; stage.py: `python -m dime_ds.curate stage=metaclip`)."""
