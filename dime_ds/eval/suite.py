"""Run the datasets of an `eval` config section against one model. A missing dataset is reported
and skipped; a dataset that cannot be read (bad class names, no samples) is reported with its error
and the suite goes on: a 25-dataset run never dies on dataset 3."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

from dime_ds.data.pipelines import SampleError
from dime_ds.eval.features import Encoder, extract
from dime_ds.eval.linear_probe import linear_probe, stratified_split
from dime_ds.eval.retrieval import retrieval_metrics
from dime_ds.eval.sources import has_split, open_split
from dime_ds.eval.templates import load_classnames, load_templates
from dime_ds.eval.zeroshot import classifier_weights, zero_shot_metrics

log = logging.getLogger(__name__)
DATASET_ERRORS = (FileNotFoundError, ValueError, SampleError)


def evaluate_suite(encoder: Encoder, eval_cfg: Any, tasks: Iterable[str] | None = None, *,
                   lockstep: bool = False, progress: bool = True) -> dict[str, dict]:
    """{dataset: metrics} for every dataset (of `tasks`, default all). Metrics always hold `task`;
    `missing: True` where the data is absent, `error` where it could not be evaluated."""
    tasks = set(tasks) if tasks is not None else None
    results = {}
    for name, ds in eval_cfg.datasets.items():
        if tasks is not None and ds.task not in tasks:
            continue
        if not Path(ds.path).expanduser().exists():
            log.warning("eval dataset %s: %s does not exist, skipped", name, ds.path)
            results[name] = {"task": ds.task, "missing": True, "path": ds.path}
            continue
        opts = dict(batch_size=eval_cfg.batch_size, workers=eval_cfg.workers, lockstep=lockstep,
                    progress=progress, desc=f"{encoder.name}: {name}")
        try:
            metrics = TASKS[ds.task](encoder, ds, eval_cfg, opts)
        except DATASET_ERRORS as err:
            log.error("eval dataset %s (%s): %s", name, ds.path, err)
            results[name] = {"task": ds.task, "error": str(err), "path": ds.path}
            continue
        results[name] = {"task": ds.task, **metrics}
    return results


def _zeroshot(encoder: Encoder, ds: Any, eval_cfg: Any, opts: dict) -> dict:
    split = open_split(ds.path, ds.split)
    classnames = load_classnames(ds.classnames, split.meta_dir, split.folder_classes)
    weights = classifier_weights(encoder.texts, classnames, load_templates(ds.templates, split.meta_dir))
    feats = extract(split, encoder, **opts)
    if (feats.labels < 0).any():
        raise ValueError(f"{ds.path}: zero-shot classification needs a class label (cls) on every sample")
    return {**zero_shot_metrics(feats.image, feats.labels, weights), "classes": len(classnames),
            "skipped": len(feats.skipped)}


def _retrieval(encoder: Encoder, ds: Any, eval_cfg: Any, opts: dict) -> dict:
    feats = extract(open_split(ds.path, ds.split), encoder, captions=True, **opts)
    return {**retrieval_metrics(feats.image, feats.text, feats.text_owner), "skipped": len(feats.skipped)}


def _linear_probe(encoder: Encoder, ds: Any, eval_cfg: Any, opts: dict) -> dict:
    probe = eval_cfg.probe
    if has_split(ds.path, ds.train_split):
        if not has_split(ds.path, ds.split):
            raise FileNotFoundError(f"{ds.path} has a {ds.train_split}/ split but no {ds.split}/ split to test on")
        train = extract(open_split(ds.path, ds.train_split), encoder, **opts)
        test = extract(open_split(ds.path, ds.split), encoder, **opts)
        protocol = f"{ds.train_split} -> {ds.split}"
        parts = (train.image, train.labels, test.image, test.labels)
        skipped = len(train.skipped) + len(test.skipped)
    else:  # one split only: a stratified, seeded share of it becomes the test set
        feats = extract(open_split(ds.path, ds.split), encoder, **opts)
        fit_rows, test_rows = stratified_split(feats.labels, probe.test_fraction)
        protocol = f"single split, {probe.test_fraction:.0%} held out as test"
        parts = (feats.image[fit_rows], feats.labels[fit_rows], feats.image[test_rows], feats.labels[test_rows])
        skipped = len(feats.skipped)
    if (parts[1] < 0).any() or (parts[3] < 0).any():
        raise ValueError(f"{ds.path}: linear probing needs a class label (cls) on every sample")
    metrics = linear_probe(*parts, regs=list(probe.reg), val_fraction=probe.val_fraction,
                           max_iter=probe.max_iter, device=encoder.device if encoder.device.type == "cuda" else "cpu")
    return {**metrics, "protocol": protocol, "skipped": skipped}


TASKS = {"zeroshot": _zeroshot, "retrieval": _retrieval, "linear_probe": _linear_probe}


def headline(metrics: dict) -> list[tuple[str, str, float | str]]:
    """The figures a summary shows for one dataset: (metric key, label, value or missing/error)."""
    labels = {"zeroshot": [("top1", "zero-shot top-1")],
              "linear_probe": [("top1", "linear probe top-1")],
              "retrieval": [("image_to_text_R@1", "image->text R@1"), ("text_to_image_R@1", "text->image R@1")]}
    status = "missing" if metrics.get("missing") else "error" if "error" in metrics else None
    return [(key, label, status or metrics[key]) for key, label in labels[metrics["task"]]]
