"""Per-rank batch streams whose position is part of the checkpoint.

`BatchStream` wraps a DataLoader over a `ShardStream`. With an IterableDataset and W workers the
DataLoader takes batch b from worker b % W, each worker producing whole batches; every batch carries
its worker's cursor after its last sample and the records of the samples skipped on the way. So
`state_dict()` = consumed batches, total skipped, and one cursor per worker, and a stream built from
that state (same shards, seed, rank, world, batch size and worker count) yields exactly the batches,
augmentations included, that the uninterrupted one would have yielded next. Resuming decodes nothing
that was consumed before. `workers=0` and `workers=1` are the same stream and may replace each other.

`image_batches` (or `view_batches`), `text_batches` and `paired_batches` build the streams the
engines use. Each has its own salt, so the image and text streams of one seed are independent.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Container, Mapping, Sequence

import torch
from torch.utils.data import DataLoader

from dime_ds.data.pipelines import IMAGE_EXTS, SampleError
from dime_ds.data.streams import ShardStream

log = logging.getLogger(__name__)

STATE_VERSION = 1
_MUST_MATCH = ("seed", "salt", "rank", "world", "batch_size", "workers", "shards")


class BatchStream:
    """`next()` -> a batch dict; `state_dict()` / `load_state_dict()` (or `start=`) resume exactly.
    `dataset` is a ShardStream whose process returns one dict per sample (switched to with_meta).

    `skipped` counts the samples skipped in all consumed batches (across resumes); `last_skips` are
    the records {"key", "source", "reason"} of those skipped while making the last batch;
    `not_kept` counts the samples a keep list (data.keep) left out on the way to them.
    `damaged` holds the damaged shards met so far ({shard: {"shard", "reason", "samples"}}, across
    resumes); `truncated` counts the sentences cut to the tokenizer's context (used, not skipped).
    """

    def __init__(self, dataset: ShardStream, batch_size: int, *, workers: int = 0,
                 start: Mapping[str, Any] | None = None, pin_memory: bool = False,
                 prefetch_factor: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        dataset.with_meta = True
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self._slots = max(1, workers)  # logical workers: 0 and 1 DataLoader workers are one stream
        self._batches, self._skipped, self._not_kept, self._truncated = 0, 0, 0, 0
        self.damaged: dict[str, dict] = {}
        self._cursors: list[tuple[int, int]] = [(0, 0)] * self._slots
        self.last_skips: list[dict] = []
        self._it = None
        if start is not None:
            self.load_state_dict(start)

    @property
    def truncated(self) -> int:
        return self._truncated

    @property
    def batches(self) -> int:
        return self._batches

    @property
    def skipped(self) -> int:
        return self._skipped

    @property
    def not_kept(self) -> int:
        return self._not_kept

    def _identity(self) -> dict:
        d = self.dataset
        return {"seed": d.seed, "salt": d.salt, "rank": d.rank, "world": d.world, "batch_size": self.batch_size,
                "workers": self._slots, "shards": len(d.urls)}

    def state_dict(self) -> dict:
        """JSON-serialisable: {"version", "batches", "skipped", "not_kept", "truncated", "damaged",
        "cursors": [[epoch, k] per worker], and the settings a resume must share: seed, salt, rank,
        world, batch_size, workers, shards}."""
        return {"version": STATE_VERSION, "batches": self._batches, "skipped": self._skipped,
                "not_kept": self._not_kept, "truncated": self._truncated, "damaged": dict(self.damaged),
                "cursors": [list(c) for c in self._cursors], **self._identity()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"batch stream state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self._identity()
        wrong = [f"{k}: state {state.get(k)!r}, stream {mine[k]!r}" for k in _MUST_MATCH if state.get(k) != mine[k]]
        if wrong:
            raise ValueError(f"cannot resume stream {mine['salt']!r} from this state: " + "; ".join(wrong))
        cursors = [(int(e), int(k)) for e, k in state["cursors"]]
        if len(cursors) != self._slots:
            raise ValueError(f"state has {len(cursors)} worker cursors, expected {self._slots}")
        self.close()
        self._batches, self._skipped, self._cursors = int(state["batches"]), int(state["skipped"]), cursors
        self._not_kept = int(state.get("not_kept", 0))  # absent in states written before keep lists
        # Absent from states written before damaged shards and truncated sentences were counted.
        self._truncated, self.damaged = int(state.get("truncated", 0)), dict(state.get("damaged", {}))
        self.last_skips = []

    def _start(self):
        self.dataset.resume(self._cursors, self._batches % self._slots)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers,
                            collate_fn=collate_samples, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.workers else None,
                            # the workers' base seed from a private generator: building or resuming a
                            # stream leaves the caller's RNG alone (samples are seeded per position)
                            generator=torch.Generator().manual_seed(0))
        return iter(loader)

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._start()
        batch, meta = next(self._it)
        worker = self._batches % self._slots
        if meta["worker"] != worker:
            raise RuntimeError(f"batch {self._batches} came from worker {meta['worker']}, expected {worker}: "
                               "the DataLoader no longer serves workers round-robin, so resume would not be exact")
        self._cursors[worker] = tuple(meta["cursor"])
        self.last_skips = meta["skips"]
        for record in self.last_skips:
            damage = record.get("damaged")
            if damage is not None and damage["shard"] not in self.damaged:
                self.damaged[damage["shard"]] = damage
                log.warning("damaged shard %s: %s; %d samples read from it (%d damaged shards so far)",
                            damage["shard"], damage["reason"], damage["samples"], len(self.damaged))
            if record["key"] is not None:  # None: a shard that could not be read at all, no sample lost
                log.warning("skipped sample %s of %s: %s", record["key"], record["source"], record["reason"])
                self._skipped += 1
        self._not_kept += meta["not_kept"]
        self._truncated += sum(batch.pop("truncated", ()))
        self._batches += 1
        return batch

    def close(self) -> None:
        """Stop the workers (a later next() starts them again at the current position)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __enter__(self) -> "BatchStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def collate_samples(items: Sequence[tuple[dict, dict]]) -> tuple[dict, dict]:
    """[(sample dict, meta)] of one worker -> (batch: tensors stacked, the rest listed; batch meta)."""
    samples = [s for s, _ in items]
    metas = [m for _, m in items]
    if len({m["worker"] for m in metas}) != 1:
        raise RuntimeError("a batch mixes samples of several workers")
    batch = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    meta = {"worker": metas[-1]["worker"], "cursor": metas[-1]["cursor"],
            "skips": [r for m in metas for r in m["skips"]], "not_kept": sum(m.get("not_kept", 0) for m in metas)}
    return batch, meta


