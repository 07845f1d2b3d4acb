"""The synthetic world: determinism, shard layout and counts, the text corpus, eval sets, pixels."""
from __future__ import annotations

import json
import re
import tarfile
from collections import Counter, defaultdict

import numpy as np
import pytest
import webdataset as wds
from omegaconf import OmegaConf

from dime_ds.config.demo_schema import SyntheticConfig
from dime_ds.demo import synthetic as syn
from dime_ds.data.pipelines import decode_sample
from dime_ds.data.shards import list_shards, sha256_file

TINY = dict(seed=3, image_size=32, n_images=40, n_texts=60, describing_fraction=0.25, n_paired=24,
            n_eval=20, shard_size=16, second_object_p=0.5)


def _cfg(**overrides):
    return OmegaConf.structured(SyntheticConfig(**{**TINY, **overrides}))


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    syn.write_world(out, _cfg(), progress=False)
    return out


def _read(directory, decode=False):
    # Decoding through the project's whitelist decoder: no pickle handler ever sees shard bytes.
    dataset = wds.WebDataset(list_shards(str(directory)), shardshuffle=False)
    return [_as_pil(s) for s in dataset] if decode else list(dataset)


def _as_pil(sample):
    decoded = decode_sample(sample)
    return {**sample, "jpg": decoded["image"]}


def _members(sample):
    return {k for k in sample if not k.startswith("__")}


def _tar_samples(directory):
    """key -> {ext: bytes}, straight from the tar files."""
    samples = defaultdict(dict)
    for path in list_shards(str(directory)):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples[key][ext] = tar.extractfile(m).read()
    return dict(samples)


def _shas(world):
    return {name: [s["sha256"] for s in entries] for name, entries in world["shards"].items()}


# ------------------------------------------------------------------------------------ determinism

def test_same_seed_is_byte_identical_other_seed_differs(tmp_path, world_dir):
    again = syn.write_world(tmp_path / "a", _cfg(), progress=False)
    first = json.loads((world_dir / "world.json").read_text())
    assert _shas(again) == _shas(first)
    assert (tmp_path / "a" / "world.json").read_bytes() == (world_dir / "world.json").read_bytes()
    for name, entries in again["shards"].items():  # the manifest tells the truth
        for entry in entries:
            assert sha256_file(tmp_path / "a" / entry["path"]) == entry["sha256"]

    other = syn.write_world(tmp_path / "b", _cfg(seed=4), progress=False)
    for name in first["shards"]:
        assert set(_shas(other)[name]).isdisjoint(_shas(first)[name]), name


def test_samples_do_not_depend_on_shard_size(tmp_path, world_dir):
    syn.write_world(tmp_path, _cfg(shard_size=7), progress=False)
    for subdir in ("images", "texts", "paired", "eval/shape"):
        assert _tar_samples(tmp_path / subdir) == _tar_samples(world_dir / subdir), subdir
    assert len(list_shards(str(tmp_path / "images"))) == 6  # ceil(40 / 7)


