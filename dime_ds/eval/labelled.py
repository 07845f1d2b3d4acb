"""Labelled evaluation sets: webdataset shards with `jpg` + `cls` and a classnames.txt beside them."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from dime_ds.data.pipelines import decode_sample, iter_tar_samples
from dime_ds.data.shards import list_shards


def read_classnames(data_dir: str | Path, path: str | None = None) -> list[str]:
    file = Path(path) if path else Path(data_dir) / "classnames.txt"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: class names file not found (one class name per line)")
    return [line.strip() for line in file.read_text().splitlines() if line.strip()]


def labelled_batches(data_dir: str | Path, transform: Callable, batch_size: int
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches in shard order; every sample once."""
    images, labels = [], []
    for raw in iter_tar_samples(list_shards(str(data_dir))):
        sample = decode_sample(raw)
        images.append(transform(sample["image"]))
        labels.append(sample["cls"])
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)
