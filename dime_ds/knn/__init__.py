"""Nearest-neighbour search on faiss (exact flat, blocked, IVF; CPU or GPUs), below every stage
that searches embeddings: Algorithm 1's grounding, semantic balance, k-means assignment."""
