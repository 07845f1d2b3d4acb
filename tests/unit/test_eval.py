"""Evaluation: zero-shot equals a direct computation, retrieval recall is exact on known pairs, the
linear probe learns, ImageFolder reads like shards, and a suite with a missing dataset finishes."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from dime_ds.config.schema import EvalConfig, EvalDatasetConfig
from tests.eval_fixtures import (colour_encoder, openclip_encoder, shards_to_imagefolder, solid_colours,
                                 write_retrieval_shards)


def eval_cfg(**datasets) -> EvalConfig:
    cfg = OmegaConf.structured(EvalConfig(batch_size=7, workers=0))
    for name, (path, task) in datasets.items():
        cfg.datasets[name] = EvalDatasetConfig(path=str(path), task=task)
    return cfg


# ------------------------------------------------------------------------------ zero-shot
def _direct_zero_shot(model_dir, data_dir):
    """CLIP zero-shot written out with open_clip alone: tarfile + PIL, the model's own preprocess."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    model.eval()
    classnames = (data_dir / "classnames.txt").read_text().split("\n")[:-1]
    templates = (data_dir / "templates.txt").read_text().split("\n")[:-1]
    with torch.no_grad():
        weights = []
        for c in classnames:
            e = F.normalize(model.encode_text(tokenizer([t.replace("{}", c) for t in templates])), dim=-1)
            weights.append(F.normalize(e.mean(0), dim=0))
        weights = torch.stack(weights, 1)
        feats, labels = [], []
        for tar_path in sorted(data_dir.glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                members = {m.name: m for m in tar.getmembers()}
                for name in sorted(n for n in members if n.endswith(".jpg")):
                    key = name[:-4]
                    img = Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB")
                    feats.append(F.normalize(model.encode_image(preprocess(img)[None]), dim=-1)[0])
                    labels.append(int(tar.extractfile(members[key + ".cls"]).read()))
    feats, labels = torch.stack(feats), torch.tensor(labels)
    scores = feats @ weights
    top1 = (scores.argmax(1) == labels).float().mean().item()
    top5 = (scores.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    return feats, labels, top1, top5


def test_zero_shot_equals_direct_computation(tiny_world, tiny_teacher_dir):
    from dime_ds.eval.features import extract
    from dime_ds.eval.sources import open_split
    from dime_ds.eval.suite import evaluate_suite

    data = tiny_world / "eval" / "shape"
    feats, labels, top1, top5 = _direct_zero_shot(tiny_teacher_dir, data)
    encoder = openclip_encoder(tiny_teacher_dir)
    ours = extract(open_split(data, "test"), encoder, batch_size=5, progress=False)
    torch.testing.assert_close(ours.image, feats, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.labels, labels)
    result = evaluate_suite(encoder, eval_cfg(shape=(data, "zeroshot")), progress=False)["shape"]
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)
    assert result["n"] == len(labels) == 32 and result["classes"] == 8


def test_imagefolder_reads_like_shards(tiny_world, tiny_teacher_dir, tmp_path):
    from dime_ds.eval.suite import evaluate_suite

    data = tiny_world / "eval" / "colour"
    names = (data / "classnames.txt").read_text().split()
    folder = shards_to_imagefolder(data, tmp_path / "colour_folder", names)
    (folder / "templates.txt").write_text((data / "templates.txt").read_text())
    encoder = openclip_encoder(tiny_teacher_dir)
    cfg = eval_cfg(shards=(data, "zeroshot"), folder=(folder, "zeroshot"))
    res = evaluate_suite(encoder, cfg, progress=False)
    assert res["folder"]["n"] == res["shards"]["n"] == 32
    assert res["folder"]["top1"] == res["shards"]["top1"] and res["folder"]["top5"] == res["shards"]["top5"]


def test_builtin_imagenet_names_and_templates():
    from dime_ds.eval.templates import load_classnames, load_templates

    assert len(load_classnames("imagenet")) == 1000 and load_classnames("imagenet")[0] == "tench"
    templates = load_templates("openai_imagenet")
    assert len(templates) == 80 and all("{}" in t for t in templates)
    with pytest.raises(FileNotFoundError, match="neither a built-in set"):
        load_templates("no_such_set")


# ------------------------------------------------------------------------------ retrieval
def _reference_recall(image, text, owner, k):
    """Loop transcription: rank = candidates scoring strictly higher than the best true one."""
    i2t = t2i = 0
    for i in range(len(image)):
        s = text @ image[i]
        own = [s[j] for j in range(len(text)) if owner[j] == i]
        if own:  # an image without captions is a miss
            i2t += int(sum(1 for j in range(len(text)) if s[j] > max(own)) < k)
    for j in range(len(text)):
        s = image @ text[j]
        t2i += int(sum(1 for i in range(len(image)) if s[i] > s[owner[j]]) < k)
    return i2t / len(image), t2i / len(text)


def test_retrieval_recall_matches_loop_reference():
    from dime_ds.eval.retrieval import retrieval_metrics

    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(40, 6, generator=gen), dim=-1)
    owner = torch.arange(40).repeat_interleave(3)[:100]  # image 33 owns one caption, 34..39 none
    text = F.normalize(image[owner] + 0.8 * torch.randn(len(owner), 6, generator=gen), dim=-1)
    got = retrieval_metrics(image, text, owner, ks=(1, 5, 10), block=7)
    for k in (1, 5, 10):
        i2t, t2i = _reference_recall(image, text, owner, k)
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert 0 < got["text_to_image_R@1"] < got["text_to_image_R@10"] < 1


