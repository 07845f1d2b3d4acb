"""Semantic balance (CLIP-CID) against a plain O(n^2) transcription of its definition: rows
L2-normalised, i ~ j when 1 - v_i.v_j < beta, union-find with Python loops, each group keeping
argmin ||v_i - mean(v_C)|| with ties to the lowest index. Also the vectorised union-find against
the loop one, and the kNN completion (tiny k re-searched, range search past max_k)."""
from __future__ import annotations

import numpy as np
import pytest

from dime_ds.curate import semantic_balance
from dime_ds.curate import semantic as S


def clustered(seed: int, n_centres: int = 12, per: int = 15, dim: int = 24, spread: float = 0.08,
              duplicates: int = 10) -> np.ndarray:
    """Groups of jittered copies of random centres, some singletons, and exact duplicate rows (ties)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_centres, dim))
    sizes = rng.integers(1, per, n_centres)
    x = np.concatenate([c + spread * rng.normal(size=(s, dim)) for c, s in zip(centres, sizes)])
    x = np.concatenate([x, rng.normal(size=(20, dim))])
    dup = rng.choice(len(x), duplicates, replace=False)
    x = np.concatenate([x, x[dup]])
    return x[rng.permutation(len(x))].astype(np.float16)  # the cache's dtype


def reference(x: np.ndarray, beta: float) -> list[int]:
    """The definition, transcribed with loops (no shared code beyond the canonical preparation)."""
    v = np.asarray(x, np.float64)
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32).astype(np.float64)
    n = len(v)
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    sim = v @ v.T
    for i in range(n):
        for j in range(i + 1, n):
            if 1.0 - sim[i, j] < beta:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    kept = []
    for members in groups.values():
        mean = v[members].mean(axis=0)
        dist = [float(((v[i] - mean) ** 2).sum()) for i in members]
        best = min(range(len(members)), key=lambda m: (dist[m], members[m]))
        kept.append(members[best])
    return sorted(kept)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("beta", [0.02, 0.1, 0.3])
def test_equals_the_quadratic_union_find(seed, beta):
    x = clustered(seed)
    kept = semantic_balance(x, beta)
    assert kept.dtype == np.int64 and list(kept) == reference(x, beta)
    assert len(kept) < len(x)  # the planted duplicates at least are joined


def test_ties_keep_the_lowest_index():
    rng = np.random.default_rng(5)
    a = rng.normal(size=16)
    # a group of two identical rows and one other: the two are equally near the mean
    x = np.stack([rng.normal(size=16), a, a + 0.0, rng.normal(size=16)]).astype(np.float32)
    assert list(semantic_balance(x, 0.05)) == [0, 1, 3]
    x3 = np.stack([a, a, a]).astype(np.float32)
    assert list(semantic_balance(x3, 0.1)) == [0]


def test_small_k_and_blocks_are_completed_exactly():
    """k=1 and tiny blocks: every query re-searched with doubled k, the rest by range search past
    max_k; no neighbour within beta is lost (same keep list as the wide search)."""
    x = clustered(7, per=40)
    stats: dict = {}
    ids = np.arange(len(x))
    rows = S.Rows(x)
    wide = S.pairs_within(rows, ids, ids, 0.1, k=len(x), max_k=len(x))
    narrow = S.pairs_within(rows, ids, ids, 0.1, k=1, max_k=4, block=16, stats=stats)
    assert stats["researched"] > 0 and stats["range_searched"] > 0
    assert np.array_equal(S.labels_from_forest(len(x), wide), S.labels_from_forest(len(x), narrow))
    assert list(S.nearest_to_centroid(rows, S.labels_from_forest(len(x), narrow), block=7)) == reference(x, 0.1)


def test_vectorised_union_find_equals_loops():
    rng = np.random.default_rng(0)
    n = 500
    i, j = rng.integers(0, n, 400), rng.integers(0, n, 400)
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    assert S.components(n, i, j).tolist() == [find(a) for a in range(n)]
    nodes, roots = S.forest(i, j)
    assert len(nodes) <= n and S.components(n, nodes, roots).tolist() == [find(a) for a in range(n)]


def test_bad_beta():
    with pytest.raises(ValueError, match="beta"):
        semantic_balance(np.ones((3, 4), np.float32), -1.0)
