"""dime_ds.atomic: a failed write leaves the old content and no temporary, a durable write reaches
the disk (fsync of the file and of its directory), and a staged directory replaces the old one whole."""
from __future__ import annotations

import json
import os

import pytest

from dime_ds import atomic


class Boom(RuntimeError):
    pass


def _fail_after_partial(f):
    f.write(b"half of the new")
    raise Boom("the writer died")


@pytest.fixture
def fsyncs(monkeypatch):
    """The paths os.fsync was called on, in order."""
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_writes_replace_the_target(tmp_path):
    path = tmp_path / "f.json"
    atomic.write_json(path, {"a": 1})
    assert path.read_text() == '{\n "a": 1\n}\n'
    atomic.write_text(path, "näive")
    assert path.read_bytes() == "näive".encode("utf-8")
    atomic.write_bytes(path, lambda f: f.write(b"\x00\x01"))
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


@pytest.mark.parametrize("durable", [True, False])
def test_a_failing_writer_leaves_the_old_content_and_no_temporary(tmp_path, durable):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    with pytest.raises(Boom):
        atomic.write_bytes(path, _fail_after_partial, durable=durable)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]

    with pytest.raises(Boom), atomic.replacing(path, durable=durable) as tmp:  # a library given a path
        tmp.write_bytes(b"half")
        raise Boom("the library died")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_failing_writer_leaves_no_file_where_there_was_none(tmp_path):
    with pytest.raises(Boom):
        atomic.write_bytes(tmp_path / "new.npy", _fail_after_partial)
    assert list(tmp_path.iterdir()) == []


def test_durable_write_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, fsyncs, monkeypatch):
    order = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(("replace", len(fsyncs))), real_replace(a, b)))
    path = tmp_path / "latest"
    atomic.write_text(path, "step_00000004")
    assert path.read_text() == "step_00000004"
    assert fsyncs == [str(atomic.temporary(path)), str(tmp_path)]
    assert order == [("replace", 1)]  # the data was on disk before the name pointed at it


def test_replacing_fsyncs_what_a_library_wrote(tmp_path, fsyncs):
    path = tmp_path / "weights.safetensors"
    with atomic.replacing(path) as tmp:
        assert tmp.name == "weights.safetensors.tmp" and not path.exists()
        tmp.write_bytes(b"weights")
    assert path.read_bytes() == b"weights"
    assert fsyncs == [str(atomic.temporary(path)), str(tmp_path)]


def test_not_durable_skips_fsync(tmp_path, fsyncs):
    atomic.write_json(tmp_path / "scratch.json", [1, 2], durable=False)
    assert json.loads((tmp_path / "scratch.json").read_text()) == [1, 2]
    assert fsyncs == []


def test_pending_file_commits_or_discards(tmp_path, fsyncs):
    pending = atomic.PendingFile(tmp_path / "shard-000000.tar")
    pending.tmp.write_bytes(b"tar")
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar.tmp"]
    assert pending.commit() == tmp_path / "shard-000000.tar"
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"] and len(fsyncs) == 2
    other = atomic.PendingFile(tmp_path / "shard-000001.tar")
    other.tmp.write_bytes(b"half")
    other.discard()
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]


def test_staged_dir_replaces_the_old_directory_whole(tmp_path, fsyncs):
    final = tmp_path / "corpus"
    final.mkdir()
    (final / "old-000000.tar").write_text("old")
    with atomic.staged_dir(final) as staging:
        assert staging == tmp_path / "corpus.tmp" and list(staging.iterdir()) == []
        atomic.write_text(staging / "new-000000.tar", "new")
        assert (final / "old-000000.tar").read_text() == "old"  # untouched until the swap
    assert sorted(p.name for p in final.iterdir()) == ["new-000000.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    assert fsyncs[-2:] == [str(tmp_path / "corpus.tmp"), str(tmp_path)]  # the staged entries, then the swap


def test_staged_dir_failure_keeps_the_old_directory_and_removes_the_staging(tmp_path):
    final = tmp_path / "corpus"
    final.mkdir()
    (final / "old-000000.tar").write_text("old")
    (tmp_path / "corpus.tmp").mkdir()
    (tmp_path / "corpus.tmp" / "leftover-of-a-crash").write_text("x")
    with pytest.raises(Boom), atomic.staged_dir(final) as staging:
        assert list(staging.iterdir()) == []  # a crash's leftover is cleared first
        (staging / "new-000000.tar").write_text("half")
        raise Boom("the stage died")
    assert sorted(p.name for p in final.iterdir()) == ["old-000000.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_replace_dir_swaps_a_staging_directory_in(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "old").write_text("old")
    (tmp_path / "corpus.tmp").mkdir()
    (tmp_path / "corpus.tmp" / "new").write_text("new")
    assert atomic.replace_dir(tmp_path / "corpus.tmp", tmp_path / "corpus") == tmp_path / "corpus"
    assert [p.name for p in (tmp_path / "corpus").iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_a_directory_fsync_the_file_system_refuses_is_not_an_error(tmp_path, monkeypatch):
    def refuse(fd):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refuse)
    atomic.fsync_dir(tmp_path)  # no error
    with pytest.raises(OSError):
        atomic.write_text(tmp_path / "f", "x")  # a file's fsync failing is: the data may not be on disk
    assert list(tmp_path.iterdir()) == []
