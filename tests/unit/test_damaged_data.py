"""Damaged shards (garbled, unopenable, unreadable) are read as far as they can be, counted per shard,
and the stream goes on with the others; bad samples on every decode path are skipped and counted or,
for images PIL reads in another mode, converted to RGB."""
from __future__ import annotations

import errno
import io
import itertools
import struct
import zlib

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from dime_ds.data.loaders import image_batches, text_batches
from dime_ds.data.pipelines import MAX_IMAGE_PIXELS, DamagedShardError, SampleError, decode_sample, iter_tar_samples
from dime_ds.data.shards import ShardWriter
from dime_ds.data.streams import AllShardsDamagedError


def _png(i: int, mode: str = "RGB", size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (10 * i, 20, 30) if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


def _shards(directory, n_shards=2, per=5, prefix="s"):
    with ShardWriter(directory, prefix=prefix, maxcount=per) as w:
        for i in range(n_shards * per):
            w.write(f"{prefix}{i:03d}", {"png": _png(i), "txt": f"sentence {i}"})
    return w.paths


def _garble_header_of(url: str, member_index: int) -> None:
    """Overwrite the header block of the member_index-th member with junk (its checksum then fails)."""
    import tarfile

    with tarfile.open(url) as tar:
        offset = tar.getmembers()[member_index].offset
    data = bytearray(open(url, "rb").read())
    data[offset:offset + 512] = b"\x7f" * 512
    open(url, "wb").write(bytes(data))


def test_a_garbled_header_mid_shard_yields_what_precedes_it(tmp_path, caplog):
    url = _shards(tmp_path, 1, 5)[0]
    _garble_header_of(url, 6)  # sample 3's first member: s000..s002 are whole
    got = list(iter_tar_samples([url]))
    assert [s["__key__"] for s in got] == ["s000", "s001", "s002"]  # the last read may miss members: it is the marker
    assert "garbled header at byte" in got[-1]["__damaged__"] and got[-1]["__samples__"] == 2
    with pytest.raises(DamagedShardError, match="s002 in .*damaged \\(garbled header at byte"):
        decode_sample(got[-1])
    assert "is damaged: garbled header" in caplog.text


def test_a_garbled_first_header_is_a_damaged_shard_not_an_exception(tmp_path):
    bad = tmp_path / "bad-000000.tar"
    bad.write_bytes(b"not a tar " * 200)
    (marker,) = iter_tar_samples([str(bad)])
    assert marker["__key__"] is None and marker["__samples__"] == 0 and "garbled" in marker["__damaged__"]
    with pytest.raises(DamagedShardError, match=f"shard {bad}: the shard is damaged"):
        decode_sample(marker)


def _eio_after(limit: int):
    """A gopen whose file raises EIO once `limit` bytes were read (a dying disk, a lost NFS mount)."""
    class Failing(io.FileIO):
        def read(self, size=-1):
            if self.tell() >= limit:
                raise OSError(errno.EIO, "Input/output error")
            return super().read(size if size >= 0 and self.tell() + size <= limit else limit - self.tell())
    return lambda url, mode="rb", **kw: Failing(url, "r")


@pytest.mark.parametrize("fault", ["missing", "permission", "read error"])
def test_unopenable_and_unreadable_shards_are_counted_and_training_goes_on(tmp_path, monkeypatch, fault):
    import importlib

    gopen_module = importlib.import_module("webdataset.gopen")  # the package exports a function of that name
    paths = _shards(tmp_path, 3, 5)
    real = gopen_module.gopen
    if fault == "missing":
        import os
        os.unlink(paths[1])  # listed, then gone
    elif fault == "permission":  # root ignores chmod: the open itself is refused
        def refusing(url, *a, **kw):
            if url == paths[1]:
                raise PermissionError(errno.EACCES, "Permission denied", url)
            return real(url, *a, **kw)
        monkeypatch.setattr(gopen_module, "gopen", refusing)
    else:
        eio = _eio_after(3000)  # inside the second sample
        monkeypatch.setattr(gopen_module, "gopen",
                            lambda url, *a, **kw: eio(url) if url == paths[1] else real(url, *a, **kw))
    transform = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)  # noqa: E731
    stream = image_batches(paths, transform, 2, seed=0, shuffle_buffer=1)
    keys = [k for batch in itertools.islice(stream, 10) for k in batch["keys"]]  # 20 samples: past one epoch
    assert len(keys) == 20
    assert list(stream.damaged) == [paths[1]]
    reason = stream.damaged[paths[1]]["reason"]
    if fault == "read error":
        assert reason.startswith("read error at byte") and "Input/output error" in reason
        read = stream.damaged[paths[1]]["samples"]  # the whole ones before the sample the error hit
        assert {k for k in keys if "s005" <= k <= "s009"} == {f"s{i:03d}" for i in range(5, 5 + read)}
        assert stream.skipped >= 1 and f"s{5 + read:03d}" not in keys
    else:
        assert reason.startswith("cannot be opened") and stream.skipped == 0
        assert not {f"s{i:03d}" for i in range(5, 10)} & set(keys)
    assert {f"s{i:03d}" for i in (*range(5), *range(10, 15))} <= set(keys)  # every other shard is used
    resumed = image_batches(paths, transform, 2, seed=0, shuffle_buffer=1, start=stream.state_dict())
    assert resumed.damaged == stream.damaged and resumed.skipped == stream.skipped


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_whose_shards_are_all_unreadable_stops_naming_them(tmp_path, workers):
    paths = _shards(tmp_path, 2, 3)
    for p in paths:
        open(p, "wb").write(b"\x01" * 2048)
    stream = text_batches(paths, None, 2, seed=0, workers=workers)
    with pytest.raises(AllShardsDamagedError) as err:
        next(stream)
    shown = str(err.value)
    assert "no sample could be used" in shown and "garbled" in shown
    # Decided over the stream, not per worker: with 2 workers too, both shards (one each) are named.
    assert [p for p in paths if p in shown] == paths