def test_existing_world_is_kept_and_changed_config_regenerates(tmp_path):
    out = tmp_path / "w"
    first = syn.write_world(out, _cfg(n_images=40), progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    assert syn.write_world(out, _cfg(n_images=40), progress=False) == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == stamps

    second = syn.write_world(out, _cfg(n_images=20), progress=False)  # 2 image shards instead of 3
    assert second["counts"]["images"] == 20
    assert len(list_shards(str(out / "images"))) == 2  # no stale shard from the bigger world
    assert not list(out.rglob("*.tmp"))


# ------------------------------------------------------------------------------ layout and counts

def test_world_json(world_dir):
    world = json.loads((world_dir / "world.json").read_text())
    assert world["format_version"] == syn.FORMAT_VERSION
    assert world["config"] == {**TINY, "head_skew": 0.0, "duplicate_fraction": 0.0} and world["seed"] == TINY["seed"]
    assert world["duplicates"] == {}
    assert world["counts"]["images"] == 40 and world["counts"]["texts"] == 60
    assert world["classnames"] == {"shape": list(syn.SHAPES), "colour": list(syn.COLOURS)}
    for name, entries in world["shards"].items():
        assert sum(e["samples"] for e in entries) == world["counts"][name]
        assert all(not e["path"].startswith("/") for e in entries)
    assert not list(world_dir.rglob("*.tmp"))


@pytest.mark.parametrize("subdir, members, count", [
    ("images", {"jpg", "json"}, 40),
    ("texts", {"txt", "json"}, 60),
    ("paired", {"jpg", "txt", "json"}, 24),
    ("eval/shape", {"jpg", "cls", "json"}, 20),
    ("eval/colour", {"jpg", "cls", "json"}, 20),
])
def test_split_members_and_counts(world_dir, subdir, members, count):
    samples = _read(world_dir / subdir)
    assert len(samples) == count
    assert len({s["__key__"] for s in samples}) == count
    assert all(_members(s) == members for s in samples)


@pytest.mark.parametrize("subdir", ["images", "paired", "eval/colour"])
def test_images_decode_to_configured_size(world_dir, subdir):
    for sample in _read(world_dir / subdir, decode=True):
        assert sample["jpg"].mode == "RGB" and sample["jpg"].size == (32, 32)


def test_unpaired_images_avoid_held_out_combinations(world_dir):
    for sample in _read(world_dir / "images"):
        scene = json.loads(sample["json"])
        assert 1 <= len(scene["objects"]) <= 2
        for obj in scene["objects"]:
            assert (obj["shape"], obj["colour"]) not in syn.HELD_OUT


def test_eval_labels_and_classnames(world_dir):
    for task, classnames in (("shape", list(syn.SHAPES)), ("colour", list(syn.COLOURS))):
        assert (world_dir / "eval" / task / "classnames.txt").read_text().splitlines() == classnames
        labels = []
        for sample in _read(world_dir / "eval" / task):
            label = int(sample["cls"].decode("ascii"))
            meta = json.loads(sample["json"])
            assert 0 <= label < len(classnames) and meta["label"] == label
            (obj,) = meta["scene"]["objects"]
            assert obj[task] == classnames[label] == meta["classname"]
            labels.append(label)
        counts = Counter(labels)
        assert max(counts.values()) - min(counts.values()) <= 1  # balanced


# ------------------------------------------------------------------------------------ text corpus

def _words(text):
    return set(re.findall(r"[a-z]+", text))


def test_text_corpus_kinds_and_references(world_dir):
    images = {s["__key__"]: json.loads(s["json"]) for s in _read(world_dir / "images")}
    texts = [(s["txt"].decode(), json.loads(s["json"])) for s in _read(world_dir / "texts")]
    kinds = Counter(meta["kind"] for _, meta in texts)
    assert kinds["describing"] == round(60 * 0.25) == 15
    assert kinds["other_scene"] + kinds["nonvisual"] == 45 and abs(kinds["other_scene"] - kinds["nonvisual"]) <= 1

    described = [meta["image_key"] for _, meta in texts if meta["kind"] == "describing"]
    assert len(set(described)) == len(described) and set(described) <= set(images)
    for text, meta in texts:
        if meta["kind"] == "describing":
            first = images[meta["image_key"]]["objects"][0]
            assert f"{first['colour']} {first['shape']}" in text
        elif meta["kind"] == "nonvisual":
            assert not _words(text) & (set(syn.SHAPES) | set(syn.COLOURS) | {"left", "right", "top", "bottom"})
        elif meta["source"] == "held_out_combination":
            assert any(f"{c} {s}" in text for s, c in syn.HELD_OUT), text
        else:
            assert meta["source"] == "unseen_object" and not _words(text) & set(syn.SHAPES)
    sources = Counter(meta.get("source") for _, meta in texts if meta["kind"] == "other_scene")
    assert abs(sources["held_out_combination"] - sources["unseen_object"]) <= 1
    # Shuffled: the kinds are not laid out in blocks.
    order = [meta["kind"] for _, meta in texts]
    assert order != sorted(order, key=["describing", "other_scene", "nonvisual"].index)


def test_too_many_describing_sentences_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="distinct images"):
        syn.write_world(tmp_path, _cfg(n_texts=400, describing_fraction=0.5), progress=False)
    assert not (tmp_path / "world.json").exists()


def test_paired_captions_describe_their_scene(world_dir):
    for sample in _read(world_dir / "paired"):
        first = json.loads(sample["json"])["objects"][0]
        assert f"{first['colour']} {first['shape']}" in sample["txt"].decode()


def test_caption_grammar_variety():
    scene = {"background": "white",
             "objects": [{"shape": "circle", "colour": "orange", "size": "large", "position": "left"}]}
    captions = {syn.caption(scene, np.random.default_rng(i)) for i in range(200)}
    assert len(captions) > 10
    assert all("orange circle" in c and "a orange" not in c for c in captions)
    assert "a large orange circle on the left" in captions or "an orange circle on the left" in captions


# ----------------------------------------------------------------------------------------- pixels

def _foreground_mean(image, background):
    pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3)
    far = np.abs(pixels - np.asarray(background)).sum(axis=1) > 90
    assert far.sum() > 20
    return pixels[far].mean(axis=0)


@pytest.mark.parametrize("colour", list(syn.COLOURS))
def test_object_pixels_are_closest_to_their_colour(colour):
    scene = {"background": "gray",
             "objects": [{"shape": "square", "colour": colour, "size": "large", "position": "center"}]}
    image = syn.render_scene(scene, 64, np.random.default_rng(0))
    # Through JPEG, as the shards store it.
    from io import BytesIO
    from PIL import Image
    decoded = Image.open(BytesIO(syn.encode_jpeg(image))).convert("RGB")
    mean = _foreground_mean(decoded, syn.BACKGROUNDS["gray"])
    nearest = min(syn.COLOURS, key=lambda name: np.linalg.norm(mean - np.asarray(syn.COLOURS[name])))
    assert nearest == colour