@pytest.mark.parametrize("shard_size", [64, 5])
def test_retrieval_exact_on_known_pairs(tmp_path, shard_size):
    """Every image's first caption is its exact colour, its second the next image's: image->text R@1
    is 100 %, text->image R@1 exactly 50 % (decoys rank their own image below an exact match)."""
    from dime_ds.eval.suite import evaluate_suite

    colours = solid_colours(24)
    data = write_retrieval_shards(tmp_path / "pairs", colours, shard_size)
    enc = colour_encoder()
    v = F.normalize((torch.tensor(colours, dtype=torch.float) / 255 - 0.5) / 0.25, dim=-1)
    off_diag = (v @ v.t() - 2 * torch.eye(len(v))).max().item()
    assert off_diag < 1 - 1e-4  # the premise: no two colours share a direction
    res = evaluate_suite(enc, eval_cfg(pairs=(data, "retrieval")), progress=False)["pairs"]
    assert res["images"] == 24 and res["texts"] == 48
    assert res["image_to_text_R@1"] == 1.0
    assert res["text_to_image_R@1"] == 0.5
    assert res["text_to_image_R@10"] >= 0.5


# ------------------------------------------------------------------------------ linear probe
def test_linear_probe_separable_and_random_labels():
    from dime_ds.eval.linear_probe import linear_probe

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=gen) * 3
    y = torch.arange(500) % 5
    x = centres[y] + torch.randn(500, 16, generator=gen)
    res = linear_probe(x[:400], y[:400], x[400:], y[400:], regs=[1e-4, 1e-2, 1.0])
    assert res["top1"] > 0.95 and res["reg"] in (1e-4, 1e-2, 1.0) and set(res["sweep"]) == {1e-4, 1e-2, 1.0}
    noise = linear_probe(x[:400], y[torch.randperm(500, generator=gen)][:400], x[400:], y[400:], regs=[1e-2, 1.0])
    assert noise["top1"] < 0.45  # shuffled labels: nothing to learn, near chance (0.2)


def test_linear_probe_on_labelled_set_beats_chance(tmp_path, tiny_teacher_dir):
    from dime_ds.config.demo_schema import SyntheticConfig
    from dime_ds.demo.synthetic import write_world
    from dime_ds.eval.suite import evaluate_suite

    world = tmp_path / "world"
    write_world(world, OmegaConf.structured(SyntheticConfig(
        seed=5, image_size=32, n_images=8, n_texts=8, n_paired=8, n_eval=320, shard_size=160)), progress=False)
    res = evaluate_suite(openclip_encoder(tiny_teacher_dir),
                         eval_cfg(colour=(world / "eval" / "colour", "linear_probe")), progress=False)["colour"]
    assert res["train"] == 160 and res["test"] == 160 and res["classes"] == 8
    assert res["top1"] > 0.3, res  # chance: 0.125; a random 32-d tower gets about 0.48