def _image_sample(transform: Callable, sample: dict) -> dict:
    if "image" not in sample:
        raise SampleError(f"sample {sample['key']} in {sample['url']} has no image member ({', '.join(IMAGE_EXTS)})")
    return {"images": transform(sample["image"]), "keys": sample["key"]}


def overflows_context(tokenize: Callable, text: str) -> bool:
    """Whether open_clip's tokenizer cuts `text` to its context (start and end tokens around the BPE
    ids); False for tokenizers that say nothing of their length (Hugging Face ones truncate too)."""
    encode, context = getattr(tokenize, "encode", None), getattr(tokenize, "context_length", None)
    if encode is None or not context or getattr(tokenize, "reduction_fn", None) is not None:
        return False
    return len(encode(text)) + 2 > context


def _text_sample(tokenize: Callable | None, sample: dict) -> dict:
    if "text" not in sample:
        raise SampleError(f"sample {sample['key']} in {sample['url']} has no txt member")
    if tokenize is None:  # cached teacher text embeddings and no student text tower: keys suffice
        return {"texts": sample["text"], "keys": sample["key"]}
    tokens = torch.as_tensor(tokenize([sample["text"]])[0], dtype=torch.long)
    return {"tokens": tokens, "texts": sample["text"], "keys": sample["key"],
            "truncated": overflows_context(tokenize, sample["text"])}


def _paired_sample(transform: Callable, tokenize: Callable, sample: dict) -> dict:
    if "image" not in sample or "text" not in sample:
        raise SampleError(f"sample {sample['key']} in {sample['url']} lacks an image or a caption")
    tokens = torch.as_tensor(tokenize([sample["text"]])[0], dtype=torch.long)
    return {"images": transform(sample["image"]), "tokens": tokens, "keys": sample["key"],
            "truncated": overflows_context(tokenize, sample["text"])}


