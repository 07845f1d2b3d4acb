"""Algorithm 1 over a teacher ensemble: image-sentence pairs scored by the weighted mean of the
teachers' cosine similarities. Each teacher's rows are L2-normalised, scaled by sqrt(w_k) and
concatenated, so that the inner product of two combined rows is sum_k w_k cos_k (weights summing
to 1) and each row has unit norm: the prepared rows Algorithm 1 and faiss already search. The cost is
a float32 copy of every teacher's rows side by side, in memory."""
from __future__ import annotations

import numpy as np

from dime_ds.data.embeddings import EmbeddingCache, EmbeddingCacheError


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3:  # K views per sample: Algorithm 1 reads view 0, the centre view
        x = x[:, 0]
    norm = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return x / np.where(norm > 0, norm, 1.0)


class CombinedCache:
    """Several teachers' caches of the same samples, read as one cache (what the match stage and its
    outputs read of one: rows, shards, keys, manifest and directory of the first)."""

    def __init__(self, caches: list[EmbeddingCache], weights: list[float]):
        if len(caches) != len(weights) or not caches:
            raise ValueError("one weight per cache")
        first = caches[0]
        for cache in caches[1:]:
            if len(cache) != len(first) or cache.keys() != first.keys():
                raise EmbeddingCacheError(
                    f"{cache.directory} ({cache.model}) and {first.directory} ({first.model}) do not hold the same "
                    "samples in the same order: embed the same shards with every teacher (stage=embed)")
        self.caches, self.weights = caches, [float(w) for w in weights]
        self.directory, self.manifest = first.directory, first.manifest
        self.model = " + ".join(f"{w:g}*{c.model}" for c, w in zip(caches, self.weights))
        self.dim = sum(c.dim for c in caches)
        self.views = 1
        self.shards = [self._combine([c.shards[s] for c in caches]) for s in range(len(first.shards))]

    def _combine(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([np.sqrt(w) * _unit(p) for p, w in zip(parts, self.weights)], axis=1).astype(np.float32)

    def __len__(self) -> int:
        return len(self.caches[0])

    def keys(self) -> list[str]:
        return self.caches[0].keys()

    def shard_keys(self):
        return self.caches[0].shard_keys()

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self._combine([c.rows(start, stop) for c in self.caches])
