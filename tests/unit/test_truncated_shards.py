"""A shard cut short (a copy that stopped, a full disk) yields its readable samples; the sample it
was cut in is skipped and counted, and a warning names the shard and the byte it ends at."""
from __future__ import annotations

import io
import itertools
import logging
import tarfile

import pytest
from PIL import Image

from dime_ds.data.pipelines import SampleError, decode_sample, iter_tar_samples
from dime_ds.data.shards import ShardWriter, list_shards
from dime_ds.data.streams import ShardStream


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10 * i, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _shard(directory, n=5):
    with ShardWriter(directory, prefix="cut", maxcount=100) as w:
        for i in range(n):
            w.write(f"s{i}", {"png": _png(i), "txt": f"rgb {10 * i} 20 30".encode(), "cls": str(i % 2).encode()})
    return list_shards(str(directory))[0]


def _cut(url, tmp_path, where) -> tuple[str, int]:
    """A copy of the shard cut at `where`(members by name) -> byte offset."""
    with tarfile.open(url) as tar:
        members = {m.name: m for m in tar.getmembers()}
    byte = where(members)
    out = tmp_path / "short" / "cut-000000.tar"
    out.parent.mkdir(exist_ok=True)
    with open(url, "rb") as f:
        out.write_bytes(f.read()[:byte])
    return str(out), byte


# The first member of sample s3, wherever ShardWriter puts it.
def _first_of_s3(m):
    return min((v for k, v in m.items() if k.startswith("s3.")), key=lambda v: v.offset)


CUTS = {
    "mid-data": (lambda m: m["s3.png"].offset_data + 7, ["s0", "s1", "s2"], "s3"),
    "data absent": (lambda m: _first_of_s3(m).offset_data, ["s0", "s1", "s2"], "s3"),
    # Cut in a header or between members: which sample the lost members belonged to is unknown, so
    # the last sample read may be incomplete and is skipped too.
    "mid-header": (lambda m: _first_of_s3(m).offset + 100, ["s0", "s1"], "s2"),
    "member boundary": (lambda m: _first_of_s3(m).offset, ["s0", "s1"], "s2"),
    "mid-data of the last sample": (lambda m: m["s4.png"].offset_data + 7, ["s0", "s1", "s2", "s3"], "s4"),
}


@pytest.mark.parametrize("case", CUTS)
def test_a_cut_shard_yields_its_readable_samples_and_marks_the_cut_one(tmp_path, caplog, case):
    where, readable, cut_key = CUTS[case]
    full = list(iter_tar_samples([_shard(tmp_path / "full")]))
    url, byte = _cut(list_shards(str(tmp_path / "full"))[0], tmp_path, where)
    with caplog.at_level(logging.WARNING):
        got = list(iter_tar_samples([url]))
    assert [s["__key__"] for s in got] == readable + [cut_key]
    for sample, whole in zip(got[:-1], full):  # the readable ones are read whole
        assert {k: v for k, v in sample.items() if k != "__url__"} == \
            {k: v for k, v in whole.items() if k != "__url__"}
    assert got[-1]["__truncated__"] == byte
    with pytest.raises(SampleError, match=f"{cut_key} in .*cut-000000.tar.*truncated at byte {byte}"):
        decode_sample(got[-1])
    assert f"{url} is damaged: truncated at byte {byte}" in caplog.text


def test_complete_and_empty_shards_are_not_truncated(tmp_path, caplog):
    url = _shard(tmp_path / "full")
    empty = tmp_path / "empty-000000.tar"
    tarfile.open(empty, "w").close()
    with caplog.at_level(logging.WARNING):
        assert [s["__key__"] for s in iter_tar_samples([url, str(empty)])] == [f"s{i}" for i in range(5)]
    assert "truncated" not in caplog.text
    with open(url, "rb") as f:  # cut inside the end-of-archive blocks: every member is there
        data = f.read()
    (tmp_path / "tail-000000.tar").write_bytes(data[:len(data) - 2048])
    assert len(list(iter_tar_samples([str(tmp_path / "tail-000000.tar")]))) == 5


def test_training_stream_counts_the_cut_sample_as_skipped(tmp_path):
    url, _ = _cut(_shard(tmp_path / "full"), tmp_path, CUTS["mid-data"][0])
    stream = ShardStream([url], lambda s: s["key"], shuffle_buffer=1, fields=("png",))
    assert list(itertools.islice(iter(stream), 4)) == ["s0", "s1", "s2", "s0"]  # epoch 1 begins past s3
    assert stream.skipped == 1


def test_eval_counts_the_cut_sample_as_skipped(tmp_path):
    from omegaconf import OmegaConf

    from dime_ds.config.schema import EvalConfig, EvalDatasetConfig
    from dime_ds.eval.suite import evaluate_suite
    from tests.eval_fixtures import colour_encoder

    url, _ = _cut(_shard(tmp_path / "full"), tmp_path, CUTS["member boundary"][0])
    cfg = OmegaConf.structured(EvalConfig(batch_size=2, workers=0))
    cfg.datasets["cut"] = EvalDatasetConfig(path=str(tmp_path / "short"), task="retrieval")
    res = evaluate_suite(colour_encoder(), cfg, progress=False)["cut"]
    assert res["images"] == 2 and res["skipped"] == 1  # s2 looks whole but may not be
