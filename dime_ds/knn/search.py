"""Exact (and optionally approximate) inner-product top-k search for Algorithm 1, on faiss.

Canonical preparation. Every embedding is prepared by one function, `prepare`: cast to float64,
optional linear map (text side), L2 normalisation, cast to float32. It is row-wise, so a row prepared
inside a block, on its own, on another node or in the reference implementation has the same bits
(with a map, the float64 product is rounded to float32, which hides BLAS's shape-dependent order).
Cosine similarity is the inner product of prepared rows; the *canonical* score, the one that
decides Algorithm 1, is that inner product accumulated in float64 (see algorithm1.py).

Search. `Searcher` answers "top-k sentences of these images, optionally among the available ones"
with faiss IndexFlatIP (exact). When faiss sees GPUs the index lives there
(`faiss.index_cpu_to_all_gpus`; with several GPUs the text index is *sharded* across them, each
GPU holding a slice of the sentences and faiss merging the per-GPU top-k), otherwise on the CPU.
Texts longer than `block_size` rows are never held whole: each search streams the text in blocks,
searches every block and keeps a running top-k per image with `merge_topk`.

Multi-node plan. A node r holding text blocks B_r computes, for all images,
`partial_topk(img, txt_block, offset, k)` for each of its blocks and merges its own parts with
`merge_topk`; the per-node results (k columns each, global sentence ids) are gathered (files or an
all-gather) and merged once more with `merge_topk`. Because the merge orders by (score desc, id asc)
and keeps k, the result equals one search over the whole corpus. The merged lists are passed to
`algorithm1.ground(..., candidates=(scores, ids))`; the greedy rounds then run on the candidate
lists in one process (they are cheap), and only the rare images whose lists run out are re-queried
(that process streams the text blocks from shared storage, or uses the GPUs it has).

`index="ivf"` (`IVFSearcher`) is approximate: IndexIVFFlat with `nlist` lists, `nprobe` probed per
query; it may miss an image's true best sentence, so its assignment is *not* guaranteed identical to
the exact one (with nprobe == nlist it searches everything and is exact up to float ties).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

GPU_MAX_K = 2048  # faiss GPU k-selection limit; larger k searches on the CPU
_PREP_ROWS = 65536  # rows prepared at a time (bounds the float64 temporaries)


def _faiss():
    import faiss  # imported lazily: the package imports without faiss (dime_ds[cpu] / [gpu] extras)

    return faiss


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return x if isinstance(x, np.ndarray) else np.asarray(x)


def prepare(x, text_map=None) -> np.ndarray:
    """Canonical preparation: float64, `x @ text_map.T` when given, L2 rows, float32. Row-wise: the
    bits of a row never depend on which other rows were prepared with it. A zero row stays zero."""
    x = _as_numpy(x)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [count, dim], got shape {x.shape}")
    out_dim = x.shape[1] if text_map is None else int(np.shape(text_map)[0])
    out = np.empty((x.shape[0], out_dim), dtype=np.float32)
    m = None if text_map is None else np.asarray(_as_numpy(text_map), dtype=np.float64)
    for start in range(0, x.shape[0], _PREP_ROWS):
        chunk = np.asarray(x[start:start + _PREP_ROWS], dtype=np.float64)
        if m is not None:
            chunk = chunk @ m.T
        norm = np.sqrt((chunk * chunk).sum(axis=1, keepdims=True))
        out[start:start + len(chunk)] = chunk / np.where(norm > 0, norm, 1.0)
    return out


class Rows:
    """An embedding source read in row ranges or by row index, prepared on the way: one 2-D array,
    a memory map, or a list of them stacked (the shards of an embedding cache) without copying."""

    def __init__(self, data, text_map=None):
        parts = list(data) if isinstance(data, (list, tuple)) else [data]
        self.parts = [_as_numpy(p) for p in parts]
        if not self.parts:
            raise ValueError("no embeddings")
        dims = {p.shape[1] if p.ndim == 2 else None for p in self.parts}
        if len(dims) != 1 or None in dims:
            raise ValueError(f"embedding parts must be 2-D with one width, got {[p.shape for p in self.parts]}")
        self.in_dim = dims.pop()
        self.text_map = None if text_map is None else np.asarray(_as_numpy(text_map), dtype=np.float64)
        if self.text_map is not None and (self.text_map.ndim != 2 or self.text_map.shape[1] != self.in_dim):
            raise ValueError(f"text_map must be [out_dim, {self.in_dim}], got shape {self.text_map.shape}")
        self.dim = self.in_dim if self.text_map is None else self.text_map.shape[0]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def block(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, len(self))
        pieces = []
        for i, part in enumerate(self.parts):
            lo, hi = max(start, self.starts[i]), min(stop, self.starts[i + 1])
            if lo < hi:
                pieces.append(part[lo - self.starts[i]:hi - self.starts[i]])
        raw = pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else \
            np.empty((0, self.in_dim), np.float32)
        return prepare(raw, self.text_map)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Prepared rows `ids` (any order, repeats allowed); reads each part in ascending order."""
        ids = np.asarray(ids, dtype=np.int64)
        uniq, inverse = np.unique(ids, return_inverse=True)
        raw = np.empty((len(uniq), self.in_dim), dtype=self.parts[0].dtype)
        part = np.searchsorted(self.starts, uniq, side="right") - 1
        for p in np.unique(part):
            sel = part == p
            raw[sel] = self.parts[p][uniq[sel] - self.starts[p]]
        return prepare(raw, self.text_map)[inverse.reshape(-1)]

    def blocks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(self), size):
            yield start, self.block(start, start + size)


