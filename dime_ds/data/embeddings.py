"""The teacher-embedding cache: written by the embed stage, read by distillation (teacher.source=cache).

One modality directory (e.g. `<embed_dir>/images/`) holds, per input shard `name`:
- `{name}.npy`       float16 [count, dim], raw (unnormalised) embeddings unless the manifest says
                     `normalized`; a plain .npy, never pickled, always read with allow_pickle=False;
- `{name}.keys.txt`  the sample keys, one a line, in row order;
and `manifest.json`: {"format_version", "modality", "model", "dim", "dtype": "float16", "normalized",
"count", "shards": [{"name", "source", "source_sha256", "count", and for a damaged source "partial":
true, "damaged": {"reason", "samples"}}], "skipped": [{"key", "source",
"reason"}]}. Every file is written under a temporary name and renamed; the manifest is written last
and only after its shards are checked, so a directory with a manifest is a complete cache.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from dime_ds.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPE = "float16"
_FIELDS = ("format_version", "modality", "model", "dim", "dtype", "normalized", "count", "shards", "skipped")


class EmbeddingCacheError(UserError, ValueError):
    """A cache directory that is incomplete, or whose files do not match its manifest."""


def atomic_write(path: Path, write) -> None:
    """`write(binary_file)` into a temporary name, fsync, rename: readers never see a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name.startswith(".") or name == Path(MANIFEST).stem:
        raise ValueError(f"invalid embedding shard name {name!r}")
    return name


def write_embedding_shard(directory: str | os.PathLike, name: str, keys: Sequence[str], array: Any,
                          source: str, source_sha256: str) -> dict:
    """Write `{name}.npy` (float16) and `{name}.keys.txt` atomically; returns the manifest's shard
    record {"name", "source", "source_sha256", "count"}."""
    directory = Path(directory)
    _check_name(name)
    array = np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array)
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(f"shard {name}: embeddings must be [count, dim], got shape {array.shape}")
    if len(keys) != array.shape[0]:
        raise ValueError(f"shard {name}: {len(keys)} keys for {array.shape[0]} embeddings")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"shard {name}: embeddings must be floating point, got {array.dtype}")
    with np.errstate(over="ignore"):  # reported just below, naming the shard
        half = array.astype(DTYPE)
    if not np.isfinite(half).all():
        raise ValueError(f"shard {name}: non-finite embeddings (or values beyond float16's range)")
    keys = [str(k) for k in keys]
    bad = [k for k in keys if not k or "\n" in k or "\r" in k]
    if bad:
        raise ValueError(f"shard {name}: invalid keys (empty or with a line break): {bad[:3]!r}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"shard {name}: duplicate keys")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / f"{name}.npy", lambda f: np.save(f, np.ascontiguousarray(half), allow_pickle=False))
    atomic_write(directory / f"{name}.keys.txt", lambda f: f.write("".join(k + "\n" for k in keys).encode("utf-8")))
    return {"name": name, "source": str(source), "source_sha256": source_sha256, "count": len(keys)}


def _load_shard(directory: Path, record: Mapping[str, Any], dim: int | None) -> np.ndarray:
    path = directory / f"{record['name']}.npy"
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise EmbeddingCacheError(f"embedding cache {directory}: shard file {path.name} of the manifest is missing") from None
    except ValueError as err:  # object arrays need pickle, which is never allowed
        raise EmbeddingCacheError(f"embedding cache {directory}: {path.name} is not a plain array: {err}") from None
    if array.dtype != np.dtype(DTYPE) or array.ndim != 2 or array.shape[0] != record["count"] \
            or (dim is not None and array.shape[1] != dim):
        raise EmbeddingCacheError(
            f"embedding cache {directory}: {path.name} holds {array.dtype} {tuple(array.shape)}, the manifest says "
            f"{DTYPE} ({record['count']}, {dim if dim is not None else 'dim'})")
    return array


def _read_keys(directory: Path, record: Mapping[str, Any]) -> list[str]:
    path = directory / f"{record['name']}.keys.txt"
    try:
        keys = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EmbeddingCacheError(f"embedding cache {directory}: key file {path.name} of the manifest is missing") from None
    if len(keys) != record["count"]:
        raise EmbeddingCacheError(f"embedding cache {directory}: {path.name} has {len(keys)} keys, the manifest "
                                  f"says {record['count']}")
    return keys


def write_manifest(directory: str | os.PathLike, *, modality: str, model: str, shards: Sequence[Mapping[str, Any]],
                   normalized: bool = False, skipped: Iterable[Mapping[str, Any]] = ()) -> dict:
    """Check the shards' files against `shards` (records from write_embedding_shard, in order), then
    write manifest.json atomically. Returns the manifest."""
    directory = Path(directory)
    if not shards:
        raise ValueError(f"embedding cache {directory}: no shards to write a manifest for")
    names = [_check_name(r["name"]) for r in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"embedding cache {directory}: shard names repeat")
    dim = None
    for record in shards:
        dim = _load_shard(directory, record, dim).shape[1]
        _read_keys(directory, record)
    manifest = {
        "format_version": FORMAT_VERSION, "modality": modality, "model": str(model), "dim": int(dim),
        "dtype": DTYPE, "normalized": bool(normalized), "count": int(sum(r["count"] for r in shards)),
        "shards": [{"name": r["name"], "source": str(r["source"]), "source_sha256": r["source_sha256"],
                    "count": int(r["count"]),
                    # a damaged source: embedded as far as readable, redone by the next embed run
                    **({"partial": True, "damaged": dict(r["damaged"])} if r.get("partial") else {})}
                   for r in shards],
        "skipped": [{"key": s["key"], "source": s["source"], "reason": s["reason"]} for s in skipped],
    }
    atomic_write(directory / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode("utf-8")))
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EmbeddingCacheError(f"embedding cache {directory} has no {MANIFEST}: it was never written or is "
                                  "incomplete (the manifest is written last)") from None
    except json.JSONDecodeError as err:
        raise EmbeddingCacheError(f"embedding cache {directory}: {MANIFEST} is not valid JSON: {err}") from None
    missing = [f for f in _FIELDS if f not in manifest]
    if missing:
        raise EmbeddingCacheError(f"embedding cache {directory}: {MANIFEST} lacks {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise EmbeddingCacheError(f"embedding cache {directory}: format_version {manifest['format_version']!r}, "
                                  f"this code reads {FORMAT_VERSION}")
    if manifest["dtype"] != DTYPE:
        raise EmbeddingCacheError(f"embedding cache {directory}: dtype {manifest['dtype']!r}, expected {DTYPE}")
    if manifest["count"] != sum(r["count"] for r in manifest["shards"]):
        raise EmbeddingCacheError(f"embedding cache {directory}: count {manifest['count']} is not the sum of "
                                  "its shards' counts")
    return manifest


