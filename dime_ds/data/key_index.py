"""A compact index from sample keys to row positions: sorted 64-bit key hashes and their rows
(16 bytes a key, where a dict of strings takes ~150), so tens of millions of keys fit in every
rank. Two keys with one hash are found at build and kept in a small side table; a repeated key is
an error. (A key *absent* from the index whose hash equals an indexed key's, odds ~len/2**64 a
lookup, would be taken for it.) Python's str hash is salted per process: build the index in the
process that looks up (its owners re-build it after pickling)."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np


class RepeatedKeyError(ValueError):
    def __init__(self, key: str):
        super().__init__(f"key {key!r} appears more than once")
        self.key = key


class KeyIndex:
    """`rows(keys)`: each key's row in the order `chunks()` yields them, -1 for a key not indexed.
    `chunks` is called once more only when two keys share a hash."""

    def __init__(self, chunks: Callable[[], Iterable[Sequence[str]]]):
        parts = [np.fromiter(map(hash, keys), np.int64, len(keys)) for keys in chunks()]
        hashes = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        order = np.argsort(hashes, kind="stable")
        self._hashes, self._rows = hashes[order], order
        self._colliding: dict[str, int] = {}
        self._suspects: set[int] = set()
        repeated = np.flatnonzero(self._hashes[1:] == self._hashes[:-1])
        if len(repeated):
            self._suspects = set(self._hashes[repeated].tolist())
            row = 0
            for keys in chunks():
                for key in keys:
                    if hash(key) in self._suspects:
                        if key in self._colliding:
                            raise RepeatedKeyError(key)
                        self._colliding[key] = row
                    row += 1

    def __len__(self) -> int:
        return len(self._hashes)

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        rows = np.full(len(keys), -1, dtype=np.int64)
        if not len(self._hashes) or not len(keys):
            return rows
        wanted = np.fromiter(map(hash, keys), np.int64, len(keys))
        at = np.minimum(np.searchsorted(self._hashes, wanted), len(self._hashes) - 1)
        found = self._hashes[at] == wanted
        rows[found] = self._rows[at[found]]
        if self._colliding:
            for i, (key, h) in enumerate(zip(keys, wanted.tolist())):
                if h in self._suspects:
                    rows[i] = self._colliding.get(key, -1)
        return rows
