"""Run the datasets of an `eval` config section against one model. A missing dataset is reported
and skipped; a dataset that cannot be read (bad class names, unreadable shards, no samples) is
reported with its error and the suite goes on: a 25-dataset run never dies on dataset 3.

On several ranks every rank takes part in every dataset (feature extraction is shared, and a
ZeRO-3 model's forwards are collective); rank 0 computes the metrics and sends them to all."""
from __future__ import annotations

import logging
import tarfile
from pathlib import Path
from typing import Iterable

from dime_ds.config.schema import EvalConfig, EvalDatasetConfig
from dime_ds.data.pipelines import SampleError
from dime_ds.distributed import collectives as C
from dime_ds.eval.features import extract
from dime_ds.models.encoder import Encoder
from dime_ds.eval.linear_probe import linear_probe, stratified_split
from dime_ds.eval.retrieval import retrieval_metrics
from dime_ds.eval.sources import count_skips, has_split, open_split, with_class_names
from dime_ds.eval.templates import load_classnames, load_templates
from dime_ds.eval.zeroshot import classifier_weights, zero_shot_metrics

log = logging.getLogger(__name__)
DATASET_ERRORS = (OSError, ValueError, SampleError, tarfile.TarError)
METRIC_LABELS = {"top1": "top-1", "mean_per_class": "mean per-class"}


def _all_ranks_see(path: str) -> bool:
    here = Path(path).expanduser().exists()
    return C.reduce_scalar(1.0 if here else 0.0, op="min") > 0 if C.is_distributed() else here


def evaluate_suite(encoder: Encoder, eval_cfg: EvalConfig, tasks: Iterable[str] | None = None, *,
                   lockstep: bool = False, progress: bool = True) -> dict[str, dict]:
    """{dataset: metrics} for every dataset (of `tasks`, default all), the same on every rank.
    Metrics always hold `task`; `missing: True` where the data is absent (on any rank), `error`
    where it could not be evaluated."""
    tasks = set(tasks) if tasks is not None else None
    results = {}
    for name, ds in eval_cfg.datasets.items():
        if tasks is not None and ds.task not in tasks:
            continue
        if not _all_ranks_see(ds.path):
            log.warning("eval dataset %s: %s does not exist, skipped", name, ds.path)
            results[name] = {"task": ds.task, "missing": True, "path": ds.path}
            continue
        opts = dict(batch_size=eval_cfg.batch_size, workers=eval_cfg.workers, lockstep=lockstep,
                    progress=progress, desc=f"{encoder.name}: {name}")
        try:
            metrics = TASKS[ds.task](encoder, ds, eval_cfg, opts)
            result = None if metrics is None else {"task": ds.task, "metric": ds.metric, **metrics}
        except DATASET_ERRORS as err:
            log.error("eval dataset %s (%s): %s", name, ds.path, err)
            result = {"task": ds.task, "error": str(err), "path": ds.path}
        results[name] = C.broadcast_object(result) if C.is_distributed() else result
    return results


def _zeroshot(encoder: Encoder, ds: EvalDatasetConfig, eval_cfg: EvalConfig, opts: dict) -> dict | None:
    split = open_split(ds.path, ds.split)
    classnames = load_classnames(ds.classnames, split.meta_dir, split.folder_classes)
    split = with_class_names(split, classnames)
    weights = classifier_weights(encoder.texts, classnames, load_templates(ds.templates, split.meta_dir))
    feats = extract(split, encoder, **opts)
    if feats is None:  # not rank 0
        return None
    if (feats.labels < 0).any():
        raise ValueError(f"{ds.path}: zero-shot classification needs a class label (cls) on every sample")
    return {**zero_shot_metrics(feats.image, feats.labels, weights), "classes": len(classnames),
            **_skips(feats.skipped)}


def _retrieval(encoder: Encoder, ds: EvalDatasetConfig, eval_cfg: EvalConfig, opts: dict) -> dict | None:
    feats = extract(open_split(ds.path, ds.split), encoder, captions=True, **opts)
    if feats is None:
        return None
    return {**retrieval_metrics(feats.image, feats.text, feats.text_owner), **_skips(feats.skipped)}


def _linear_probe(encoder: Encoder, ds: EvalDatasetConfig, eval_cfg: EvalConfig, opts: dict) -> dict | None:
    probe = eval_cfg.probe
    if has_split(ds.path, ds.train_split):
        if not has_split(ds.path, ds.split):
            raise FileNotFoundError(f"{ds.path} has a {ds.train_split}/ split but no {ds.split}/ split to test on")
        train_split = open_split(ds.path, ds.train_split)
        test_split = open_split(ds.path, ds.split, classes=train_split.folder_classes or None)
        train = extract(train_split, encoder, **opts)
        test = extract(test_split, encoder, **opts)
        if train is None:
            return None
        protocol = f"{ds.train_split} -> {ds.split}"
        parts = (train.image, train.labels, test.image, test.labels)
        skipped = train.skipped + test.skipped
    else:  # one split only: a stratified, seeded share of it becomes the test set
        feats = extract(open_split(ds.path, ds.split), encoder, **opts)
        if feats is None:
            return None
        fit_rows, test_rows = stratified_split(feats.labels, probe.test_fraction)
        protocol = f"single split, {probe.test_fraction:.0%} held out as test"
        parts = (feats.image[fit_rows], feats.labels[fit_rows], feats.image[test_rows], feats.labels[test_rows])
        skipped = feats.skipped
    if (parts[1] < 0).any() or (parts[3] < 0).any():
        raise ValueError(f"{ds.path}: linear probing needs a class label (cls) on every sample")
    metrics = linear_probe(*parts, regs=list(probe.reg), val_fraction=probe.val_fraction,
                           max_iter=probe.max_iter, device=encoder.device if encoder.device.type == "cuda" else "cpu")
    return {**metrics, "protocol": protocol, **_skips(skipped)}


def _skips(messages: list[str]) -> dict:
    """The report's counts: samples skipped, and the damaged shards (read as far as they could be)."""
    samples, damaged = count_skips(messages)
    return {"skipped": samples, "damaged_shards": damaged} if damaged else {"skipped": samples}


TASKS = {"zeroshot": _zeroshot, "retrieval": _retrieval, "linear_probe": _linear_probe}


def headline(metrics: dict) -> list[tuple[str, str, float | str]]:
    """The figures a summary shows for one dataset: (metric key, label, value or missing/error).
    Classification shows the dataset's `metric` (top-1, or mean per-class as ELEVATER does for some)."""
    metric = metrics.get("metric", "top1")
    labels = {"zeroshot": [(metric, f"zero-shot {METRIC_LABELS[metric]}")],
              "linear_probe": [(metric, f"linear probe {METRIC_LABELS[metric]}")],
              "retrieval": [("image_to_text_R@1", "image->text R@1"), ("text_to_image_R@1", "text->image R@1")]}
    status = "missing" if metrics.get("missing") else "error" if "error" in metrics else None
    return [(key, label, status or metrics[key]) for key, label in labels[metrics["task"]]]
