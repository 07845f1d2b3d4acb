"""Per-rank batch streams whose position is part of the checkpoint.

`BatchStream` wraps a DataLoader over a `ShardStream`. With an IterableDataset and W workers the
DataLoader takes turn t from worker t % W, each worker producing whole batches (or a dead epoch's
report, below); every turn carries its worker's cursor after its last sample and the records of the
samples skipped on the way. So `state_dict()` = consumed batches and turns, total skipped, and one
cursor per worker, and a stream built from
that state (same shards, seed, rank, world, batch size and worker count) yields exactly the batches,
augmentations included, that the uninterrupted one would have yielded next. Resuming decodes nothing
that was consumed before. `workers=0` and `workers=1` are the same stream and may replace each other.

Damaged data is decided per stream. A worker's dead epoch (see `dime_ds.data.streams`: no usable
sample in its shards of that epoch) arrives as a report in the worker's turn, not a batch: it is
logged, its turn is counted (so the round-robin, and resume, stay exact) and the next turn is taken,
so the other workers keep feeding. The stream stops with AllShardsDamagedError only when no usable
sample can come:
- at the stream's first batch, collectively when the stream's world is the process group's (every
  rank of a data-parallel run takes its first batch together): the ranks gather what each found
  and decide alike, in turns of one slot per worker, until every rank has a batch. All shards
  unreadable over every worker and rank: every rank raises the same error naming them all. A rank
  whose workers tried every shard in a row without a sample (the readable samples are fewer than
  the split needs; every (R*W)-th sample of few shards): every rank raises the same error naming
  it. Otherwise a rank whose share of this epoch is dead reads its next epoch's shards, which
  differ, while the others wait for it in the gather;
- later, on this rank alone (a collective per batch would cost a host-device synchronisation every
  step): when its dead epochs since its last batch have tried every shard, it raises, and the other
  ranks stop where they next wait for it.
Dead shards are never read on another rank's behalf: a rank's share of an epoch is its own, so
ranks never overlap, and epochs re-deal the shards.

`image_batches` (or `view_batches`), `text_batches` and `paired_batches` build the streams the
engines use. Each has its own salt, so the image and text streams of one seed are independent.
"""
from __future__ import annotations

import collections.abc
import functools
import logging
from typing import Any, Callable, Container, Mapping, Sequence

import torch
from torch.utils.data import DataLoader