def gpu_count(use_gpu: bool | None = None) -> int:
    """GPUs faiss will use: all it sees unless `use_gpu` is False; 0 with faiss-cpu."""
    if use_gpu is False:
        return 0
    faiss = _faiss()
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu and not n:
        raise RuntimeError("use_gpu=True, but faiss sees no GPU (install the dime_ds[gpu] extra)")
    return n


def to_gpus(index, ngpu: int):
    """The CPU index cloned onto all GPUs; several GPUs shard it (each holds a slice of the rows)."""
    faiss = _faiss()
    options = faiss.GpuMultipleClonerOptions()
    options.shard = ngpu > 1
    return faiss.index_cpu_to_all_gpus(index, co=options, ngpu=ngpu)


def flat_index(base: np.ndarray, ngpu: int = 0, k: int = 1):
    """Exact inner-product index over prepared rows `base`, on GPUs when `ngpu` (and k allows)."""
    faiss = _faiss()
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    if ngpu and k <= GPU_MAX_K:
        index = to_gpus(index, ngpu)
    return index


def _clean(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float32).copy()
    ids = np.asarray(ids, dtype=np.int64)
    scores[ids < 0] = -np.inf
    return scores, ids


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-block (or per-node) top-k lists of the same query rows into one top-k.

    `parts`: (scores float32 [m, k_i], ids int64 [m, k_i]) with global ids, -1 for an empty slot.
    Returns (scores, ids) [m, k] (k defaults to the widest part) ordered by score descending, then
    id ascending; empty slots (-1, -inf) last. Merging is associative, so blocks, nodes or both may
    be merged in any grouping."""
    if not parts:
        raise ValueError("merge_topk needs at least one part")
    cleaned = [_clean(s, i) for s, i in parts]
    rows = {s.shape[0] for s, _ in cleaned}
    if len(rows) != 1:
        raise ValueError(f"parts disagree on the number of query rows: {sorted(rows)}")
    k = max(s.shape[1] for s, _ in cleaned) if k is None else int(k)
    scores = np.concatenate([s for s, _ in cleaned], axis=1)
    ids = np.concatenate([i for _, i in cleaned], axis=1)
    # empty slots sort last: score -inf, then id "largest"
    key_ids = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key_ids, -scores.astype(np.float64)), axis=1)[:, :k]
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    if scores.shape[1] < k:  # fewer candidates than k in all parts together: pad
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return scores, ids


def _search_prepared(queries: np.ndarray, base: np.ndarray, k: int, ngpu: int = 0, index=None
                     ) -> tuple[np.ndarray, np.ndarray]:
    if len(base) == 0 or k < 1:
        return (np.full((len(queries), max(k, 0)), -np.inf, np.float32),
                np.full((len(queries), max(k, 0)), -1, np.int64))
    index = index if index is not None else flat_index(base, ngpu, k)
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), int(k))
    return _clean(scores, ids)


def partial_topk(img, txt_block, offset: int, k: int, *, text_map=None, available=None,
                 use_gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of every image among the rows of one text block (raw embeddings; both sides get
    the canonical preparation, `text_map` on the text side). Ids are global: `offset` + block row.
    `available` (bool per block row) restricts the search to those rows. Returns (scores, ids),
    [n_img, k], -1/-inf where the block has fewer than k rows. One call per block per node; the
    parts are combined with `merge_topk`."""
    queries = prepare(img)
    block = prepare(txt_block, text_map)
    rows = np.arange(len(block)) if available is None else np.flatnonzero(np.asarray(available, bool))
    scores, local = _search_prepared(queries, block[rows] if available is not None else block,
                                     min(k, len(rows)), gpu_count(use_gpu))
    ids = np.where(local >= 0, rows[np.clip(local, 0, None)] + int(offset), -1) if len(rows) else local
    return merge_topk([(scores, ids)], k)