class EmbeddingShardWriter:
    """Writes one modality directory: `write_shard(...)` per input shard, `skip(...)` per sample the
    embed stage could not use, `close()` writes the manifest. Opening removes a stale manifest, so
    a directory being rewritten never reads as complete; leaving on an exception writes none."""

    def __init__(self, directory: str | os.PathLike, *, modality: str, model: str, normalized: bool = False):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / MANIFEST).unlink(missing_ok=True)
        self.modality, self.model, self.normalized = modality, model, normalized
        self.shards: list[dict] = []
        self.skipped: list[dict] = []
        self.manifest: dict | None = None

    def write_shard(self, name: str, keys: Sequence[str], array: Any, source: str, source_sha256: str) -> dict:
        if self.manifest is not None:
            raise RuntimeError("EmbeddingShardWriter is closed")
        record = write_embedding_shard(self.directory, name, keys, array, source, source_sha256)
        self.shards.append(record)
        return record

    def skip(self, key: str, source: str, reason: str) -> None:
        self.skipped.append({"key": key, "source": source, "reason": reason})

    def close(self) -> dict:
        if self.manifest is None:
            self.manifest = write_manifest(self.directory, modality=self.modality, model=self.model,
                                           shards=self.shards, normalized=self.normalized, skipped=self.skipped)
        return self.manifest

    def __enter__(self) -> "EmbeddingShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


