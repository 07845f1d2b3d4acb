"""Damaged shards through the embed and match stages: the readable samples are embedded, the shard is
marked partial in the manifest and listed in the match report, the next embed run reads it again,
and a repaired shard (same name, new checksum) is embedded whole."""
from __future__ import annotations

import json
import shutil
import tarfile

import pytest

from dime_ds.cli import run_entry
from dime_ds.data.embeddings import read_manifest
from dime_ds.match.__main__ import main


def _overrides(work, world, teacher, *extra):
    return ["experiment=demo", f"work_dir={work}", f"data.root={world}", f"teacher.arch=local-dir:{teacher}",
            "device=cpu", "log.progress=false", "match.topk=4", "match.block_size=50", "match.shard_size=10",
            "match.stop_ratio=1.0", *extra]


def _cut_half(path) -> int:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data) // 2


def _samples(path) -> int:
    with tarfile.open(path) as tar:
        return len({m.name.split(".")[0] for m in tar.getmembers()})


@pytest.fixture()
def damaged_world(tmp_path, tiny_world):
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    image_shard = sorted((world / "images").glob("*.tar"))[0]
    text_shard = sorted((world / "texts").glob("*.tar"))[-1]
    originals = {image_shard: image_shard.read_bytes(), text_shard: text_shard.read_bytes()}
    cut = _cut_half(image_shard)
    text_shard.write_bytes(b"\x01garbled" * 300)  # not a tar at all: nothing readable
    return world, image_shard, text_shard, cut, originals


def test_embed_and_match_use_what_is_readable_and_report_the_damage(tmp_path, damaged_world, tiny_teacher_dir):
    world, image_shard, text_shard, cut, originals = damaged_world
    work = tmp_path / "work"
    assert run_entry(main, _overrides(work, world, tiny_teacher_dir, "stage=all")) == 0
    images, texts = (read_manifest(work / "embeddings" / m) for m in ("images", "texts"))
    (bad_image,) = [s for s in images["shards"] if s.get("partial")]
    (bad_text,) = [s for s in texts["shards"] if s.get("partial")]
    assert bad_image["source"] == str(image_shard) and bad_image["damaged"]["reason"] == f"truncated at byte {cut}"
    assert bad_image["count"] == bad_image["damaged"]["samples"] > 0  # the readable ones are embedded
    assert bad_text["source"] == str(text_shard) and bad_text["count"] == 0
    assert bad_text["damaged"]["reason"].startswith("garbled")
    good_images = sum(_samples(p) for p in (world / "images").glob("*.tar") if p != image_shard)
    assert images["count"] == good_images + bad_image["count"]  # every other shard whole
    # The sample the cut hit is listed as skipped; the garbled text shard lost no begun sample.
    assert [s["source"] for s in images["skipped"]] == [str(image_shard)]
    assert not [s for s in texts["skipped"] if s["source"] == str(text_shard)]

    report = json.loads((work / "grounded" / "report.json").read_text())
    assert report["images_matched"] == report["images"] == images["count"]  # matching went on
    assert report["damaged_shards"] == {
        "images": [{"source": str(image_shard), **bad_image["damaged"]}],
        "texts": [{"source": str(text_shard), **bad_text["damaged"]}]}
    assert f"`{image_shard}`: truncated at byte {cut}" in (work / "grounded" / "report.md").read_text()

    # A later run reads the partial shards again (only them); repaired, they are embedded whole.
    def written():
        return {p: p.stat().st_mtime_ns for p in (work / "embeddings").glob("*/*.record.json")}

    before = written()
    assert run_entry(main, _overrides(work, world, tiny_teacher_dir, "stage=embed")) == 0
    redone = {p.parent.name + "/" + p.name for p, t in written().items() if t != before[p]}
    assert redone == {f"images/{bad_image['name']}.record.json", f"texts/{bad_text['name']}.record.json"}
    for path, data in originals.items():
        path.write_bytes(data)
    assert run_entry(main, _overrides(work, world, tiny_teacher_dir, "stage=embed")) == 0
    images, texts = (read_manifest(work / "embeddings" / m) for m in ("images", "texts"))
    assert not [s for s in images["shards"] + texts["shards"] if s.get("partial")]
    assert images["count"] == good_images + _samples(image_shard) and not images["skipped"]
    assert [s["count"] for s in texts["shards"] if s["source"] == str(text_shard)] == [_samples(text_shard)]