# ------------------------------------------------------------------------------ suites
def test_suite_with_missing_and_broken_datasets_finishes(tiny_world, tiny_teacher_dir, tmp_path):
    from dime_ds.eval.report import write_report
    from dime_ds.eval.suite import evaluate_suite

    (tmp_path / "empty").mkdir()
    cfg = eval_cfg(shape=(tiny_world / "eval" / "shape", "zeroshot"), gone=(tmp_path / "nope", "zeroshot"),
                   empty=(tmp_path / "empty", "zeroshot"))
    res = evaluate_suite(openclip_encoder(tiny_teacher_dir), cfg, progress=False)
    assert res["gone"] == {"task": "zeroshot", "missing": True, "path": str(tmp_path / "nope")}
    assert "neither *.tar shards nor an ImageFolder" in res["empty"]["error"]
    assert res["shape"]["n"] == 32
    table, path = write_report(tmp_path / "out", "s", {"model": res}, {"model": {}})
    assert "missing" in table and "gone" in table
    saved = json.loads(path.read_text())
    assert saved["missing"] == [f"gone ({tmp_path / 'nope'})"] and len(saved["errors"]) == 1
    assert (tmp_path / "out" / "s.md").read_text().startswith("| dataset | metric (%) | model |")


def test_loader_workers_keep_single_process_order(tmp_path):
    from tests.multirank.test_eval_dist import extract_counting

    data = write_retrieval_shards(tmp_path / "pairs", solid_colours(23, seed=1), 9)
    ref = extract_counting(0, 1, data, True, 0, False)
    for got, want in zip(extract_counting(0, 1, data, True, 2, False)[:4], ref[:4]):
        assert torch.equal(got, want)


def test_split_subdirectories(tmp_path):
    from dime_ds.eval.sources import EvalDataError, open_split

    write_retrieval_shards(tmp_path / "d" / "test", solid_colours(4), 4)
    assert open_split(tmp_path / "d", "test").data_dir == tmp_path / "d" / "test"
    with pytest.raises(EvalDataError, match="has no val/ split"):
        open_split(tmp_path / "d", "val")


