"""Infinite, deterministic sample streams over tar shards. Epoch e visits the shards in an order
drawn from (seed, e); rank r of R takes every R-th shard, DataLoader worker w of W every W-th of
those; a shuffle buffer seeded by (seed, e, r, w) mixes samples. A bad sample is skipped and
counted, never a crash."""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dime_ds.data.pipelines import SampleError, decode_sample, iter_tar_samples

log = logging.getLogger(__name__)


class ShardStream(IterableDataset):
    """Yields `process(decoded_sample)` forever. `process` may raise SampleError to skip a sample."""

    def __init__(self, urls: Sequence[str], process: Callable[[dict], Any], *, seed: int = 0,
                 rank: int = 0, world: int = 1, shuffle_buffer: int = 1000):
        super().__init__()
        if not urls:
            raise ValueError("ShardStream needs at least one shard")
        self.urls = list(urls)
        self.process = process
        self.seed, self.rank, self.world = seed, rank, world
        self.shuffle_buffer = shuffle_buffer
        self.skipped = 0

    def _shards(self, epoch: int, worker: int, workers: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        # Fewer shards than ranks x workers: everyone reads all shards (in its own order) rather
        # than some reading none.
        mine = order[self.rank * workers + worker::self.world * workers]
        if len(mine) == 0:
            mine = np.random.default_rng([self.seed, epoch, self.rank, worker]).permutation(len(self.urls))
        return [self.urls[i] for i in mine]

    def _samples(self, shards: list[str]) -> Iterator[Any]:
        for raw in iter_tar_samples(shards):
            try:
                yield self.process(decode_sample(raw))
            except SampleError as err:
                self.skipped += 1
                log.warning("skipped %s (%d skipped so far)", err, self.skipped)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
            buffer: list[Any] = []
            for item in self._samples(self._shards(epoch, worker, workers)):
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                j = int(rng.integers(len(buffer)))
                buffer[j], item = item, buffer[j]
                yield item
            rng.shuffle(buffer)
            yield from buffer
            epoch += 1


def paired_process(transform: Callable, tokenize: Callable) -> Callable[[dict], tuple]:
    """decoded sample -> (image tensor, token ids) for image-caption training."""

    def process(sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "image" not in sample or "text" not in sample:
            raise SampleError(f"sample {sample['key']} lacks an image or a caption")
        return transform(sample["image"]), tokenize([sample["text"]])[0]

    return process
