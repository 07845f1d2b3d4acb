"""Keep lists: the image keys a curation kept (CLIP-CID's semantic balance writes one), one a line in
a plain text file, honoured by the image stream (`data.keep=`) without rewriting any shard.

Membership is a data.key_index.KeyIndex (16 B a key, where a set of strings takes ~100), so 10^8
keys cost 1.6 GB per process. Python's str hash is salted per process, so the index is built in the
process that asks and a copy sent to another process (a spawned DataLoader worker) re-reads the file.
A key listed twice counts once."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from dime_ds import atomic
from dime_ds.data.key_index import KeyIndex
from dime_ds.errors import UserError

KEEP_FILE = "keep.txt"  # what a stage directory given as data.keep holds


class KeepListError(UserError, ValueError):
    """A keep list that is missing or unreadable."""


def keep_file(spec: str | os.PathLike) -> Path:
    """The file `data.keep` names: the file itself, or a stage directory's keep.txt."""
    path = Path(os.path.expanduser(str(spec)))
    if path.is_dir():
        path = path / KEEP_FILE
    if not path.is_file():
        raise KeepListError(f"data.keep={spec}: no keep list at {path} (a file of image keys, one a line, or the "
                            "output directory of `python -m dime_ds.curate stage=semantic_balance`)")
    return path


def write_keep_list(path: str | os.PathLike, keys: Iterable[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, "".join(f"{k}\n" for k in keys))
    return path


def read_keep_keys(path: str | os.PathLike) -> list[str]:
    return [k for k in Path(path).read_text(encoding="utf-8").splitlines() if k]


class KeepList:
    """`key in keep`; `len(keep)`. Built from `data.keep` (a file or a stage directory)."""

    def __init__(self, spec: str | os.PathLike):
        self.spec = str(spec)
        self.path = keep_file(spec)
        keys = list(dict.fromkeys(read_keep_keys(self.path)))  # a key listed twice counts once
        self._index = KeyIndex(lambda: [keys])
        self._count = len(keys)

    def __reduce__(self):
        return type(self), (self.spec,)  # re-hashed in the receiving process (salted str hash)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: str) -> bool:
        return bool(self._index.rows([key])[0] >= 0)

    def mask(self, keys: Iterable[str]) -> np.ndarray:
        """bool per key: kept."""
        return self._index.rows(list(keys)) >= 0
