"""The grounding stage: DIME-FM's Algorithm 1 on faiss over the embed stage's caches, the grounded
text corpus it keeps, and its report."""