class Searcher:
    """Exact top-k over a text source, in one resident index or streamed in blocks."""

    exact = True
    QUERY_CACHE_BYTES = 1 << 31

    def __init__(self, texts: Rows, *, block_size: int | None = None, ngpu: int = 0,
                 query_batch: int = 65536, progress: bool = False):
        self.texts, self.ngpu, self.query_batch, self.progress = texts, ngpu, query_batch, progress
        self.block_size = len(texts) if not block_size or block_size >= len(texts) else int(block_size)
        self._resident = texts.block(0, len(texts)) if self.block_size >= len(texts) else None
        self._index = None  # the resident full index, built on first unmasked search
        self.searches = 0

    def _blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        if self._resident is not None:
            yield 0, self._resident
        else:
            yield from self.texts.blocks(self.block_size)

    def search(self, images: Rows, image_ids: np.ndarray, k: int, available: np.ndarray | None = None,
               desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, global sentence ids) of images `image_ids`, among `available` sentences
        (bool per sentence) when given. Rows ordered by score desc, id asc; -1/-inf pad."""
        self.searches += 1
        image_ids = np.asarray(image_ids, dtype=np.int64)
        best_s = np.full((len(image_ids), k), -np.inf, np.float32)
        best_i = np.full((len(image_ids), k), -1, np.int64)
        n_blocks = -(-len(self.texts) // self.block_size)
        bar = tqdm(total=n_blocks * -(-len(image_ids) // self.query_batch), desc=desc or "search",
                   disable=not (self.progress and desc), leave=False)
        # queries prepared once when they fit in a modest buffer, else per batch and block
        prepared = images.take(image_ids) if len(image_ids) * images.dim * 4 <= self.QUERY_CACHE_BYTES else None
        for offset, block in self._blocks():
            if available is None:
                rows = None
                if self._resident is not None and k <= GPU_MAX_K:
                    if self._index is None:
                        self._index = flat_index(block, self.ngpu, k)
                    index = self._index
                else:
                    index = flat_index(block, self.ngpu, k)
                base_n = len(block)
            else:
                rows = np.flatnonzero(available[offset:offset + len(block)])
                index = flat_index(block[rows], self.ngpu, k) if len(rows) else None
                base_n = len(rows)
            for q in range(0, len(image_ids), self.query_batch):
                sel = image_ids[q:q + self.query_batch]
                if base_n:
                    queries = prepared[q:q + len(sel)] if prepared is not None else images.take(sel)
                    s, i = _search_index(index, queries, min(k, base_n))
                    i = np.where(i >= 0, (i if rows is None else rows[np.clip(i, 0, None)]) + offset, -1)
                    best_s[q:q + len(sel)], best_i[q:q + len(sel)] = merge_topk(
                        [(best_s[q:q + len(sel)], best_i[q:q + len(sel)]), (s, i)], k)
                bar.update()
        bar.close()
        return best_s, best_i


def _search_index(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), int(k))
    return _clean(scores, ids)


class IVFSearcher:
    """Approximate top-k: IndexIVFFlat (inner product) over all texts; `nprobe` lists per query.
    Not guaranteed identical to the exact assignment (documented as approximate)."""

    exact = False

    def __init__(self, texts: Rows, *, nlist: int = 4096, nprobe: int = 32, block_size: int | None = None,
                 ngpu: int = 0, query_batch: int = 65536, progress: bool = False, seed: int = 0):
        faiss = _faiss()
        self.texts, self.query_batch, self.progress = texts, query_batch, progress
        n = len(texts)
        self.nlist = max(1, min(int(nlist), n // 39 or 1))  # faiss wants >= 39 training points a list
        self.nprobe = max(1, min(int(nprobe), self.nlist))
        quantizer = faiss.IndexFlatIP(texts.dim)
        self.cpu_index = faiss.IndexIVFFlat(quantizer, texts.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, self.nlist * 256), replace=False))
        self.cpu_index.train(texts.take(sample))
        size = int(block_size) if block_size else n
        for _, block in tqdm(texts.blocks(size), desc="ivf add", total=-(-n // size), disable=not progress,
                             leave=False):
            self.cpu_index.add(block)
        self.cpu_index.nprobe = self.nprobe
        self._quantizer = quantizer  # the IVF index does not own it from Python
        self.index = to_gpus(self.cpu_index, ngpu) if ngpu else self.cpu_index
        if ngpu:
            _faiss().GpuParameterSpace().set_index_parameter(self.index, "nprobe", self.nprobe)
        self.searches = 0

    def search(self, images: Rows, image_ids: np.ndarray, k: int, available: np.ndarray | None = None,
               desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        self.searches += 1
        image_ids = np.asarray(image_ids, dtype=np.int64)
        params, keep = None, None
        if available is not None:  # ID selectors run on the CPU index
            keep = np.packbits(np.asarray(available, bool), bitorder="little")
            params = faiss.SearchParametersIVF(sel=faiss.IDSelectorBitmap(len(available), faiss.swig_ptr(keep)),
                                               nprobe=self.nprobe)
        out_s = np.full((len(image_ids), k), -np.inf, np.float32)
        out_i = np.full((len(image_ids), k), -1, np.int64)
        index = self.index if params is None and k <= GPU_MAX_K else self.cpu_index
        for q in tqdm(range(0, len(image_ids), self.query_batch), desc=desc or "ivf search",
                      disable=not (self.progress and desc), leave=False):
            sel = image_ids[q:q + self.query_batch]
            queries = np.ascontiguousarray(images.take(sel))
            s, i = index.search(queries, int(k), params=params) if params is not None else index.search(queries, int(k))
            out_s[q:q + len(sel)], out_i[q:q + len(sel)] = merge_topk([_clean(s, i)], k)
        del keep
        return out_s, out_i
