"""The semantic-balance stage: `run_semantic_balance(cfg)` (`python -m dime_ds.curate
stage=semantic_balance`) reads the embed stage's image cache (`match.embed_dir/images`) and writes
into `balance.out_dir`:

- `report.json`, `report.md`, `component_sizes.png`, `removed_groups.png` (balance_report.py);
- `keep.txt`  the kept image keys, one a line, in cache row order, written last (atomically): a
              directory with a keep.txt is complete. `data.keep=<balance.out_dir>` makes the
              training image stream honour it.

Ranks (semantic.py has the math): without buckets rank r of R searches the query rows
[r*n/R, (r+1)*n/R) against every row, in blocks; with `balance.buckets`, rank 0 trains the bucket
k-means, every rank assigns its share of the rows to buckets (one all-reduce completes the
assignment) and searches the buckets b with b % R == r within themselves. Each rank reduces
its joined pairs to a forest (one pair a touched node); rank 0 gathers the forests, runs the
union-find once, picks each group's image nearest its centroid and writes the outputs. The keep
list is the same for every world size (tested: 2 ranks against one, and against the flat path)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from dime_ds.curate import semantic as S
from dime_ds.data.embeddings import EmbeddingCache, EmbeddingCacheError
from dime_ds.data.keep import KEEP_FILE, write_keep_list
from dime_ds.distributed import collectives as C
from dime_ds.distributed.stage import StageContext, agreed, gather_to_main, on_main, stage
from dime_ds.knn.search import Rows, gpu_count

if TYPE_CHECKING:
    from dime_ds.config.schema import BalanceConfig, RootConfig

log = logging.getLogger(__name__)


def open_image_cache(cfg: RootConfig) -> EmbeddingCache:
    """The teacher's image embeddings the embed stage wrote, with a message saying how to get them."""
    directory = Path(cfg.match.embed_dir) / "images"
    try:
        cache = EmbeddingCache(directory)
    except EmbeddingCacheError as err:
        raise EmbeddingCacheError(f"match.embed_dir={cfg.match.embed_dir}: {err}\nRun `python -m dime_ds.match "
                                  "stage=embed` (same overrides) first: this stage reads the teacher's image "
                                  "embeddings.") from None
    if cache.manifest["modality"] != "images":
        raise EmbeddingCacheError(f"{directory} holds {cache.manifest['modality']} embeddings, not images")
    return cache


def use_gpus(cfg: RootConfig) -> int:
    return gpu_count(False if cfg.device == "cpu" else None)


def _share(ctx: StageContext, n: int) -> tuple[int, int]:
    return ctx.rank * n // ctx.world_size, (ctx.rank + 1) * n // ctx.world_size


def _assign_buckets(ctx: StageContext, rows: Rows, centroids: np.ndarray, c: BalanceConfig, ngpu: int) -> np.ndarray:
    """Every row's bucket: each rank assigns its share, one all-reduce (int32, n x 4 B) completes it."""
    lo, hi = _share(ctx, len(rows))
    part = np.zeros(len(rows), np.int32)
    part[lo:hi] = agreed(S.bucket_of, rows, centroids, lo, hi, c.block_size, ngpu, what="assigning the buckets")
    return C.all_reduce_sum(torch.from_numpy(part)).numpy() if ctx.world_size > 1 else part


def _rank_pairs(ctx: StageContext, rows: Rows, c: BalanceConfig, bucket: np.ndarray | None, n_buckets: int,
                ngpu: int, progress: bool) -> tuple[S.Pairs, dict]:
    n, r, world = len(rows), ctx.rank, ctx.world_size
    stats: dict = {}
    knobs = dict(k=c.k, max_k=c.max_k, block=c.block_size, ngpu=ngpu, stats=stats)
    if bucket is None:
        mine = np.arange(*_share(ctx, n), dtype=np.int64)
        return S.pairs_within(rows, mine, np.arange(n, dtype=np.int64), c.beta, progress=progress, **knobs), stats
    return S.pairs_in_buckets(rows, bucket, n_buckets, range(r, n_buckets, world), c.beta, progress=progress,
                              **knobs), stats


def _prepare(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / KEEP_FILE).unlink(missing_ok=True)  # incomplete until the new keep list lands


def _finish(cfg: RootConfig, cache: EmbeddingCache, rows: Rows, gathered: list, seconds: float, world: int) -> dict:
    from dime_ds.curate.balance_report import build_report, write_report

    c, out = cfg.balance, Path(cfg.balance.out_dir)
    pairs = S.merge_forests(p for p, _ in gathered)
    labels = S.labels_from_forest(len(rows), pairs)
    kept = S.nearest_to_centroid(rows, labels, c.block_size, progress=bool(cfg.log.progress))
    stats: dict = {}
    for _, s in gathered:
        for name, value in s.items():
            stats[name] = max(stats.get(name, 0), value) if name.endswith("_max") else stats.get(name, 0) + value
    report = build_report(cfg, cache, labels, kept, stats, seconds=seconds, world=world)
    write_report(out, report, cfg, cache, labels, kept)
    write_keep_list(out / KEEP_FILE, _kept_keys(cache, kept))  # last: the run is complete
    return report


def _kept_keys(cache: EmbeddingCache, kept: np.ndarray) -> Iterator[str]:
    """The kept keys in row order, one shard's keys in memory at a time (10^8 keys would take ~10 GB)."""
    is_kept = np.zeros(len(cache), bool)
    is_kept[kept] = True
    for start, keys in cache.shard_keys():
        for row in np.flatnonzero(is_kept[start:start + len(keys)]).tolist():
            yield keys[row]


def run_semantic_balance(cfg: RootConfig) -> dict:
    """Semantic balance of the image pool on every rank of the job (see the module docstring).
    Returns rank 0's report on every rank."""
    c, out = cfg.balance, Path(cfg.balance.out_dir)
    start = time.perf_counter()
    with stage(cfg.dist, cfg.device) as ctx:
        progress = bool(cfg.log.progress) and ctx.is_main
        cache = agreed(open_image_cache, cfg, what="opening the image embedding cache")
        rows = Rows(cache.shards)
        ngpu = agreed(use_gpus, cfg, what="looking for GPUs")
        if ctx.is_main:
            log.info("semantic balance of %d images (%s, %d-d) on %d rank(s): beta=%g, k=%d (max %d), %s, %d GPU(s)",
                     len(rows), cache.model, rows.dim, ctx.world_size, c.beta, c.k, c.max_k,
                     f"{c.buckets} k-means buckets" if c.buckets else "flat search", ngpu)
        on_main(_prepare, out, what="preparing the output directory")
        bucket, n_buckets = None, 0
        if c.buckets:
            centroids = on_main(S.train_buckets, rows, c.buckets, c.seed, ngpu, what="training the buckets")
            bucket, n_buckets = _assign_buckets(ctx, rows, centroids, c, ngpu), len(centroids)
        part = agreed(_rank_pairs, ctx, rows, c, bucket, n_buckets, ngpu, progress, what="searching for joined pairs")
        gathered = gather_to_main(part)
        report = on_main(_finish, cfg, cache, rows, gathered, time.perf_counter() - start, ctx.world_size,
                         what="choosing the kept images and writing the report")
    if ctx.is_main:
        log.info("semantic balance: %d of %d images kept (%.1f %% removed) -> %s", report["kept"], report["images"],
                 100 * report["removed_share"], out / KEEP_FILE)
    return report
