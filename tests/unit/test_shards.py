"""ShardWriter determinism, splitting and crash safety; list_shards spec forms; sha256_file."""
from __future__ import annotations

import hashlib
import re
import tarfile

import pytest
import webdataset as wds

from dime_ds.data.shards import ShardWriter, list_shards, sha256_file


def _write(directory, n, maxcount=4, prefix="shard"):
    with ShardWriter(directory, prefix=prefix, maxcount=maxcount) as writer:
        for i in range(n):
            writer.write(f"s{i:04d}", {"txt": f"sentence {i}".encode(), "json": b'{"i": %d}' % i})
    return writer.close()


def test_maxcount_splits_and_names(tmp_path):
    paths = _write(tmp_path, 10, maxcount=4)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    counts = [len(tarfile.open(p).getnames()) // 2 for p in paths]
    assert counts == [4, 4, 2]
    assert not list(tmp_path.glob("*.tmp"))


def test_exact_multiple_leaves_no_empty_shard(tmp_path):
    paths = _write(tmp_path, 8, maxcount=4)
    assert len(paths) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]


def test_headers_are_fixed_and_members_sorted(tmp_path):
    with ShardWriter(tmp_path, maxcount=10) as writer:
        writer.write("a", {"txt": b"x", "jpg": b"\xff\xd8", "cls": "3"})
    (path,) = writer.close()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["a.cls", "a.jpg", "a.txt"]
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o444)
        assert tar.extractfile("a.cls").read() == b"3"


def test_byte_identical_for_identical_input(tmp_path):
    first = _write(tmp_path / "a", 9)
    second = _write(tmp_path / "b", 9)
    assert [sha256_file(p) for p in first] == [sha256_file(p) for p in second]
    # Field order of the input dict does not matter either.
    with ShardWriter(tmp_path / "c", maxcount=4) as writer:
        for i in range(9):
            writer.write(f"s{i:04d}", {"json": b'{"i": %d}' % i, "txt": f"sentence {i}".encode()})
    assert [sha256_file(p) for p in writer.close()] == [sha256_file(p) for p in first]


def test_crash_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, maxcount=4) as writer:
            for i in range(6):
                writer.write(f"s{i}", {"txt": b"x"})
            raise RuntimeError("boom")
    # The full first shard is published; the half-written second one is gone, not truncated.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]


def test_shard_is_tmp_until_complete(tmp_path):
    writer = ShardWriter(tmp_path, maxcount=4)
    writer.write("a", {"txt": b"x"})
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar.tmp"]
    assert writer.close() == [str(tmp_path / "shard-000000.tar")]
    assert writer.close() == [str(tmp_path / "shard-000000.tar")]  # idempotent
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]


@pytest.mark.parametrize("key", ["", "a.b", "a/b"])
def test_rejects_bad_keys(tmp_path, key):
    with ShardWriter(tmp_path) as writer, pytest.raises(ValueError):
        writer.write(key, {"txt": b"x"})


def test_rejects_repeated_key(tmp_path):
    with ShardWriter(tmp_path) as writer:
        writer.write("a", {"txt": b"x"})
        with pytest.raises(ValueError, match="twice"):
            writer.write("a", {"txt": b"y"})


def test_webdataset_reads_what_was_written(tmp_path):
    paths = _write(tmp_path, 10, maxcount=4)
    samples = list(wds.WebDataset(paths, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"s{i:04d}" for i in range(10)]
    assert samples[7]["txt"] == b"sentence 7"


def test_list_shards_dir_glob_brace_file(tmp_path):
    paths = _write(tmp_path, 16, maxcount=4)
    (tmp_path / "notes.txt").write_text("not a shard")
    assert list_shards(tmp_path) == paths
    assert list_shards(str(tmp_path / "shard-*.tar")) == paths
    assert list_shards(str(tmp_path / "shard-{000000..000003}.tar")) == paths
    assert list_shards(str(tmp_path / "shard-{000001..000002}.tar")) == paths[1:3]
    assert list_shards(paths[2]) == [paths[2]]
    assert list_shards("pipe:cat x-{0..2}.tar") == ["pipe:cat x-0.tar", "pipe:cat x-1.tar", "pipe:cat x-2.tar"]


def test_list_shards_errors_name_the_spec(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for spec in [str(empty), str(tmp_path / "nope-*.tar"), str(tmp_path / "nope-{0..3}.tar"), str(tmp_path / "x.tar")]:
        with pytest.raises(FileNotFoundError, match=re.escape(repr(spec))):
            list_shards(spec)
    _write(tmp_path / "some", 8, maxcount=4)
    with pytest.raises(FileNotFoundError, match="missing files"):
        list_shards(str(tmp_path / "some" / "shard-{000000..000005}.tar"))


def test_sha256_file(tmp_path):
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 10000
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
