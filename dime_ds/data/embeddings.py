"""The teacher-embedding cache: written by the embed stage, read by distillation (teacher.source=cache).

One modality directory (e.g. `<embed_dir>/images/`) holds, per input shard `name`:
- `{name}.npy`       float16 [count, dim], raw (unnormalised) embeddings unless the manifest says
                     `normalized`; a plain .npy, never pickled, always read with allow_pickle=False;
                     with K > 1 views per image (dime_ds.data.views) float16 [count, K, dim];
- `{name}.views.npy` only with K > 1: int32 [count, K, 5], each view's (x0, y0, w, h, flip) in
                     original-image pixels, also a plain .npy;
- `{name}.keys.txt`  the sample keys, one a line, in row order;
and `manifest.json`: {"format_version", "modality", "model", "dim", "dtype": "float16", "normalized",
"count", "views": K, "recipe": null or the view recipe {"name", "version", ...}, "view_seed",
"shards": [{"name", "source", "source_sha256", "count", and for a damaged source "partial": true,
"damaged": {"reason", "samples"}}], "skipped": [{"key", "source", "reason"}]}.
Format 1 (before views) lacks views/recipe/view_seed and reads as K=1. Every file is written under a
temporary name and renamed; the manifest is written last and only after its shards are checked, so
a directory with a manifest is a complete cache.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from dime_ds import atomic
from dime_ds.data.key_index import KeyIndex, RepeatedKeyError
from dime_ds.errors import UserError

FORMAT_VERSION = 2  # 2: views, recipe, view_seed added; format 1 caches read as one view per sample
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
DTYPE = "float16"
VIEW_DTYPE = "int32"
VIEW_PARAMS = 5  # x0, y0, w, h, flip (dime_ds.data.views.PARAMS)
_FIELDS = ("format_version", "modality", "model", "dim", "dtype", "normalized", "count", "shards", "skipped")
_VIEW_FIELDS = ("views", "recipe", "view_seed")  # format 2


class EmbeddingCacheError(UserError, ValueError):
    """A cache directory that is incomplete, or whose files do not match its manifest."""


def _check_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name.startswith(".") or name == Path(MANIFEST).stem:
        raise ValueError(f"invalid embedding shard name {name!r}")
    return name


def write_embedding_shard(directory: str | os.PathLike, name: str, keys: Sequence[str], array: Any,
                          source: str, source_sha256: str, view_params: Any = None) -> dict:
    """Write `{name}.npy` (float16) and `{name}.keys.txt` atomically, and with K views per sample
    (array [count, K, dim]) `{name}.views.npy` from `view_params` [count, K, 5]; returns the
    manifest's shard record {"name", "source", "source_sha256", "count"}."""
    directory = Path(directory)
    _check_name(name)
    array = np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array)
    if view_params is None and (array.ndim != 2 or array.shape[1] < 1):
        raise ValueError(f"shard {name}: embeddings must be [count, dim], got shape {array.shape}")
    if view_params is not None:
        view_params = np.asarray(view_params)
        if array.ndim != 3 or array.shape[1] < 2 or array.shape[2] < 1:
            raise ValueError(f"shard {name}: view embeddings must be [count, K >= 2, dim], got shape {array.shape}")
        if view_params.shape != (*array.shape[:2], VIEW_PARAMS) or not np.issubdtype(view_params.dtype, np.integer):
            raise ValueError(f"shard {name}: view parameters must be integers [count, K, {VIEW_PARAMS}] for "
                             f"embeddings {array.shape}, got {view_params.dtype} {view_params.shape}")
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
    if view_params is not None:
        params = np.ascontiguousarray(view_params.astype(VIEW_DTYPE))
        atomic.write_bytes(directory / f"{name}.views.npy", lambda f: np.save(f, params, allow_pickle=False))
    atomic.write_bytes(directory / f"{name}.npy", lambda f: np.save(f, np.ascontiguousarray(half), allow_pickle=False))
    atomic.write_text(directory / f"{name}.keys.txt", "".join(k + "\n" for k in keys))
    return {"name": name, "source": str(source), "source_sha256": source_sha256, "count": len(keys)}


