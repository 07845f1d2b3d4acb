"""Run the datasets of an `eval` config section against one model; a missing dataset is reported
and skipped, never a crash."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from dime_ds.data.pipelines import image_transform
from dime_ds.eval.labelled import labelled_batches, read_classnames
from dime_ds.eval.templates import load_templates
from dime_ds.eval.zeroshot import classifier_weights, zero_shot_accuracy

log = logging.getLogger(__name__)


def evaluate_suite(encode_image: Callable, encode_text: Callable, tokenize: Callable,
                   preprocess_cfg: dict, eval_cfg: Any, device: torch.device) -> dict[str, dict]:
    """{dataset: metrics} for every dataset; metrics hold `missing: True` where data is absent."""
    transform = image_transform(preprocess_cfg, train=False)
    results = {}
    for name, ds in eval_cfg.datasets.items():
        if not Path(ds.path).exists():
            log.warning("eval dataset %s: %s does not exist, skipped", name, ds.path)
            results[name] = {"missing": True, "path": ds.path}
            continue
        if ds.task != "zeroshot":
            raise NotImplementedError(f"eval.datasets.{name}.task={ds.task}: only zeroshot is implemented")
        classnames = read_classnames(ds.path, ds.classnames)
        weights = classifier_weights(encode_text, tokenize, classnames, load_templates(ds.templates, ds.path),
                                     device)
        batches = labelled_batches(ds.path, transform, eval_cfg.batch_size)
        results[name] = {**zero_shot_accuracy(encode_image, weights, batches, device),
                         "classes": len(classnames)}
    return results