from dime_ds.data.pipelines import IMAGE_EXTS, SampleError
from dime_ds.data.streams import AllShardsDamagedError, ShardStream, dead_stream_message, unreadable
from dime_ds.distributed import collectives as C

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
    resumes), `damaged_epochs` the epochs in which each was met ({shard: [epoch, ...]}: a damaged shard
    counts once per (shard, epoch), however many workers met it); `dead_epochs` counts the workers'
    dead epochs (module docstring); `truncated` counts the sentences cut to the tokenizer's context
    (used, not skipped).
    """

    def __init__(self, dataset: ShardStream, batch_size: int, *, workers: int = 0,
                 start: Mapping[str, Any] | None = None, pin_memory: bool = False,
                 prefetch_factor: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        dataset.with_meta = True
        dataset.batch_size = batch_size  # a dead epoch's report fills one batch
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self._slots = max(1, workers)  # logical workers: 0 and 1 DataLoader workers are one stream
        self._batches, self._skipped, self._not_kept, self._truncated = 0, 0, 0, 0
        self.damaged: dict[str, dict] = {}
        self.damaged_epochs: dict[str, list[int]] = {}
        self.dead_epochs = 0
        self._turns = 0  # DataLoader turns taken: batches and dead-epoch reports
        self._tried: set[str] = set()  # shards of this rank's dead epochs since its last batch
        self._first = True  # the first batch is agreed over the ranks
        self._cursors: list[tuple[int, int]] = [(0, 0)] * self._slots
        self.last_skips: list[dict] = []
        self._carried: list[dict] = []
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
        """JSON-serialisable: {"version", "batches", "turns", "skipped", "not_kept", "truncated",
        "damaged", "damaged_epochs", "dead_epochs", "cursors": [[epoch, k] per worker], and the
        settings a resume must share: seed, salt, rank, world, batch_size, workers, shards}."""
        return {"version": STATE_VERSION, "batches": self._batches, "turns": self._turns, "skipped": self._skipped,
                "not_kept": self._not_kept, "truncated": self._truncated, "damaged": dict(self.damaged),
                "damaged_epochs": {k: list(v) for k, v in self.damaged_epochs.items()},
                "dead_epochs": self.dead_epochs, "cursors": [list(c) for c in self._cursors], **self._identity()}

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
        # Absent from states written before dead epochs were turns of their own and epochs were counted.
        self._turns = int(state.get("turns", self._batches))
        self.damaged_epochs = {k: list(v) for k, v in state.get("damaged_epochs", {}).items()}
        self.dead_epochs = int(state.get("dead_epochs", 0))
        self.last_skips, self._carried = [], []

    def _start(self):
        self.dataset.resume(self._cursors, self._turns % self._slots)
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
        if self._first:
            batch = self._first_batch()
            self._first = False
            return batch
        while (batch := self._turn()) is None:
            urls = set(self.dataset.urls)
            if self._tried >= urls:  # every shard tried in a row: nothing will come
                raise AllShardsDamagedError(self._dead_message(
                    self.damaged, "" if set(unreadable(self.damaged)) >= urls else self._who()))
        return batch

    def _turn(self) -> dict | None:
        """The next DataLoader turn: a batch, or None for a worker's dead epoch (logged, counted)."""
        batch, meta = next(self._it)
        worker = self._turns % self._slots
        if meta["worker"] != worker:
            raise RuntimeError(f"turn {self._turns} came from worker {meta['worker']}, expected {worker}: "
                               "the DataLoader no longer serves workers round-robin, so resume would not be exact")
        self._turns += 1
        self._cursors[worker] = tuple(meta["cursor"])
        for record in meta["skips"]:
            damage = record.get("damaged")
            if damage is not None:
                epochs = self.damaged_epochs.setdefault(damage["shard"], [])
                if record.get("epoch") is not None and record["epoch"] not in epochs:
                    epochs.append(record["epoch"])
            if damage is not None and damage["shard"] not in self.damaged:
                self.damaged[damage["shard"]] = damage
                log.warning("damaged shard %s: %s; %d samples read from it (%d damaged shards so far)",
                            damage["shard"], damage["reason"], damage["samples"], len(self.damaged))
            if record["key"] is not None:  # None: a shard that could not be read at all, no sample lost
                log.warning("skipped sample %s of %s: %s", record["key"], record["source"], record["reason"])
                self._skipped += 1
        self._not_kept += meta["not_kept"]
        dead = meta.get("dead")
        self._carried += meta["skips"]  # a dead epoch's skips are shown with the next batch's
        if dead is not None:
            self.dead_epochs += 1
            self._tried.update(dead["shards"])
            lost = len(batch.get("keys", ()))
            log.warning("%s; the other workers go on, this one reads its next epoch's shards%s", dead["message"],
                        f" (the {lost} samples of the batch it had begun are dropped)" if lost else "")
            return None
        self._tried = set()
        self.last_skips, self._carried = self._carried, []
        self._truncated += sum(batch.pop("truncated", ()))
        self._batches += 1
        return batch

    def _first_batch(self) -> dict:
        """The first batch, agreed over the ranks (module docstring): in rounds of one turn per worker,
        every rank says what it found until every rank has a batch or none can get one."""
        urls, together = set(self.dataset.urls), self._together()
        batch = None
        while True:
            for _ in range(self._slots if batch is None else 0):
                if (batch := self._turn()) is not None:
                    break
            mine = {"batch": batch is not None, "damaged": self.damaged,
                    "stuck": batch is None and self._tried >= urls, "who": self._who()}
            every = C.all_gather_object(mine) if together else [mine]
            if all(r["batch"] for r in every):
                return batch
            found: dict[str, dict] = {}
            for r in every:  # the lowest rank's record of a shard: every rank words the error alike
                for url, record in r["damaged"].items():
                    found.setdefault(url, record)
            if set(unreadable(found)) >= urls:
                raise AllShardsDamagedError(self._dead_message(found, ""))
            stuck = [r["who"] for r in every if r["stuck"]]
            if stuck:
                raise AllShardsDamagedError(self._dead_message(found, stuck[0]))

    def _together(self) -> bool:
        """Whether the ranks of this stream are the process group's: then they agree its first batch."""
        d = self.dataset
        return d.world > 1 and C.world_size() == d.world and C.rank() == d.rank

    def _who(self) -> str:
        return f"rank {self.dataset.rank}/{self.dataset.world} ({self._slots} worker(s))"

    def _dead_message(self, damaged: dict[str, dict], who: str) -> str:
        return dead_stream_message(self.dataset.salt, self.dataset.urls, damaged, who)

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
    """[(sample dict, meta)] of one worker -> (batch: tensors stacked, the rest listed; batch meta).
    A dead epoch's markers (sample None) end the batch: meta["dead"] says so, and the samples before
    them, if any, are in the batch only to be counted as dropped."""
    samples = [s for s, _ in items if s is not None]
    metas = [m for _, m in items]
    if len({m["worker"] for m in metas}) != 1:
        raise RuntimeError("a batch mixes samples of several workers")
    batch = {}
    for name in samples[0] if samples else ():
        values = [s[name] for s in samples]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    meta = {"worker": metas[-1]["worker"], "cursor": metas[-1]["cursor"],
            "skips": [r for m in metas for r in m["skips"]], "not_kept": sum(m.get("not_kept", 0) for m in metas),
            "dead": metas[-1].get("dead")}
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