def _open_array(directory: Path, path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise EmbeddingCacheError(f"embedding cache {directory}: shard file {path.name} of the manifest "
                                  "is missing") from None
    except ValueError as err:  # object arrays need pickle, which is never allowed
        raise EmbeddingCacheError(f"embedding cache {directory}: {path.name} is not a plain array: {err}") from None


def _load_shard(directory: Path, record: Mapping[str, Any], dim: int | None, views: int = 1) -> np.ndarray:
    """The shard's embeddings, checked: [count, dim], or [count, views, dim] when views > 1."""
    path = directory / f"{record['name']}.npy"
    array = _open_array(directory, path)
    want = (record["count"], *((views,) if views > 1 else ()), dim)
    if array.dtype != np.dtype(DTYPE) or array.ndim != len(want) or array.shape[:-1] != want[:-1] \
            or array.shape[-1] < 1 or (dim is not None and array.shape[-1] != dim):
        shown = tuple("dim" if d is None else d for d in want)
        raise EmbeddingCacheError(
            f"embedding cache {directory}: {path.name} holds {array.dtype} {tuple(array.shape)}, the manifest says "
            f"{DTYPE} {shown}" + (f" ({views} views per sample)" if views > 1 else ""))
    return array


def _load_view_params(directory: Path, record: Mapping[str, Any], views: int) -> np.ndarray:
    path = directory / f"{record['name']}.views.npy"
    array = _open_array(directory, path)
    if array.dtype != np.dtype(VIEW_DTYPE) or array.shape != (record["count"], views, VIEW_PARAMS):
        raise EmbeddingCacheError(
            f"embedding cache {directory}: {path.name} holds {array.dtype} {tuple(array.shape)}, the manifest says "
            f"{VIEW_DTYPE} ({record['count']}, {views}, {VIEW_PARAMS})")
    return array


def _read_keys(directory: Path, record: Mapping[str, Any]) -> list[str]:
    path = directory / f"{record['name']}.keys.txt"
    try:
        keys = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EmbeddingCacheError(f"embedding cache {directory}: key file {path.name} of the manifest "
                                  "is missing") from None
    if len(keys) != record["count"]:
        raise EmbeddingCacheError(f"embedding cache {directory}: {path.name} has {len(keys)} keys, the manifest "
                                  f"says {record['count']}")
    return keys


def write_manifest(directory: str | os.PathLike, *, modality: str, model: str, shards: Sequence[Mapping[str, Any]],
                   normalized: bool = False, skipped: Iterable[Mapping[str, Any]] = (), views: int = 1,
                   recipe: Mapping[str, Any] | None = None, view_seed: int | None = None) -> dict:
    """Check the shards' files against `shards` (records from write_embedding_shard, in order), then
    write manifest.json atomically. `views` > 1 needs the `recipe` the views were drawn with.
    Returns the manifest."""
    directory = Path(directory)
    if not shards:
        raise ValueError(f"embedding cache {directory}: no shards to write a manifest for")
    names = [_check_name(r["name"]) for r in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"embedding cache {directory}: shard names repeat")
    if (views > 1) != (recipe is not None):
        raise ValueError(f"embedding cache {directory}: {views} view(s) per sample with recipe {recipe!r}: "
                         "views > 1 need a recipe, one view has none")
    dim = None
    for record in shards:
        dim = _load_shard(directory, record, dim, views).shape[-1]
        if views > 1:
            _load_view_params(directory, record, views)
        _read_keys(directory, record)
    manifest = {
        "format_version": FORMAT_VERSION, "modality": modality, "model": str(model), "dim": int(dim),
        "dtype": DTYPE, "normalized": bool(normalized), "count": int(sum(r["count"] for r in shards)),
        "views": int(views), "recipe": None if recipe is None else dict(recipe),
        "view_seed": None if view_seed is None else int(view_seed),
        "shards": [{"name": r["name"], "source": str(r["source"]), "source_sha256": r["source_sha256"],
                    "count": int(r["count"]),
                    # a damaged source: embedded as far as readable, redone by the next embed run
                    **({"partial": True, "damaged": dict(r["damaged"])} if r.get("partial") else {})}
                   for r in shards],
        "skipped": [{"key": s["key"], "source": s["source"], "reason": s["reason"]} for s in skipped],
    }
    atomic.write_json(directory / MANIFEST, manifest)
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
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise EmbeddingCacheError(f"embedding cache {directory}: format_version {manifest.get('format_version')!r}, "
                                  f"this code reads {', '.join(map(str, READABLE_VERSIONS))}")
    if manifest["format_version"] == 1:  # before views: one view per sample, no recipe
        manifest = {**manifest, "views": 1, "recipe": None, "view_seed": None}
    missing = [f for f in (*_FIELDS, *_VIEW_FIELDS) if f not in manifest]
    if missing:
        raise EmbeddingCacheError(f"embedding cache {directory}: {MANIFEST} lacks {', '.join(missing)}")
    if not isinstance(manifest["views"], int) or manifest["views"] < 1 \
            or (manifest["views"] > 1) != isinstance(manifest["recipe"], dict):
        raise EmbeddingCacheError(f"embedding cache {directory}: views {manifest['views']!r} with recipe "
                                  f"{manifest['recipe']!r}: K > 1 views need a recipe, one view has none")
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

    def __init__(self, directory: str | os.PathLike, *, modality: str, model: str, normalized: bool = False,
                 views: int = 1, recipe: Mapping[str, Any] | None = None, view_seed: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / MANIFEST).unlink(missing_ok=True)
        self.modality, self.model, self.normalized = modality, model, normalized
        self.views, self.recipe, self.view_seed = views, recipe, view_seed
        self.shards: list[dict] = []
        self.skipped: list[dict] = []
        self.manifest: dict | None = None

    def write_shard(self, name: str, keys: Sequence[str], array: Any, source: str, source_sha256: str,
                    view_params: Any = None) -> dict:
        if self.manifest is not None:
            raise RuntimeError("EmbeddingShardWriter is closed")
        record = write_embedding_shard(self.directory, name, keys, array, source, source_sha256, view_params)
        self.shards.append(record)
        return record

    def skip(self, key: str, source: str, reason: str) -> None:
        self.skipped.append({"key": key, "source": source, "reason": reason})

    def close(self) -> dict:
        if self.manifest is None:
            self.manifest = write_manifest(self.directory, modality=self.modality, model=self.model,
                                           shards=self.shards, normalized=self.normalized, skipped=self.skipped,
                                           views=self.views, recipe=self.recipe, view_seed=self.view_seed)
        return self.manifest

    def __enter__(self) -> "EmbeddingShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


class EmbeddingCache:
    """Memory-mapped embeddings of one modality directory, looked up by sample key (and view).

    A cache of K > 1 views per sample (`views`, `recipe`) looks up (key, view) pairs and holds each
    view's parameters (`view_params`); `rows` gives view 0, the centre view, for stages that want
    one embedding per sample (Algorithm 1, clustering).

    Keys are found through a compact data.key_index.KeyIndex over the global rows (a repeated key
    is an error)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.dim = int(self.manifest["dim"])
        self.model = self.manifest["model"]
        self.normalized = bool(self.manifest["normalized"])
        self.views = int(self.manifest["views"])
        self.recipe = self.manifest["recipe"]
        self.shards = [_load_shard(self.directory, r, self.dim, self.views) for r in self.manifest["shards"]]
        self._params = [_load_view_params(self.directory, r, self.views) for r in self.manifest["shards"]] \
            if self.views > 1 else None
        self._starts = np.cumsum([0] + [len(a) for a in self.shards])
        try:
            self._index = KeyIndex(lambda: (_read_keys(self.directory, r) for r in self.manifest["shards"]))
        except RepeatedKeyError as err:
            raise EmbeddingCacheError(f"embedding cache {self.directory}: {err}") from None

    def __reduce__(self):
        # Python's str hash is salted per process and memory maps should not travel by pickle: a
        # copy sent to another process (a spawned DataLoader worker) reopens the directory.
        return type(self), (self.directory,)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def keys(self) -> list[str]:
        """Every key in row order (manifest shards, then keys.txt lines)."""
        return [key for _, keys in self.shard_keys() for key in keys]

    def shard_keys(self) -> Iterator[tuple[int, list[str]]]:
        """(first row, keys) of each shard in turn: the keys without holding them all at once."""
        for start, record in zip(self._starts.tolist(), self.manifest["shards"]):
            yield start, _read_keys(self.directory, record)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Raw (float16, unprepared) rows [start, stop) across shard boundaries: a view of the memory
        map when they lie in one shard, else a stacked copy."""
        stop = min(stop, len(self))
        pieces = [self.shards[s][max(start, lo) - lo:min(stop, hi) - lo]
                  for s, (lo, hi) in enumerate(zip(self._starts[:-1].tolist(), self._starts[1:].tolist()))
                  if max(start, lo) < min(stop, hi)]
        if self.views > 1:
            pieces = [p[:, 0] for p in pieces]
        if not pieces:
            return np.empty((0, self.dim), np.dtype(DTYPE))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _gather(self, arrays: list[np.ndarray], keys: Sequence[str], views: Sequence[int] | None,
                out: np.ndarray) -> np.ndarray:
        """out[i] = the row of keys[i] (its view views[i] in a K-view cache; view 0 when None)."""
        if not len(keys):
            return out
        rows = self._index.rows(keys)
        if (rows < 0).any():
            missing = [k for k, r in zip(keys, rows) if r < 0]
            raise KeyError(f"{len(missing)} key(s) not in embedding cache {self.directory} "
                           f"({self.manifest['modality']}, {self.model}): {missing[:5]}")
        if views is not None:
            views = np.asarray(views, dtype=np.int64).reshape(-1)
            if len(views) != len(keys) or (views < 0).any() or (views >= self.views).any():
                raise ValueError(f"embedding cache {self.directory} holds {self.views} view(s) per sample; asked "
                                 f"for views {views[:8].tolist()} of {len(keys)} key(s)")
        elif self.views > 1:
            views = np.zeros(len(keys), dtype=np.int64)
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(shard):
            picked = np.flatnonzero(shard == s)
            local = rows[picked] - self._starts[s]
            order = np.argsort(local)  # ascending reads from the memory map
            if self.views > 1:
                out[picked[order]] = arrays[s][local[order], views[picked[order]]]
            else:
                out[picked[order]] = arrays[s][local[order]]
        return out

    def lookup(self, keys: Sequence[str], views: Sequence[int] | None = None) -> torch.Tensor:
        """FloatTensor[len(keys), dim] (fp32) of the cached embeddings, in the order of `keys`; in a
        K-view cache, of view views[i] of keys[i] (view 0 when None). A one-view cache takes only
        views of 0."""
        keys = list(keys)
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        return torch.from_numpy(self._gather(self.shards, keys, views, out))

    def view_params(self, keys: Sequence[str], views: Sequence[int]) -> np.ndarray:
        """int32[len(keys), 5]: (x0, y0, w, h, flip) of view views[i] of keys[i], in original pixels."""
        if self._params is None:
            raise ValueError(f"embedding cache {self.directory} holds one unaugmented view per sample: no view "
                             "parameters (written before views or with embed.views=1)")
        keys = list(keys)
        out = np.empty((len(keys), VIEW_PARAMS), dtype=np.dtype(VIEW_DTYPE))
        return self._gather(self._params, keys, views, out)


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
            raise EmbeddingCacheError(f"{cache.directory} holds {cache.manifest['modality']} embeddings, "
                                      f"not {modality}")
        caches.append(cache)
    images, texts = caches
    if images.model != texts.model:
        raise EmbeddingCacheError(f"image embeddings come from {images.model!r}, text embeddings from "
                                  f"{texts.model!r}: Algorithm 1 needs one teacher for both; re-run stage=embed")
    return images, texts