def _batches(urls, process, fields, batch_size, *, seed, rank, world, workers, shuffle_buffer, start,
             salt, pin_memory, keep=None) -> BatchStream:
    dataset = ShardStream(urls, process, seed=seed, rank=rank, world=world, shuffle_buffer=shuffle_buffer,
                          salt=salt, fields=fields, with_meta=True, keep=keep)
    return BatchStream(dataset, batch_size, workers=workers, start=start, pin_memory=pin_memory)


def image_batches(urls: Sequence[str], transform: Callable, batch_size: int, *, seed: int, rank: int = 0,
                  world: int = 1, workers: int = 0, shuffle_buffer: int = 1000,
                  start: Mapping[str, Any] | None = None, salt: str = "images",
                  pin_memory: bool = False, keep: Container[str] | None = None) -> BatchStream:
    """Unpaired images: {"images": FloatTensor[B, 3, H, W], "keys": list[str]}. A sample needs a
    jpg/jpeg/png/webp member; its other members (captions, json) are never read. `keep` (a
    data.keep.KeepList): only the images whose keys it holds."""
    return _batches(urls, functools.partial(_image_sample, transform), IMAGE_EXTS, batch_size, seed=seed,
                    rank=rank, world=world, workers=workers, shuffle_buffer=shuffle_buffer, start=start,
                    salt=salt, pin_memory=pin_memory, keep=keep)


def text_batches(urls: Sequence[str], tokenize: Callable | None, batch_size: int, *, seed: int, rank: int = 0,
                 world: int = 1, workers: int = 0, shuffle_buffer: int = 1000,
                 start: Mapping[str, Any] | None = None, salt: str = "texts",
                 pin_memory: bool = False) -> BatchStream:
    """Unpaired sentences: {"tokens": LongTensor[B, ctx], "texts": list[str], "keys": list[str]}
    ("tokens" absent when `tokenize` is None). An empty sentence is skipped and counted."""
    return _batches(urls, functools.partial(_text_sample, tokenize), ("txt",), batch_size, seed=seed,
                    rank=rank, world=world, workers=workers, shuffle_buffer=shuffle_buffer, start=start,
                    salt=salt, pin_memory=pin_memory)


def paired_batches(urls: Sequence[str], transform: Callable, tokenize: Callable, batch_size: int, *, seed: int,
                   rank: int = 0, world: int = 1, workers: int = 0, shuffle_buffer: int = 1000,
                   start: Mapping[str, Any] | None = None, salt: str = "paired",
                   pin_memory: bool = False) -> BatchStream:
    """Image-caption pairs (the CLIP loss): {"images", "tokens", "keys"}."""
    return _batches(urls, functools.partial(_paired_sample, transform, tokenize), (*IMAGE_EXTS, "txt"),
                    batch_size, seed=seed, rank=rank, world=world, workers=workers,
                    shuffle_buffer=shuffle_buffer, start=start, salt=salt, pin_memory=pin_memory)


def view_batches(urls: Sequence[str], sampler: Callable[[dict], dict], batch_size: int, *, seed: int,
                 rank: int = 0, world: int = 1, workers: int = 0, shuffle_buffer: int = 1000,
                 start: Mapping[str, Any] | None = None, salt: str = "images",
                 pin_memory: bool = False, keep: Container[str] | None = None) -> BatchStream:
    """Unpaired images shown through K fixed views (a dime_ds.data.views.ViewSampler): {"images",
    "keys", "views": LongTensor[B] (each image's view), "view_params": IntTensor[B, 5]}. The view
    derives from (key, epoch) and the epoch is in the cursor, so a resumed stream shows the same.
    `keep` as for image_batches."""
    return _batches(urls, sampler, IMAGE_EXTS, batch_size, seed=seed, rank=rank, world=world, workers=workers,
                    shuffle_buffer=shuffle_buffer, start=start, salt=salt, pin_memory=pin_memory, keep=keep)