def test_render_is_deterministic_and_positions_show():
    scene = {"background": "black",
             "objects": [{"shape": "circle", "colour": "yellow", "size": "small", "position": "left"}]}
    a = np.asarray(syn.render_scene(scene, 48, np.random.default_rng(7)))
    b = np.asarray(syn.render_scene(scene, 48, np.random.default_rng(7)))
    assert np.array_equal(a, b)
    bright = np.argwhere(a.sum(axis=2) > 300)
    assert bright[:, 1].mean() < 24  # the object sits in the left half


def test_all_shapes_render_distinct_masks():
    masks = []
    for shape in syn.SHAPES:
        scene = {"background": "black",
                 "objects": [{"shape": shape, "colour": "red", "size": "large", "position": "center"}]}
        masks.append(np.asarray(syn.render_scene(scene, 64, np.random.default_rng(0)))[..., 0] > 120)
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert (masks[i] != masks[j]).mean() > 0.01, (syn.SHAPES[i], syn.SHAPES[j])


# -------------------------------------------------------------------------------------------- CLI

def test_cli_writes_world_and_prints_summary(tmp_path, capsys):
    overrides = [f"data.synthetic.{k}={v}" for k, v in TINY.items()]
    assert syn.main(["--out", str(tmp_path), *overrides]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and lines[0].startswith("images") and "40 samples" in lines[0]
    assert lines[5].startswith("eval_captions")
    from dime_ds.data.pipelines import decode_sample, iter_tar_samples
    from dime_ds.data.shards import list_shards

    samples = [decode_sample(s) for s in iter_tar_samples(list_shards(str(tmp_path / "eval" / "captions")))]
    assert len(samples) == TINY["n_eval"]
    assert all(len(s["text"].splitlines()) == 2 and s["image"] for s in samples)  # two captions per image
    assert json.loads((tmp_path / "world.json").read_text())["config"] == {**TINY, "head_skew": 0.0,
                                                                          "duplicate_fraction": 0.0}


# ------------------------------------------------------------------ head-heavy corpus, duplicates, metadata

def test_head_skew_makes_describing_sentences_follow_zipf_over_shapes():
    c = syn.config_values(_cfg(n_images=800, n_texts=2000, describing_fraction=0.5, head_skew=1.5))
    duplicates = syn.duplicate_plan(c)
    targets = [arg for kind, arg in syn.text_plan(c) if kind == "describing"]
    shapes = Counter(syn._scene_of(c, t, duplicates)["objects"][0]["shape"] for t in targets)
    share = (np.arange(len(syn.SHAPES)) + 1.0) ** -1.5
    expected = 1000 * share / share.sum()
    for k, shape in enumerate(syn.SHAPES):  # binomial: 4 standard deviations
        sd = np.sqrt(expected[k] * (1 - expected[k] / 1000))
        assert abs(shapes[shape] - expected[k]) < 4 * sd + 1, (shape, shapes[shape], expected[k])
    assert len(set(targets)) < len(targets)  # head images are described several times
    # the default keeps one sentence per distinct image, as before
    flat = [a for kind, a in syn.text_plan(syn.config_values(_cfg())) if kind == "describing"]
    assert len(set(flat)) == len(flat)


def test_duplicates_are_their_source_with_noise_of_their_own(tmp_path):
    out = tmp_path / "w"
    world = syn.write_world(out, _cfg(duplicate_fraction=0.25), progress=False)
    assert len(world["duplicates"]) == 10
    samples = {s["__key__"]: s for s in _read(out / "images", decode=True)}
    for dup, src in world["duplicates"].items():
        assert src not in world["duplicates"]  # a copy of an original, never of a copy
        scene = json.loads(samples[dup]["json"])
        assert scene.pop("duplicate_of") == src and scene == json.loads(samples[src]["json"])
        a, b = (np.asarray(samples[k]["jpg"], dtype=np.float32) for k in (dup, src))
        assert 0 < np.abs(a - b).mean() < 8  # near, not identical: own noise and re-encoding


def test_metadata_lists_the_world_concepts_once_and_every_visual_sentence_matches(world_dir):
    from dime_ds.curate.metaclip import match

    entries = (world_dir / syn.METADATA).read_text().splitlines()
    assert len(entries) == len(set(entries)) and set(syn.SHAPES) | set(syn.COLOURS) <= set(entries)
    texts = [(s["txt"].decode(), json.loads(s["json"])["kind"]) for s in _read(world_dir / "texts")]
    matched = match([t for t, _ in texts], entries)
    for (text, kind), m in zip(texts, matched):
        assert m or kind == "nonvisual", text  # every describing / other-scene sentence names a concept
    # the objects-only list: the same entries in the same order less the attribute words, and a
    # describing sentence still matches it (it names its shape)
    objects = (world_dir / syn.METADATA_OBJECTS).read_text().splitlines()
    attributes = {*syn.COLOUR_NAMES, *syn.SIZES, *syn.POSITIONS, "middle", *syn.BACKGROUNDS}
    assert objects == [e for e in entries if e not in attributes] and set(syn.SHAPES) <= set(objects)
    for (text, kind), m in zip(texts, match([t for t, _ in texts], objects)):
        assert m or kind != "describing", text
