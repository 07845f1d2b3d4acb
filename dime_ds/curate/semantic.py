"""CLIP-CID's image semantic balance, the math: images whose teacher embeddings lie within cosine
distance beta are joined into groups (union-find), and each group keeps only the image nearest to
its centroid.

Canonical numbers. Rows are prepared as Algorithm 1 prepares them (`ground.search.prepare`: float64,
L2 rows, float32). i ~ j when `1 - v_i . v_j < beta`, the dot product of the prepared rows taken in
float64. faiss (float32) only proposes candidate pairs, with a slack of CANDIDATE_SLACK below the
threshold; every candidate is then decided by that float64 rule, so the groups do not depend on
faiss's rounding, on blocks, ranks or GPUs. A group C keeps argmin_i ||v_i - mean(v_C)|| (float64),
ties to the lowest index.

Completeness. A query asks faiss for its k nearest rows of a base block; when its k-th is still a
candidate, it is asked again with 2k, up to `max_k` (faiss's GPU cap is 2048); a query still
incomplete there is finished by an exact CPU range search. No neighbour within beta is ever cut
off, so the flat path (every query against every base row) is exact. `buckets` > 0 searches only
within spherical k-means buckets, as SemDeDup does: a pair split over two buckets is missed, so that
path is approximate.

Union-find, vectorised: every edge hooks the larger of its two roots under the smaller
(`np.minimum.at`), then the parent array is compressed by pointer jumping until it is flat; rounds
repeat until no edge joins two roots. A node's label is the smallest index of its group. Each block
of candidate edges is reduced at once to a star forest (node -> its group's smallest node), so what
a rank holds and sends is at most one pair per node it touched, never the quadratic edges of a big
group.

Memory per 10^8 images (d = 768): the fp16 cache is 154 GB on disk, memory-mapped, never loaded
whole; a rank holds one base block and one query block (2 x block_size x d x 4 B = 0.4 GB at 65536)
and its forest (<= 16 B a touched node: <= 1.6 GB); rank 0 holds the gathered forests (16 B a pair:
~0.7 GB at CLIP-CID's 44 % removed), the parent array and its compression temporaries (3 x 8 B a
node: 2.4 GB) and, for the keep choice, the group sums of a chunk of groups (<= block_size / 2 x d x
8 B = 0.2 GB). About 6 GB on rank 0 and 2 GB elsewhere. Buckets add 4 B a node for the assignment
(8 B while it is all-reduced) and, on rank 0, the bucket k-means' training sample (<= 2^21 rows:
6.4 GB at d = 768).

Cost. Flat: n^2 d multiply-adds. Bucketed with B buckets of n / B rows: the search n^2 d / B, the
assignment n B d, the bucket k-means 20 x min(256 B, 2^21) x B x d; B ~ sqrt(n) balances the first
two (SemDeDup used 50 000 buckets for LAION-440M).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from dime_ds.knn.search import GPU_MAX_K, Rows, to_gpus, flat_index

CANDIDATE_SLACK = 1e-4  # faiss's float32 inner products err by far less; candidates are re-decided in float64
Pairs = tuple[np.ndarray, np.ndarray]  # (nodes, the smallest node of their group), int64


def _empty_pairs() -> Pairs:
    return np.empty(0, np.int64), np.empty(0, np.int64)


# ---- union-find -------------------------------------------------------------------------------------

def _flatten(parent: np.ndarray) -> np.ndarray:
    """Pointer jumping until every node points at its root (parent[x] <= x, so no cycles)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """int64[n]: each node's label, the smallest node of its connected component under edges (i, j)."""
    parent = np.arange(n, dtype=np.int64)
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    while len(i):
        ri, rj = parent[i], parent[j]
        joins = ri != rj
        if not joins.any():
            break
        i, j, ri, rj = i[joins], j[joins], ri[joins], rj[joins]
        np.minimum.at(parent, np.maximum(ri, rj), np.minimum(ri, rj))
        parent = _flatten(parent)
    return parent