def test_eval_cli_reports_missing_dataset_and_refuses_bad_model(tiny_world, tiny_teacher_dir, tmp_path):
    out = tmp_path / "report"
    common = [sys.executable, "-m", "dime_ds.eval", f"work_dir={tmp_path}", f"data.root={tiny_world}",
              "log.progress=false", "eval.workers=0"]
    run = subprocess.run([*common, f"model={tiny_teacher_dir}", "suite=synthetic", f"eval.out_dir={out}",
                          f"eval.datasets.colour.path={tmp_path}/missing"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    saved = json.loads((out / "synthetic.json").read_text())
    assert saved["results"]["model"]["colour"]["missing"] is True
    assert saved["results"]["model"]["shape"]["n"] == 32
    assert set(saved["results"]["model"]) == {"shape", "colour", "captions", "shape_probe"}
    assert "missing, skipped: colour" in run.stdout
    bad = subprocess.run([*common, f"model={tmp_path}/no/such/model", "suite=synthetic"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "no/such/model" in bad.stderr and "Traceback" not in bad.stderr
    no_suite = subprocess.run([sys.executable, "-m", "dime_ds.eval", f"work_dir={tmp_path}",
                               f"model={tiny_teacher_dir}"], capture_output=True, text=True, timeout=120)
    assert no_suite.returncode == 2 and "no evaluation datasets: pick a suite" in no_suite.stderr, no_suite.stderr


@pytest.mark.parametrize("module", ["dime_ds.eval", "dime_ds.distill"])
def test_help_prints_usage_not_a_grammar_error(module):
    run = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and f"python -m {module}" in run.stdout and "Hydra overrides" in run.stdout, run.stderr


def test_corrupt_and_captionless_samples_are_skipped_and_counted(tmp_path):
    from dime_ds.data.shards import ShardWriter
    from dime_ds.eval.suite import evaluate_suite

    data = write_retrieval_shards(tmp_path / "pairs", solid_colours(6), 6)
    with ShardWriter(data, prefix="zz-bad", maxcount=10) as w:
        w.write("corrupt", {"png": b"\x89PNG\r\n\x1a\n truncated", "txt": b"rgb 1 2 3", "cls": b"0"})
        w.write("no-caption", {"png": _solid_png(), "cls": b"1"})
    cfg = eval_cfg(pairs=(data, "retrieval"), labels=(data, "zeroshot"))
    cfg.datasets["labels"].classnames = str(tmp_path / "names.txt")
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    res = evaluate_suite(colour_encoder(), cfg, progress=False)
    assert res["pairs"]["images"] == 6 and res["pairs"]["skipped"] == 2  # corrupt + no caption
    assert res["labels"]["n"] == 7 and res["labels"]["skipped"] == 1  # a caption is not needed there


def _solid_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_openclip_name_with_a_weights_file_evaluates_like_its_directory(tiny_world, tiny_teacher_dir, tmp_path):
    """`model=<architecture> pretrained=<weights file>`: the offline form of an OpenCLIP name + tag."""
    import open_clip

    from dime_ds.eval.models import openclip_encoder as load
    from dime_ds.eval.suite import evaluate_suite

    config = json.loads((tiny_teacher_dir / "open_clip_config.json").read_text())
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "dime-tiny-eval.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(tmp_path / "cfgs")
    by_name = load("dime-tiny-eval", str(tiny_teacher_dir / "open_clip_model.safetensors"), "fp32",
                   torch.device("cpu"), "by name")
    cfg = eval_cfg(shape=(tiny_world / "eval" / "shape", "zeroshot"))
    assert evaluate_suite(by_name, cfg, progress=False) == evaluate_suite(openclip_encoder(tiny_teacher_dir), cfg,
                                                                         progress=False)
    with pytest.raises(Exception, match="no such weights file"):
        load("dime-tiny-eval", str(tmp_path / "missing.safetensors"), "fp32", torch.device("cpu"), "x")


def _folder_tree(root, classes, per_class=2):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / c / f"{i}.png").write_bytes(_solid_png())
    return root


def test_imagefolder_labels_numbered_folders_and_train_classes(tmp_path):
    from dime_ds.eval.sources import EvalDataError, open_split

    numbered = open_split(_folder_tree(tmp_path / "v2" / "test", [str(i) for i in range(12)]), "test")
    assert numbered.folder_classes[:3] == ["0", "1", "2"] and numbered.folder_classes[-1] == "11"  # not 0, 1, 10
    assert [label for _, label in numbered.files][::2] == list(range(12))
    train = open_split(_folder_tree(tmp_path / "d" / "train", ["ant", "bee", "cat"]), "train")
    test = open_split(_folder_tree(tmp_path / "d" / "test", ["ant", "cat"]), "test", classes=train.folder_classes)
    assert sorted({label for _, label in test.files}) == [0, 2]  # cat keeps its train label
    _folder_tree(tmp_path / "d" / "test", ["dog"])
    with pytest.raises(EvalDataError, match="dog"):
        open_split(tmp_path / "d", "test", classes=train.folder_classes)


def test_imagefolder_with_fewer_folders_than_class_names_is_an_error(tmp_path):
    from dime_ds.eval.suite import evaluate_suite

    data = _folder_tree(tmp_path / "d" / "test", ["a", "b"])
    cfg = eval_cfg(d=(tmp_path / "d", "zeroshot"))
    cfg.datasets["d"].classnames = "imagenet"
    res = evaluate_suite(colour_encoder(), cfg, progress=False)["d"]
    assert "2 class folders but 1000 class names" in res["error"], data


def test_headline_uses_the_datasets_metric(tmp_path):
    from dime_ds.eval.report import table_rows

    a = {"task": "zeroshot", "metric": "mean_per_class", "top1": 0.5, "mean_per_class": 0.25}
    b = {"task": "zeroshot", "metric": "top1", "top1": 0.75, "mean_per_class": 0.7}
    header, rows = table_rows({"m": {"a": a, "b": b}})
    assert rows[0] == ["a", "zero-shot mean per-class", "25.0"] and rows[1] == ["b", "zero-shot top-1", "75.0"]
    assert rows[2] == ["mean of 2", "zeroshot, each set's metric", "50.0"]


def test_home_relative_dataset_paths_keep_the_train_split(tmp_path, monkeypatch):
    from dime_ds.eval.sources import has_split

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ds" / "train").mkdir(parents=True)
    assert has_split("~/ds", "train")


# ------------------------------------------------------------------------------ labels vs class names
def test_imagefolder_named_by_class_is_labelled_by_name_in_any_order(tiny_world, tiny_teacher_dir, tmp_path):
    """Folders named after their classes, classnames.txt in another order: each folder takes its
    name's index, so the accuracy is the shards' (not a shuffled labelling's)."""
    from dime_ds.eval.sources import open_split, with_class_names
    from dime_ds.eval.suite import evaluate_suite

    data = tiny_world / "eval" / "colour"
    names = (data / "classnames.txt").read_text().split()
    folder = shards_to_imagefolder(data, tmp_path / "named", names, by_name=True)
    (folder / "templates.txt").write_text((data / "templates.txt").read_text())
    reordered = names[3:] + names[:3]
    (folder / "classnames.txt").write_text("\n".join(reordered) + "\n")
    split = with_class_names(open_split(folder, "test"), reordered)
    assert all(reordered[label] == Path(path).parent.name for path, label in split.files)
    res = evaluate_suite(openclip_encoder(tiny_teacher_dir), eval_cfg(shards=(data, "zeroshot"),
                                                                      folder=(folder, "zeroshot")), progress=False)
    assert res["folder"]["n"] == res["shards"]["n"] == 32
    assert res["folder"]["top1"] == res["shards"]["top1"] and res["folder"]["top5"] == res["shards"]["top5"]


def test_folder_names_match_class_names_with_underscores_and_ids_keep_sorted_order(tmp_path):
    from dime_ds.eval.sources import open_split, with_class_names

    named = open_split(_folder_tree(tmp_path / "a", ["sea_lion", "ant"]), "test")
    assert {Path(p).parent.name: label for p, label in with_class_names(named, ["sea lion", "ant"]).files} == \
        {"sea_lion": 0, "ant": 1}
    # Folder ids that name no class (ImageNet's wnids): label = sorted folder order, as documented.
    ids = open_split(_folder_tree(tmp_path / "b", ["n02", "n01"]), "test")
    assert {Path(p).parent.name: label for p, label in with_class_names(ids, ["zebra", "ant"]).files} == \
        {"n01": 0, "n02": 1}


def test_imagefolder_with_some_folders_not_class_names_is_refused(tmp_path):
    from dime_ds.eval.suite import evaluate_suite

    data = _folder_tree(tmp_path / "d" / "test", ["ant", "bee", "n0042"])
    (tmp_path / "d" / "classnames.txt").write_text("bee\nant\ncat\n")
    res = evaluate_suite(colour_encoder(), eval_cfg(d=(tmp_path / "d", "zeroshot")), progress=False)["d"]
    assert "class folder 'n0042' is not a class name, but 'ant' is" in res["error"], data


def test_cls_label_beyond_the_class_names_is_refused_naming_the_sample(tmp_path):
    from dime_ds.eval.suite import evaluate_suite

    data = write_retrieval_shards(tmp_path / "pairs", solid_colours(6), 6)  # cls = i % 3: labels 0..2
    (data / "classnames.txt").write_text("a\nb\n")
    res = evaluate_suite(colour_encoder(), eval_cfg(labels=(data, "zeroshot")), progress=False)["labels"]
    assert "sample s00002 in" in res["error"] and "shard-000000.tar" in res["error"]
    assert "label 2, but there are 2 class names" in res["error"]
    (data / "classnames.txt").write_text("a\nb\nc\n")
    assert evaluate_suite(colour_encoder(), eval_cfg(labels=(data, "zeroshot")), progress=False)["labels"]["n"] == 6


def test_duplicate_class_names_in_a_file_are_refused_but_builtins_are_trusted(tmp_path):
    from dime_ds.eval.templates import ClassNamesError, load_classnames
    from dime_ds.eval.suite import evaluate_suite
    from dime_ds.errors import UserError

    (tmp_path / "names.txt").write_text("cat\ndog\ncrane\ndog\n")
    with pytest.raises(ClassNamesError, match=r"'dog' is listed twice \(names 2 and 4\)") as err:
        load_classnames(str(tmp_path / "names.txt"))
    assert isinstance(err.value, UserError)
    imagenet = load_classnames("imagenet")
    assert len(set(imagenet)) == 998  # OpenAI's list names two pairs of distinct classes alike
    (tmp_path / "imagenet.txt").write_text("\n".join(imagenet) + "\n")
    assert load_classnames(str(tmp_path / "imagenet.txt")) == imagenet
    data = write_retrieval_shards(tmp_path / "pairs", solid_colours(6), 6)
    (data / "classnames.txt").write_text("a\nb\na\n")
    res = evaluate_suite(colour_encoder(), eval_cfg(labels=(data, "zeroshot")), progress=False)["labels"]
    assert "'a' is listed twice" in res["error"]


def test_zero_shot_per_class_accuracy_by_class_id():
    import torch

    from dime_ds.eval.zeroshot import zero_shot_metrics

    weights = torch.eye(3)  # class c's direction is axis c
    image = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    labels = torch.tensor([0, 1, 1, 1])  # class 2 has no sample; one of three class-1 images is wrong
    m = zero_shot_metrics(image, labels, weights)
    assert m["per_class"] == pytest.approx([1.0, 2 / 3, None])
    assert m["mean_per_class"] == pytest.approx((1.0 + 2 / 3) / 2) and m["top1"] == 0.75
