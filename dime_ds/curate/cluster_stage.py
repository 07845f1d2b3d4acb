"""The cluster stage: `run_cluster_stage(cfg)` (`python -m dime_ds.curate stage=cluster`): CLIP-CID's
pseudo-classes. Spherical k-means (faiss.Kmeans, spherical, `cluster.seed`, `cluster.niter`, on the
GPU when faiss has one) of the teacher's image embeddings (`match.embed_dir/images`, prepared as
everywhere: L2 rows), of the kept images only when `data.keep` is set (the balanced pool); every
image then takes its nearest centre. Written by pseudo_labels.write_pseudo_labels into
`cluster.out_dir`: centroids, labels by image key, a manifest (last).

Scale: k-means trains on a seeded sample of at most TRAIN_PER_CENTRE rows a centre (faiss would
subsample to that anyway); the assignment streams every row in blocks against the centres. The
labels are a function of (embeddings, keep list, k, niter, seed) on one kind of device (tested:
the same seed gives the same labels). Rank 0 does the work; other ranks of a job wait for it."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from dime_ds.curate.balance_stage import open_image_cache, use_gpus
from dime_ds.data.pseudo_labels import write_pseudo_labels
from dime_ds.curate.semantic import spherical_kmeans
from dime_ds.distributed.stage import on_main, stage
from dime_ds.errors import UserError
from dime_ds.knn.search import Rows, flat_index

if TYPE_CHECKING:
    from dime_ds.config.schema import RootConfig

log = logging.getLogger(__name__)

TRAIN_PER_CENTRE = 256  # faiss's max_points_per_centroid
BLOCK = 65536  # rows assigned at once


class ClusterError(UserError, ValueError):
    """A clustering that cannot run (fewer images than clusters)."""


def _pool(cfg: RootConfig, keys: list[str]) -> np.ndarray:
    """Row ids of the images clustered: all, or the kept ones."""
    if not cfg.data.keep:
        return np.arange(len(keys), dtype=np.int64)
    from dime_ds.data.keep import KeepList

    return np.flatnonzero(KeepList(cfg.data.keep).mask(keys)).astype(np.int64)


def cluster_images(rows: Rows, ids: np.ndarray, *, k: int, niter: int, seed: int, ngpu: int = 0,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """(int32 labels of rows `ids`, float32 [k, d] centroids, facts) by seeded spherical k-means."""
    if len(ids) < k:
        raise ClusterError(f"cluster.k={k} exceeds the {len(ids)} images to cluster")
    rng = np.random.default_rng(seed)
    sample = ids if len(ids) <= TRAIN_PER_CENTRE * k else np.sort(rng.choice(ids, TRAIN_PER_CENTRE * k, replace=False))
    log.info("k-means: %d centres, %d iterations, seed %d, trained on %d of %d images%s", k, niter, seed,
             len(sample), len(ids), " (GPU)" if ngpu else "")
    start = time.perf_counter()
    km = spherical_kmeans(rows.take(sample), k, niter=niter, seed=seed, gpu=bool(ngpu), verbose=progress)
    trained = time.perf_counter() - start
    centroids = np.ascontiguousarray(km.centroids, np.float32)
    index = flat_index(centroids, ngpu, 1)
    labels = np.empty(len(ids), np.int32)
    for a in tqdm(range(0, len(ids), BLOCK), desc="cluster: assign", disable=not progress):
        labels[a:a + BLOCK] = index.search(rows.take(ids[a:a + BLOCK]), 1)[1][:, 0]
    objective = float(km.obj[-1]) if len(km.obj) else None
    return labels, centroids, {"trained_on": int(len(sample)), "objective": objective,
                               "train_seconds": round(trained, 3), "seconds": round(time.perf_counter() - start, 3)}


def _cluster(cfg: RootConfig) -> dict:
    c = cfg.cluster
    cache = open_image_cache(cfg)
    keys = cache.keys()
    ids = _pool(cfg, keys)
    labels, centroids, facts = cluster_images(Rows(cache.shards), ids, k=int(c.k), niter=int(c.niter),
                                              seed=int(c.seed), ngpu=use_gpus(cfg), progress=bool(cfg.log.progress))
    sizes = np.bincount(labels, minlength=len(centroids))
    meta = {"seed": int(c.seed), "niter": int(c.niter), "spherical": True, "source": str(cache.directory),
            "model": cache.model, "keep": cfg.data.keep, "images_in_cache": len(keys), **facts,
            "cluster_size_min": int(sizes.min()), "cluster_size_max": int(sizes.max()),
            "empty_clusters": int((sizes == 0).sum())}
    return write_pseudo_labels(c.out_dir, [keys[i] for i in ids.tolist()], labels, centroids, meta)


def run_cluster_stage(cfg: RootConfig) -> dict:
    """Pseudo-classes of the image pool (see the module docstring); the manifest on every rank."""
    with stage(cfg.dist, cfg.device):
        manifest = on_main(_cluster, cfg, what="clustering the image embeddings")
    log.info("cluster: %d images into %d pseudo-classes -> %s", manifest["count"], manifest["k"],
             Path(cfg.cluster.out_dir))
    return manifest