class EmbeddingCache:
    """Memory-mapped embeddings of one modality directory, looked up by sample key.

    The key -> row index is compact (sorted 64-bit key hashes and their global rows, 16 bytes a key,
    where a dict of strings takes ~150), so tens of millions of keys fit in every rank. Two cached
    keys with one hash are found at build and kept in a small side table; a repeated key is an error.
    (A key *absent* from the cache whose hash equals a cached key's, odds ~len/2**64 a lookup, would
    not be reported missing.)"""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.dim = int(self.manifest["dim"])
        self.model = self.manifest["model"]
        self.normalized = bool(self.manifest["normalized"])
        self.shards = [_load_shard(self.directory, r, self.dim) for r in self.manifest["shards"]]
        self._starts = np.cumsum([0] + [len(a) for a in self.shards])
        hashes = np.empty(int(self._starts[-1]), dtype=np.int64)
        for i, record in enumerate(self.manifest["shards"]):
            keys = _read_keys(self.directory, record)
            hashes[self._starts[i]:self._starts[i + 1]] = np.fromiter(map(hash, keys), np.int64, len(keys))
        order = np.argsort(hashes, kind="stable")
        self._hashes, self._rows = hashes[order], order
        self._colliding: dict[str, int] = {}
        repeated = np.flatnonzero(self._hashes[1:] == self._hashes[:-1])
        if len(repeated):
            self._resolve_collisions(repeated)

    def __reduce__(self):
        # Python's str hash is salted per process and memory maps should not travel by pickle: a
        # copy sent to another process (a spawned DataLoader worker) reopens the directory.
        return type(self), (self.directory,)

    def _resolve_collisions(self, repeated: np.ndarray) -> None:
        """Same hash for several rows: a repeated key is an error; distinct keys go to a side table."""
        suspects = self._suspects = set(self._hashes[repeated].tolist())
        for i, record in enumerate(self.manifest["shards"]):
            for row, key in enumerate(_read_keys(self.directory, record)):
                if hash(key) in suspects:
                    if key in self._colliding:
                        raise EmbeddingCacheError(f"embedding cache {self.directory}: key {key!r} appears more "
                                                  "than once")
                    self._colliding[key] = int(self._starts[i]) + row

    def __len__(self) -> int:
        return int(self._starts[-1])

    def keys(self) -> list[str]:
        """Every key in row order (manifest shards, then keys.txt lines)."""
        return [key for record in self.manifest["shards"] for key in _read_keys(self.directory, record)]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Raw (float16, unprepared) rows [start, stop) across shard boundaries: a view of the memory
        map when they lie in one shard, else a stacked copy."""
        stop = min(stop, len(self))
        pieces = [self.shards[s][max(start, lo) - lo:min(stop, hi) - lo]
                  for s, (lo, hi) in enumerate(zip(self._starts[:-1].tolist(), self._starts[1:].tolist()))
                  if max(start, lo) < min(stop, hi)]
        if not pieces:
            return np.empty((0, self.dim), np.dtype(DTYPE))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _row(self, keys: Sequence[str]) -> np.ndarray:
        rows = np.full(len(keys), -1, dtype=np.int64)
        wanted = np.fromiter(map(hash, keys), np.int64, len(keys))
        at = np.minimum(np.searchsorted(self._hashes, wanted), len(self._hashes) - 1)
        found = self._hashes[at] == wanted
        rows[found] = self._rows[at[found]]
        if self._colliding:
            for i, (key, h) in enumerate(zip(keys, wanted.tolist())):
                if h in self._suspects:
                    rows[i] = self._colliding.get(key, -1)
        return rows

    def lookup(self, keys: Sequence[str]) -> torch.Tensor:
        """FloatTensor[len(keys), dim] (fp32) of the cached embeddings, in the order of `keys`."""
        keys = list(keys)
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        if not keys:
            return torch.from_numpy(out)
        rows = self._row(keys)
        if (rows < 0).any():
            missing = [k for k, r in zip(keys, rows) if r < 0]
            raise KeyError(f"{len(missing)} key(s) not in embedding cache {self.directory} "
                           f"({self.manifest['modality']}, {self.model}): {missing[:5]}")
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(shard):
            picked = np.flatnonzero(shard == s)
            local = rows[picked] - self._starts[s]
            order = np.argsort(local)  # ascending reads from the memory map
            out[picked[order]] = self.shards[s][local[order]]
        return torch.from_numpy(out)


def open_image_text_caches(embed_dir: str | os.PathLike) -> tuple[EmbeddingCache, EmbeddingCache]:
    """The `images/` and `texts/` caches the embed stage writes under `embed_dir`, checked to hold
    those modalities from one teacher (Algorithm 1 compares them)."""
    embed_dir = Path(embed_dir)
    caches = []
    for modality in ("images", "texts"):
        try:
            cache = EmbeddingCache(embed_dir / modality)
        except EmbeddingCacheError as err:
            raise EmbeddingCacheError(f"match.embed_dir={embed_dir}: {err}\nRun `python -m dime_ds.match "
                                      "stage=embed` (same overrides) first.") from None
        if cache.manifest["modality"] != modality:
            raise EmbeddingCacheError(f"{cache.directory} holds {cache.manifest['modality']} embeddings, not {modality}")
        caches.append(cache)
    images, texts = caches
    if images.model != texts.model:
        raise EmbeddingCacheError(f"image embeddings come from {images.model!r}, text embeddings from "
                                  f"{texts.model!r}: Algorithm 1 needs one teacher for both; re-run stage=embed")
    return images, texts