def forest(i: np.ndarray, j: np.ndarray) -> Pairs:
    """The edges (i, j) reduced to one pair (node, smallest node of its group) per non-root node:
    the same groups, at most one pair a node."""
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    if not len(i):
        return _empty_pairs()
    nodes, local = np.unique(np.concatenate([i, j]), return_inverse=True)
    labels = nodes[components(len(nodes), local[:len(i)], local[len(i):])]
    moved = labels != nodes
    return nodes[moved], labels[moved]


def merge_forests(parts: Iterable[Pairs]) -> Pairs:
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return _empty_pairs()
    return forest(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def labels_from_forest(n: int, pairs: Pairs) -> np.ndarray:
    return components(n, *pairs)


# ---- the image each group keeps ---------------------------------------------------------------------

def _group_chunks(sizes: np.ndarray, block: int) -> Iterator[tuple[int, int]]:
    """(first, stop) group ranges of about `block` rows each (a bigger group alone)."""
    ends = np.cumsum(sizes)
    first = 0
    while first < len(sizes):
        before = ends[first - 1] if first else 0
        stop = max(first + 1, int(np.searchsorted(ends, before + block, side="right")))
        yield first, stop
        first = stop


def nearest_to_centroid(rows: Rows, labels: np.ndarray, block: int = 65536, progress: bool = False) -> np.ndarray:
    """Sorted kept indices: every singleton, and per larger group argmin_i ||v_i - mean(v_C)||
    (float64 on the prepared rows; ties: the lowest index). Groups are read a chunk at a time, a
    group bigger than `block` in row blocks over two passes (sums, then distances)."""
    n = len(labels)
    sizes_by_label = np.bincount(labels, minlength=n)
    members = np.flatnonzero(sizes_by_label[labels] > 1)  # ascending
    if not len(members):
        return np.arange(n, dtype=np.int64)
    members = members[np.argsort(labels[members], kind="stable")]  # by group, then index
    starts = np.flatnonzero(np.r_[True, labels[members][1:] != labels[members][:-1]])
    sizes = np.diff(np.r_[starts, len(members)])
    row_of_group = np.r_[starts, len(members)]
    kept = [np.flatnonzero(sizes_by_label[labels] == 1)]
    for g0, g1 in tqdm(list(_group_chunks(sizes, block)), desc="balance: keep", disable=not progress, leave=False):
        lo, hi = int(row_of_group[g0]), int(row_of_group[g1])
        group = np.repeat(np.arange(g1 - g0), sizes[g0:g1])  # chunk-local group of each chunk row
        sums = np.zeros((g1 - g0, rows.dim), np.float64)
        for a in range(lo, hi, block):
            b = min(a + block, hi)
            v = rows.take(members[a:b]).astype(np.float64)
            g = group[a - lo:b - lo]
            cuts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
            sums[g[cuts]] += np.add.reduceat(v, cuts, axis=0)
        means = sums / sizes[g0:g1, None]
        best_d = np.full(g1 - g0, np.inf)
        best_i = np.zeros(g1 - g0, np.int64)
        for a in range(lo, hi, block):
            b = min(a + block, hi)
            idx, g = members[a:b], group[a - lo:b - lo]
            d = ((rows.take(idx).astype(np.float64) - means[g]) ** 2).sum(axis=1)
            order = np.lexsort((idx, d, g))  # per group: nearest first, then lowest index
            first = order[np.r_[True, g[order][1:] != g[order][:-1]]]
            gf = g[first]
            better = (d[first] < best_d[gf]) | ((d[first] == best_d[gf]) & (idx[first] < best_i[gf]))
            best_d[gf[better]], best_i[gf[better]] = d[first][better], idx[first][better]
        kept.append(best_i)
    return np.sort(np.concatenate(kept))


# ---- candidate pairs --------------------------------------------------------------------------------

def _joined(q64: np.ndarray, b64: np.ndarray, qi: np.ndarray, bj: np.ndarray, beta: float) -> np.ndarray:
    """The canonical rule on candidate pairs: 1 - v_i . v_j < beta, the dot in float64."""
    return 1.0 - np.einsum("ij,ij->i", q64[qi], b64[bj]) < beta


class _BaseIndex:
    """One base block: a CPU IndexFlatIP (range search), cloned to the GPUs for kNN when there are."""

    def __init__(self, base: np.ndarray, ngpu: int):
        import faiss

        self.cpu = faiss.IndexFlatIP(base.shape[1])
        self.cpu.add(np.ascontiguousarray(base, np.float32))
        self.gpu = to_gpus(self.cpu, ngpu) if ngpu else None
        self.n = len(base)

    def knn(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.gpu if self.gpu is not None and k <= GPU_MAX_K else self.cpu
        return index.search(np.ascontiguousarray(q, np.float32), int(k))

    def range(self, q: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        """(query row, base row) of every base row with inner product > radius (exact, CPU)."""
        lims, _, ids = self.cpu.range_search(np.ascontiguousarray(q, np.float32), float(radius))
        return np.repeat(np.arange(len(q)), np.diff(lims.astype(np.int64))), ids.astype(np.int64)


def candidates(index: _BaseIndex, q: np.ndarray, beta: float, k: int, max_k: int, stats: dict | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(query row, base row) of every base row whose float32 similarity to a query reaches
    1 - beta - CANDIDATE_SLACK: kNN with k, doubled for the queries whose k-th neighbour is still a
    candidate, up to max_k, then a range search for any left (see the module docstring)."""
    radius = 1.0 - beta - CANDIDATE_SLACK
    out_q, out_b = [], []
    todo = np.arange(len(q))
    k = max(1, min(int(k), int(max_k), index.n))
    while len(todo):
        s, ids = index.knn(q[todo], k)
        hit = (s >= radius) & (ids >= 0)
        full = hit[:, -1] & (k < index.n)  # the k-th is a candidate: there may be more
        done = ~full
        rr, cc = np.nonzero(hit & done[:, None])
        out_q.append(todo[rr]), out_b.append(ids[rr, cc])
        todo = todo[full]
        if not len(todo):
            break
        if stats is not None:
            stats["researched"] = stats.get("researched", 0) + len(todo)
        if k >= max_k:
            rr, bb = index.range(q[todo], radius)
            if stats is not None:
                stats["range_searched"] = stats.get("range_searched", 0) + len(todo)
            out_q.append(todo[rr]), out_b.append(bb)
            break
        k = min(2 * k, max_k, index.n)
    return np.concatenate(out_q).astype(np.int64), np.concatenate(out_b).astype(np.int64)


def pairs_within(rows: Rows, query_ids: np.ndarray, base_ids: np.ndarray, beta: float, *, k: int = 64,
                 max_k: int = GPU_MAX_K, block: int = 65536, ngpu: int = 0, stats: dict | None = None,
                 progress: bool = False, desc: str = "balance: search") -> Pairs:
    """The forest of every joined pair (query, base), global row ids; blocks of `block` rows on
    both sides, each block's edges reduced to a forest at once."""
    query_ids, base_ids = np.asarray(query_ids, np.int64), np.asarray(base_ids, np.int64)
    if max_k < 1 or k < 1:
        raise ValueError(f"k={k} and max_k={max_k} must be >= 1")
    parts: list[Pairs] = []
    n_pairs = 0
    q_blocks = [query_ids[a:a + block] for a in range(0, len(query_ids), block)]
    cached = [rows.take(ids) for ids in q_blocks] if len(query_ids) * rows.dim * 4 <= 1 << 31 else None
    bar = tqdm(total=len(q_blocks) * -(-len(base_ids) // block), desc=desc, disable=not progress, leave=False)
    for a in range(0, len(base_ids), block):
        b_ids = base_ids[a:a + block]
        base = rows.take(b_ids)
        index = _BaseIndex(base, ngpu)
        b64 = base.astype(np.float64)
        for qb, q_ids in enumerate(q_blocks):
            q = cached[qb] if cached is not None else rows.take(q_ids)
            qi, bj = candidates(index, q, beta, k, max_k, stats)
            gi, gj = q_ids[qi], b_ids[bj]
            keep = (gi != gj) & _joined(q.astype(np.float64), b64, qi, bj, beta)
            n_pairs += int(keep.sum())
            parts.append(forest(gi[keep], gj[keep]))
            bar.update()
        if len(parts) > 64:  # bound what accumulates: forests merge into one
            parts = [merge_forests(parts)]
    bar.close()
    if stats is not None:
        stats["joined_pairs"] = stats.get("joined_pairs", 0) + n_pairs
    return merge_forests(parts)


def bucket_of(rows: Rows, centroids: np.ndarray, start: int = 0, stop: int | None = None, block: int = 65536,
              ngpu: int = 0) -> np.ndarray:
    """int32 per row of [start, stop): its nearest (inner product) bucket centroid."""
    stop = len(rows) if stop is None else stop
    index = flat_index(np.ascontiguousarray(centroids, np.float32), ngpu, 1)
    out = np.empty(stop - start, np.int32)
    for a in range(start, stop, block):
        x = rows.block(a, min(a + block, stop))
        out[a - start:a - start + len(x)] = index.search(x, 1)[1][:, 0]
    return out


BUCKET_TRAIN_PER_CENTRE = 256  # faiss's max_points_per_centroid
BUCKET_TRAIN_MAX = 1 << 21  # training rows at most (6.4 GB at d = 768): 10^5 buckets still get ~20 each


def train_buckets(rows: Rows, buckets: int, seed: int, ngpu: int = 0) -> np.ndarray:
    """SemDeDup-style bucket centroids: spherical k-means (20 iterations) on a seeded sample of
    <= 256 rows a bucket and <= BUCKET_TRAIN_MAX rows in all."""
    n = len(rows)
    size = min(n, BUCKET_TRAIN_PER_CENTRE * buckets, BUCKET_TRAIN_MAX)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    return spherical_kmeans(rows.take(sample), min(buckets, len(sample)), niter=20, seed=seed, gpu=bool(ngpu)).centroids


def pairs_in_buckets(rows: Rows, bucket: np.ndarray, n_buckets: int, mine: Iterable[int], beta: float, *,
                     stats: dict | None = None, progress: bool = False, **knobs) -> Pairs:
    """The forest of the joined pairs inside each bucket of `mine` (`bucket`: every row's bucket)."""
    order = np.argsort(bucket, kind="stable")  # ascending rows within a bucket
    bounds = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
    parts = []
    for b in tqdm(list(mine), desc="balance: buckets", disable=not progress):
        ids = order[bounds[b]:bounds[b + 1]]
        if len(ids) > 1:
            parts.append(pairs_within(rows, ids, ids, beta, stats=stats, **knobs))
    if stats is not None:
        stats["bucket_sizes_max"] = int(np.diff(bounds).max()) if n_buckets else 0
    return merge_forests(parts)


def spherical_kmeans(x: np.ndarray, k: int, *, niter: int, seed: int, gpu: bool = False, verbose: bool = False):
    """faiss.Kmeans on prepared rows, spherical (centroids renormalised), seeded; the trained object."""
    import faiss

    km = faiss.Kmeans(x.shape[1], int(k), niter=int(niter), seed=int(seed), spherical=True, gpu=bool(gpu),
                      verbose=bool(verbose))
    km.train(np.ascontiguousarray(x, np.float32))
    return km


def semantic_balance(embeddings, beta: float, *, k: int = 64, max_k: int = GPU_MAX_K, block: int = 65536,
                     ngpu: int = 0, progress: bool = False) -> np.ndarray:
    """Sorted indices kept of the [n, d] `embeddings`: rows L2-normalised; i and j are joined when
    1 - v_i . v_j < beta; connected components (union-find); each keeps argmin_i ||v_i - mean(v_C)||,
    ties to the lowest index. Exact (flat search of every pair, float64 decisions)."""
    rows = Rows(embeddings)
    if not 0 <= beta <= 2:
        raise ValueError(f"beta={beta} must lie in [0, 2] (a cosine distance)")
    ids = np.arange(len(rows), dtype=np.int64)
    pairs = pairs_within(rows, ids, ids, beta, k=k, max_k=max_k, block=block, ngpu=ngpu, progress=progress)
    return nearest_to_centroid(rows, labels_from_forest(len(rows), pairs), block, progress)


__all__ = ["semantic_balance", "components", "forest", "merge_forests", "nearest_to_centroid", "pairs_within",
           "candidates", "bucket_of", "train_buckets", "pairs_in_buckets", "spherical_kmeans"]
