"""`dime-ds shards` (dime_ds/data/pack.py): a folder of images or a text file of sentences becomes
shards that the stages' own reader gives back byte for byte; what cannot be packed is named, and a
set appears only when complete."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from dime_ds.atomic import temporary
from dime_ds.cli import console
from dime_ds.data.pack import REPORT, PackError, pack_images, pack_texts
from dime_ds.data.pipelines import decode_sample, iter_tar_samples
from dime_ds.data.shards import ShardSpecError, list_shards


def _jpeg(colour: tuple[int, int, int], fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(out, fmt)
    return out.getvalue()


def _read(out_dir) -> list[dict]:
    """Every sample of the set, raw, as the stages' reader groups it; each one decodes as the stages
    decode it."""
    samples = list(iter_tar_samples(list_shards(out_dir)))
    for sample in samples:
        decode_sample(sample)  # raises on what a stage would skip
    return samples


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "photos"
    files = {"cat/001.jpg": _jpeg((200, 10, 10)), "cat/002.JPG": _jpeg((10, 200, 10)),
             "dog/a.png": _jpeg((10, 10, 200), "PNG"), "dog/nested/b.jpeg": _jpeg((90, 90, 90)),
             "dog/broken.jpg": b"\xff\xd8 not a jpeg at all", "README.md": b"my photos", "dog/c.bmp": b"BM"}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder, files


def test_an_image_folder_packs_to_shards_the_stages_read_back_byte_for_byte(image_folder, tmp_path):
    folder, files = image_folder
    report = pack_images(folder, tmp_path / "shards", per_shard=2, progress=False)
    assert report["samples"] == 4 and report["shards"] == 2
    assert list(report["skipped"]) == ["dog/broken.jpg"]  # named with why, not packed
    assert report["ignored"] == [".bmp", ".md"]
    samples = _read(tmp_path / "shards")
    packed = {json.loads(s["json"])["path"]: s for s in samples}
    assert sorted(packed) == ["cat/001.jpg", "cat/002.JPG", "dog/a.png", "dog/nested/b.jpeg"]
    for path, sample in packed.items():
        member = {"jpg", "jpeg", "png"} & set(sample)
        assert len(member) == 1 and sample[member.pop()] == files[path]
        assert decode_sample(sample)["image"].size == (24, 16)
    assert len({s["__key__"] for s in samples}) == 4
    assert json.loads((tmp_path / "shards" / REPORT).read_text())["samples"] == 4
    assert not temporary(tmp_path / "shards").exists()

    again = pack_images(folder, tmp_path / "again", per_shard=2, progress=False)
    assert again["samples"] == 4
    for first, second in zip(list_shards(tmp_path / "shards"), list_shards(tmp_path / "again")):
        assert open(first, "rb").read() == open(second, "rb").read()  # a rerun writes the same shards


def test_a_sentence_file_packs_its_lines_in_order_keyed_by_line(tmp_path):
    text = tmp_path / "sentences.txt"
    text.write_text("a red circle\n\n  two blue squares  \nüber café ☕\n", encoding="utf-8")
    report = pack_texts(text, tmp_path / "corpus", progress=False)
    assert report["samples"] == 3 and report["blank_lines"] == 1
    samples = _read(tmp_path / "corpus")
    assert [(s["__key__"], decode_sample(s)["text"]) for s in samples] == [
        ("000000001", "a red circle"), ("000000003", "two blue squares"), ("000000004", "über café ☕")]


def test_what_cannot_be_packed_is_refused_naming_it_and_nothing_is_written(image_folder, tmp_path):
    folder, _ = image_folder
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    with pytest.raises(PackError, match="taken exists and is not an empty directory"):
        pack_images(folder, taken, progress=False)
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("first\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(PackError, match="line 2 is not UTF-8"):
        pack_texts(latin1, tmp_path / "out", progress=False)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.md").write_text("x")
    with pytest.raises(PackError, match=r"no images in .*found \.md"):
        pack_images(empty, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not temporary(tmp_path / "out").exists()


def test_a_stopped_pack_leaves_no_set_and_a_rerun_completes(image_folder, tmp_path, monkeypatch):
    folder, _ = image_folder
    from dime_ds.data import pack

    calls = {"n": 0}
    real = pack.ShardWriter.write

    def stop_at_the_third(writer, key, fields):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(writer, key, fields)

    monkeypatch.setattr(pack.ShardWriter, "write", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        pack_images(folder, tmp_path / "shards", per_shard=1, progress=False)
    assert not (tmp_path / "shards").exists()  # one shard was complete, but no half set under the name
    monkeypatch.setattr(pack.ShardWriter, "write", real)
    assert pack_images(folder, tmp_path / "shards", per_shard=1, progress=False)["samples"] == 4
    assert len(list_shards(tmp_path / "shards")) == 4 and not temporary(tmp_path / "shards").exists()


def test_the_command_and_the_hint_a_stage_gives_for_raw_files(image_folder, tmp_path, capsys):
    folder, _ = image_folder
    assert console(["shards", str(folder), str(tmp_path / "img"), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "4 images in 1 shard(s)" in out.out and "dog/broken.jpg" in out.err
    assert console(["shards", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "no such folder or file" in capsys.readouterr().err
    text = tmp_path / "s.txt"
    text.write_text("one\n")
    for raw in (folder, text):  # what a user may pass as data.images or data.corpus before packing
        with pytest.raises(ShardSpecError, match="`dime-ds shards <folder or file> <out_dir>`"):
            list_shards(raw)