def _tokens_and_overflow(tokenize: Callable, text: str) -> tuple[torch.Tensor, bool]:
    return torch.as_tensor(tokenize([text])[0], dtype=torch.long), overflows_context(tokenize, text)


# Sentences come back every epoch (a small pool, a paired set seen for many epochs), and BPE with its
# text cleaning costs more than the rest of a paired sample's decoding: each sentence is tokenized
# once per process. Bounded, so a pool of millions costs a few MB per loader process.
_remembered_tokens = functools.lru_cache(maxsize=1 << 14)(_tokens_and_overflow)


def sentence_tokens(tokenize: Callable, text: str) -> tuple[torch.Tensor, bool]:
    """(token ids [context], whether the tokenizer cut `text`), remembered per (tokenizer, sentence).
    The ids are shared between the samples of one sentence: batching copies them, nothing writes them."""
    if not isinstance(tokenize, collections.abc.Hashable):
        return _tokens_and_overflow(tokenize, text)
    return _remembered_tokens(tokenize, text)


def _text_sample(tokenize: Callable | None, sample: dict) -> dict:
    if "text" not in sample:
        raise SampleError(f"sample {sample['key']} in {sample['url']} has no txt member")
    if tokenize is None:  # cached teacher text embeddings and no student text tower: keys suffice
        return {"texts": sample["text"], "keys": sample["key"]}
    tokens, truncated = sentence_tokens(tokenize, sample["text"])
    return {"tokens": tokens, "texts": sample["text"], "keys": sample["key"], "truncated": truncated}


def _paired_sample(transform: Callable, tokenize: Callable, sample: dict) -> dict:
    if "image" not in sample or "text" not in sample:
        raise SampleError(f"sample {sample['key']} in {sample['url']} lacks an image or a caption")
    tokens, truncated = sentence_tokens(tokenize, sample["text"])
    return {"images": transform(sample["image"]), "tokens": tokens, "keys": sample["key"], "truncated": truncated}


def _batches(urls, process, fields, batch_size, *, seed, rank, world, workers, shuffle_buffer, start,
             salt, pin_memory, keep=None, memo_bytes=0) -> BatchStream:
    dataset = ShardStream(urls, process, seed=seed, rank=rank, world=world, shuffle_buffer=shuffle_buffer,
                          salt=salt, fields=fields, with_meta=True, keep=keep, memo_bytes=memo_bytes)
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
                   pin_memory: bool = False, memo_bytes: int = 0) -> BatchStream:
    """Image-caption pairs (the CLIP loss): {"images", "tokens", "keys"}. `memo_bytes` > 0, only for
    a `transform` without randomness: each loader process keeps that many bytes of decoded pairs
    after their first use (see ShardStream)."""
    return _batches(urls, functools.partial(_paired_sample, transform, tokenize), (*IMAGE_EXTS, "txt"),
                    batch_size, seed=seed, rank=rank, world=world, workers=workers,
                    shuffle_buffer=shuffle_buffer, start=start, salt=salt, pin_memory=pin_memory,
                    memo_bytes=memo_bytes)


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
