"""The compact key index behind the embedding cache, keep lists and pseudo-labels."""
from __future__ import annotations

import numpy as np
import pytest

from dime_ds.data import key_index
from dime_ds.data.key_index import KeyIndex, RepeatedKeyError


def test_rows_follow_the_chunk_order_and_unknown_keys_are_minus_one():
    index = KeyIndex(lambda: [["a", "b"], [], ["c"]])
    assert len(index) == 3
    assert index.rows(["c", "zz", "a", "b"]).tolist() == [2, -1, 0, 1]
    assert KeyIndex(lambda: []).rows(["a"]).tolist() == [-1]


def test_keys_sharing_a_hash_are_told_apart(monkeypatch):
    # Every key hashes alike: the side table must carry the whole lookup.
    monkeypatch.setattr(key_index, "hash", lambda key: 7, raising=False)
    index = KeyIndex(lambda: [["x", "y"], ["z"]])
    assert index.rows(["z", "x", "w", "y"]).tolist() == [2, 0, -1, 1]
    with pytest.raises(RepeatedKeyError, match="'x' appears more than once"):
        KeyIndex(lambda: [["x", "y"], ["x"]])


def test_matches_a_dict_on_random_keys():
    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in rng.permutation(2000)]
    index = KeyIndex(lambda: [keys[:700], keys[700:]])
    truth = {k: i for i, k in enumerate(keys)}
    asked = keys[::7] + ["absent-1", "absent-2"]
    assert index.rows(asked).tolist() == [truth.get(k, -1) for k in asked]
