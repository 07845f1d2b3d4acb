"""Pseudo-classes of the image pool (CLIP-CID's cluster discrimination): written by the cluster
stage, read by distillation. One directory (`cluster.out_dir`, beside the embedding cache) holds
- `centroids.npy`  float32 [k, dim], L2-normalised k-means centres of the teacher's image embeddings;
- `labels.npz`     `keys` (unicode array, never object) and `labels` (int32), one row per image;
- `manifest.json`  {"format_version", "k", "dim", "count", ...the stage's own fields (seed, niter, source)};
every file written under a temporary name and renamed, the manifest last: a directory with a manifest
is complete. Labels are looked up by image key, so live and cached teachers read the same files."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dime_ds import atomic
from dime_ds.data.key_index import KeyIndex
from dime_ds.errors import UserError

FORMAT_VERSION = 1
MANIFEST, CENTROIDS, LABELS = "manifest.json", "centroids.npy", "labels.npz"
UNLABELLED = -1  # lookup() of a key the stage never saw (e.g. an image added after clustering)


class PseudoLabelError(UserError, ValueError):
    """A pseudo-label directory that is missing, incomplete, or inconsistent."""


def write_pseudo_labels(out_dir: str | os.PathLike, keys: Sequence[str], labels: np.ndarray,
                        centroids: np.ndarray, meta: Mapping | None = None) -> dict:
    """Write the three files atomically (manifest last); returns the manifest."""
    out = Path(out_dir)
    keys = np.asarray([str(k) for k in keys], dtype=str)
    labels = np.asarray(labels)
    centroids = np.asarray(centroids, dtype=np.float32)
    if centroids.ndim != 2:
        raise ValueError(f"centroids must be [k, dim], got shape {centroids.shape}")
    if labels.shape != (len(keys),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {len(keys)} integers, one per key, got {labels.dtype} {labels.shape}")
    if len(np.unique(keys)) != len(keys):
        raise ValueError("duplicate image keys")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(centroids)):
        raise ValueError(f"labels outside [0, {len(centroids)})")
    centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete until the new manifest lands

    npz = io.BytesIO()
    np.savez(npz, keys=keys, labels=labels.astype(np.int32))
    atomic.write_bytes(out / CENTROIDS, lambda f: np.save(f, centroids, allow_pickle=False))
    atomic.write_bytes(out / LABELS, npz.getvalue())
    manifest = {"format_version": FORMAT_VERSION, "k": int(len(centroids)), "dim": int(centroids.shape[1]),
                "count": int(len(keys)), **dict(meta or {})}
    atomic.write_json(out / MANIFEST, manifest, indent=2)
    return manifest


class PseudoLabels:
    """The cluster stage's output, read back: `centroids` [k, dim] float32, `lookup(keys)`."""

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        if not (self.dir / MANIFEST).is_file():
            raise PseudoLabelError(f"{self.dir}: no complete pseudo-labels (no {MANIFEST}); run "
                                   f"`python -m dime_ds.curate stage=cluster` first")
        self.manifest = json.loads((self.dir / MANIFEST).read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise PseudoLabelError(f"{self.dir}: pseudo-label format {self.manifest.get('format_version')}, "
                                   f"this dime_ds reads {FORMAT_VERSION}")
        self.centroids = np.load(self.dir / CENTROIDS, allow_pickle=False)
        with np.load(self.dir / LABELS, allow_pickle=False) as z:
            keys, labels = z["keys"], z["labels"]
        if self.centroids.shape != (self.manifest["k"], self.manifest["dim"]) or len(keys) != self.manifest["count"]:
            raise PseudoLabelError(f"{self.dir}: files do not match {MANIFEST} (k={self.manifest['k']}, "
                                   f"dim={self.manifest['dim']}, count={self.manifest['count']})")
        key_list = keys.tolist()
        self._index = KeyIndex(lambda: [key_list])  # compact: 16 B a key, not a dict's ~150
        self._labels = np.append(labels.astype(np.int64), UNLABELLED)  # row -1: a key never seen

    def __reduce__(self):
        return type(self), (self.dir,)  # re-indexed in the receiving process (salted str hash)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """int64 labels in the order of `keys`; UNLABELLED for a key the stage never saw."""
        return self._labels[self._index.rows(list(keys))]
