"""The match stage (`python -m dime_ds.match`): DIME-FM's Algorithm 1 on faiss over the embed stage's
caches, the grounded text corpus it keeps, and its report. Its entry point also runs the embed stage
before it (`stage=embed|match|all`), in one process group."""
