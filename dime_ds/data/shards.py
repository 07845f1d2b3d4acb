"""Deterministic webdataset shards: a tar writer whose output depends only on its input, a shard
spec resolver (directory, glob or brace pattern) and a file hash for manifests."""
from __future__ import annotations

import glob
import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Mapping

from braceexpand import braceexpand

from dime_ds import atomic
from dime_ds.errors import UserError

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


_PACK_HINT = ("; a folder of images or a text file of sentences becomes shards with "
              "`dime-ds shards <folder or file> <out_dir>`")


class ShardSpecError(UserError, FileNotFoundError):
    """A shard spec that matches nothing (or names missing files)."""


class ShardWriter:
    """Write samples into `{prefix}-{index:06d}.tar` shards of at most `maxcount` samples.

    Each sample `key` becomes members `{key}.{ext}` (the img2dataset layout: jpg, txt, json, cls).
    Headers carry no time, owner or permission that varies between runs, so identical input gives
    byte-identical shards. A shard is written under a `.tmp` name, fsynced and renamed when complete
    (atomic.PendingFile): a crash never leaves a truncated shard under a final name.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str = "shard", maxcount: int = 1000):
        if maxcount < 1:
            raise ValueError(f"maxcount must be >= 1, got {maxcount}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.maxcount = maxcount
        self.paths: list[str] = []  # completed shards, in order
        self.counts: list[int] = []  # samples per completed shard
        self._tar: tarfile.TarFile | None = None
        self._pending: atomic.PendingFile | None = None
        self._count = 0
        self._last_key: str | None = None
        self._closed = False

    def write(self, key: str, fields: Mapping[str, bytes | str]) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        _check_key(key)
        if not fields:
            raise ValueError(f"sample {key!r} has no fields")
        # webdataset groups consecutive members by key: a repeated key would merge two samples.
        if key == self._last_key:
            raise ValueError(f"sample key {key!r} written twice in a row")
        if self._tar is None:
            self._open_next()
        for ext in sorted(fields):  # sorted, so member order never depends on dict order
            _add_member(self._tar, f"{key}.{_check_ext(ext, key)}", fields[ext])
        self._last_key = key
        self._count += 1
        if self._count >= self.maxcount:
            self._finish()

    def close(self) -> list[str]:
        """Finish the open shard; returns the paths of all shards written. Idempotent."""
        if not self._closed:
            if self._tar is not None:
                self._finish()
            self._closed = True
        return list(self.paths)

    def abort(self) -> None:
        """Drop the shard in progress (its .tmp file); completed shards stay."""
        if self._tar is not None:
            self._tar.close()
            self._pending.discard()
            self._tar = None
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open_next(self) -> None:
        self._pending = atomic.PendingFile(self.directory / f"{self.prefix}-{len(self.paths):06d}.tar")
        self._tar = tarfile.open(self._pending.tmp, "w", format=tarfile.PAX_FORMAT)
        self._count = 0

    def _finish(self) -> None:
        self._tar.close()
        self.paths.append(str(self._pending.commit()))
        self.counts.append(self._count)
        self._tar = None
        self._pending = None


def _check_key(key: str) -> None:
    # webdataset takes everything before the first dot of the basename as the key.
    if not key or "." in key or "/" in key:
        raise ValueError(f"invalid sample key {key!r}: must be non-empty, without '.' or '/'")


def _check_ext(ext: str, key: str) -> str:
    if not ext or "/" in ext:
        raise ValueError(f"invalid field name {ext!r} in sample {key!r}")
    return ext


def _add_member(tar: tarfile.TarFile, name: str, data: bytes | str) -> None:
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"member {name!r}: expected bytes or str, got {type(data).__name__}")
    data = bytes(data)
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


def list_shards(spec: str | os.PathLike) -> list[str]:
    """Shard paths named by `spec`: a directory (its *.tar, sorted), a glob, a brace pattern such as
    `dir/shard-{000000..000003}.tar`, or a file. Remote URLs (pipe:, http://, s3://...) are only
    brace-expanded. Raises FileNotFoundError naming the spec when nothing, or not everything, exists."""
    spec = str(spec)
    if spec.startswith(_REMOTE_PREFIXES):
        return list(braceexpand(spec))
    local = os.path.expanduser(spec)
    if os.path.isdir(local):
        found = sorted(glob.glob(os.path.join(glob.escape(local), "*.tar")))
        if not found:
            raise ShardSpecError(f"no *.tar shards in directory {spec!r}{_PACK_HINT}")
        return found
    found, missing = [], []
    for pattern in braceexpand(local):
        if glob.has_magic(pattern):
            found.extend(sorted(glob.glob(pattern)))
        elif os.path.isfile(pattern):
            found.append(pattern)
        else:
            missing.append(pattern)
    if not found:
        raise ShardSpecError(f"no shards match {spec!r}")
    # A damaged .tar is the streams' to report; another file named alone is a user's raw data.
    if len(found) == 1 and not found[0].endswith(".tar") and not tarfile.is_tarfile(found[0]):
        raise ShardSpecError(f"{found[0]} is not a tar shard{_PACK_HINT}")
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ShardSpecError(f"shard spec {spec!r} names missing files: {shown}")
    return found


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