# ---------------------------------------------------------------- bad samples


def _sample(**members) -> dict:
    return {"__key__": "k", "__url__": "u.tar", **members}


def _bomb_png(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels."""
    data = bytearray(_png(0, "L", (1, 1)))
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.mark.parametrize("data, reason", [
    (b"", "zero-byte image"),
    (b"\xff\xd8 not really a jpeg", "UnidentifiedImageError"),
    (_bomb_png(MAX_IMAGE_PIXELS // 1000 + 1, 1001), "decompression bomb refused"),   # warning zone
    (_bomb_png(40000, 40000), "decompression bomb refused"),                         # PIL's error zone
])
def test_bad_images_are_refused(data, reason):
    with pytest.raises(SampleError, match=reason):
        decode_sample(_sample(png=data))


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_every_image_mode_becomes_rgb():
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    transparent = palette.copy()
    transparent.info["transparency"] = 1
    cases = {
        "cmyk": (_encoded(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", quality=100), (255, 0, 0)),
        "16-bit": (_encoded(Image.new("I;16", (4, 4), 65535), "PNG"), (255, 255, 255)),
        "palette": (_encoded(palette, "PNG"), (200, 10, 10)),
        "palette+transparency": (_encoded(transparent, "PNG"), (255, 255, 255)),
        "alpha": (_encoded(Image.new("RGBA", (4, 4), (0, 0, 255, 0)), "PNG"), (255, 255, 255)),
        "gray": (_encoded(Image.new("L", (4, 4), 77), "PNG"), (77, 77, 77)),
        "gray+alpha": (_encoded(Image.new("LA", (4, 4), (0, 255)), "PNG"), (0, 0, 0)),
    }
    for name, (data, rgb) in cases.items():
        image = decode_sample(_sample(png=data))["image"]
        assert image.mode == "RGB", name
        got = image.getpixel((1, 1))
        assert max(abs(a - b) for a, b in zip(got, rgb)) <= 3, (name, got)


def test_exif_rotated_jpegs_are_turned_upright():
    from PIL import ImageOps

    image = Image.new("RGB", (6, 2), (250, 0, 0))
    image.paste((0, 0, 250), (0, 0, 1, 2))  # blue left column
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    data = _encoded(image, "JPEG", exif=exif.tobytes(), quality=100)
    got = decode_sample(_sample(jpg=data))["image"]
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert got.size == (2, 6) == expected.size
    assert np.array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("text, reason", [
    (b"", "empty sentence"), (b"  \n\t ", "empty sentence"), (b"\xff\xfe caf\xe9", "UnicodeDecodeError"),
    ("\x00\x01\x07\u200b\x1b".encode(), "control characters only"),
])
def test_bad_sentences_are_refused(text, reason):
    with pytest.raises(SampleError, match=reason):
        decode_sample(_sample(txt=text))


def test_text_stream_skips_bad_sentences_and_counts_long_ones_as_truncated(tmp_path):
    sentences = {0: b"", 3: b"\xff\xfe", 5: b"\x00\x01\x02", 7: ("word " * 50).encode(), 9: ("word " * 5).encode()}
    with ShardWriter(tmp_path, maxcount=100) as w:
        for i in range(12):
            w.write(f"t{i:02d}", {"txt": sentences.get(i, f"short {i}".encode())})
    tokenizer = open_clip.SimpleTokenizer(context_length=8)
    stream = text_batches(w.paths, tokenizer, 3, seed=0, shuffle_buffer=1)
    batches = list(itertools.islice(stream, 6))  # 18 sentences: a pass and a half over the 9 good ones
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == 18 and not {"t00", "t03", "t05"} & set(keys)
    assert stream.skipped == 6  # 3 bad ones in each pass (the 9 good ones of pass two end at t11)
    assert stream.truncated == keys.count("t07") == 2  # t09 fits: 5 words + start + end = 7 tokens
    for b in batches:
        if "t07" in b["keys"]:
            row = b["tokens"][b["keys"].index("t07")]
            assert torch.equal(row, tokenizer([("word " * 50)])[0])  # cut as open_clip cuts it
            assert int(row[-1]) == tokenizer.eot_token_id


def test_eval_reports_damaged_shards_and_goes_on_with_the_others(tmp_path):
    from omegaconf import OmegaConf

    from dime_ds.config.schema import EvalConfig, EvalDatasetConfig
    from dime_ds.eval.report import write_report
    from dime_ds.eval.suite import evaluate_suite
    from tests.eval_fixtures import colour_encoder

    paths = _shards(tmp_path / "set", 3, 4)
    open(paths[0], "wb").write(b"\x01" * 4096)  # garbled from its first byte
    data = open(paths[2], "rb").read()
    open(paths[2], "wb").write(data[: len(data) // 2])
    cfg = OmegaConf.structured(EvalConfig(batch_size=2, workers=0))
    cfg.datasets["hurt"] = EvalDatasetConfig(path=str(tmp_path / "set"), task="retrieval")
    res = evaluate_suite(colour_encoder(), cfg, progress=False)["hurt"]
    read = len(list(iter_tar_samples([paths[2]]))) - 1  # the whole ones before the cut one
    assert res["images"] == 4 + read and res["skipped"] == 1  # shard 1 whole; the sample the cut hit
    assert [m.split(":")[0] for m in res["damaged_shards"]] == [f"damaged shard {p}" for p in (paths[0], paths[2])]
    assert "garbled" in res["damaged_shards"][0] and "truncated at byte" in res["damaged_shards"][1]
    _, path = write_report(tmp_path / "out", "suite", {"student": {"hurt": res}}, {"student": {}})
    assert f"hurt: damaged shard {paths[2]}: truncated at byte" in path.with_suffix(".md").read_text()
