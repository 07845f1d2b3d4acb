"""Infinite, deterministic, resumable sample streams over tar shards.

Epoch e visits the shards in an order drawn from (seed, salt, e); rank r of R takes every R-th shard
of that order, DataLoader worker w of W every W-th of those. Where there are fewer shards than that
split needs, the split goes down to samples (every W-th sample of the rank's shards, or every
(R*W)-th sample of all shards when there are fewer shards than ranks), so ranks never overlap.

Each worker keeps a shuffle buffer, seeded by (seed, salt, e, r, w), of *raw* samples (tar bytes,
only the members the stream uses); a sample is decoded and processed when it leaves the buffer.
So a worker's position is a cursor (epoch, k): k raw samples of epoch e have left its buffer.
Resuming at a cursor replays the buffer over raw samples and decodes nothing before k. The random
augmentation of the sample at position k is drawn with torch's CPU generator (and Python's
`random`) seeded from (seed, salt, e, r, w, k) and restored afterwards, so it depends on nothing
else: not on timing, on the process it runs in, or on the caller's RNG. The decoded sample
handed to `process` carries its epoch ("epoch"), for choices made per (sample, epoch).

A bad sample (`SampleError`) is skipped and counted, never a crash. A damaged shard is read as far
as it can be and its marker (see `iter_tar_samples`) skipped: counted as a skipped sample when the
damage hit one, and recorded as a damaged shard (a skip record with "damaged": {"shard", "reason",
"samples"}). A worker whose epoch yields nothing because its shards are damaged raises
AllShardsDamagedError naming them, instead of looping over empty epochs. With `with_meta=True` every
item comes as `(item, meta)`, meta = {"worker", "cursor" (after this item), "skips" (records of the
samples skipped since the previous item), "not_kept" (samples left out by the keep list since the
previous item)}: how positions and counts reach the main process through DataLoader workers (see
`dime_ds.data.loaders.BatchStream`).

A keep list (`keep`, data.keep: CLIP-CID's semantic balance) drops the samples whose key it lacks
before the shuffle buffer, after the rank/worker split: the split and the shards stay as they were,
a cursor counts kept samples only, and resume replays the same filter, so it stays exact. A damaged
shard's marker always passes it, so the damage is counted whichever images are kept.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
from typing import Any, Callable, Container, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dime_ds.data.pipelines import (SAMPLE_META, DamagedShardError, SampleError, damage_record, decode_sample,
                                    iter_tar_samples)
from dime_ds.errors import UserError

log = logging.getLogger(__name__)

Cursor = tuple[int, int]  # (epoch, raw samples of that epoch already out of the shuffle buffer)


class AllShardsDamagedError(UserError, RuntimeError):
    """Every shard a stream (one worker of it) reads is damaged: training on it would never get a batch."""


def salt_id(salt: str) -> int:
    """A stable integer for a stream's salt (Python's hash() is randomised per process)."""
    return int.from_bytes(hashlib.sha256(salt.encode("utf-8")).digest()[:4], "little")


def sample_seed(*parts: int) -> int:
    """A 64-bit seed from non-negative integers, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


class ShardStream(IterableDataset):
    """Yields `process(decode_sample(raw))` forever. `process` may raise SampleError to skip a sample.

    `fields`: the members a sample keeps (e.g. ("txt",)); the others are dropped before buffering
    and decoding. None keeps all. `salt` separates streams that share a seed (images vs texts).
    """

    def __init__(self, urls: Sequence[str], process: Callable[[dict], Any], *, seed: int = 0,
                 rank: int = 0, world: int = 1, shuffle_buffer: int = 1000, salt: str = "",
                 fields: Iterable[str] | None = None, with_meta: bool = False, keep: Container[str] | None = None):
        super().__init__()
        if not urls:
            raise ValueError("ShardStream needs at least one shard")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, world={world})")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.urls = list(urls)
        self.process = process
        self.seed, self.rank, self.world = seed, rank, world
        self.shuffle_buffer = shuffle_buffer
        self.salt = salt
        self._salt = salt_id(salt)
        self.fields = None if fields is None else frozenset(fields)
        self.with_meta = with_meta
        self.keep = keep
        self.not_kept = 0  # samples the keep list left out, in iterators run in this process
        self.skipped = 0  # samples skipped by iterators run in this process
        self.damaged: dict[str, dict] = {}  # damaged shards seen by iterators run in this process
        self._start: list[Cursor] | None = None
        self._worker_offset = 0

    def resume(self, cursors: Sequence[Sequence[int]] | None, worker_offset: int = 0) -> None:
        """Make the next iterators start logical worker v at `cursors[v]` (one per worker; None: at
        the beginning). DataLoader worker i plays logical worker (i + worker_offset) % W, so that
        after b consumed batches the DataLoader's first batch comes from worker b % W again."""
        self._start = None if cursors is None else [(int(e), int(k)) for e, k in cursors]
        self._worker_offset = worker_offset

    def worker_shards(self, epoch: int, worker: int = 0, workers: int = 1) -> tuple[list[str], int, int]:
        """(shards, modulus, remainder): the worker reads `shards` in this order and keeps the raw
        samples whose index i (counted over those shards) has i % modulus == remainder."""
        order = np.random.default_rng([self.seed, self._salt, epoch]).permutation(len(self.urls))
        of_rank = order[self.rank::self.world]
        if len(order) < self.world:  # fewer shards than ranks: all read everything, split by sample
            picked, modulus, remainder = order, self.world * workers, self.rank * workers + worker
        elif len(of_rank) < workers:  # fewer shards than workers: the rank's shards, split by sample
            picked, modulus, remainder = of_rank, workers, worker
        else:
            picked, modulus, remainder = of_rank[worker::workers], 1, 0
        return [self.urls[i] for i in picked], modulus, remainder

    def _raw(self, shards: list[str], modulus: int, remainder: int, dropped: list[int]) -> Iterator[dict]:
        i = 0
        for raw in iter_tar_samples(shards):
            if raw["__key__"] is None:  # an unreadable shard holds no sample: every worker sharing it reports it
                yield raw
                continue
            if i % modulus == remainder:
                if self.keep is not None and "__damaged__" not in raw and raw["__key__"] not in self.keep:
                    dropped[0] += 1
                    continue
                if self.fields is not None:
                    raw = {k: v for k, v in raw.items() if k in self.fields or k in SAMPLE_META}
                yield raw
            i += 1

    def _process(self, raw: dict, epoch: int, worker: int, position: int) -> Any:
        seed = sample_seed(self.seed, self._salt, epoch, self.rank, worker, position)
        cpu = torch.default_generator  # CPU only: a CUDA generator of the caller is never touched
        torch_state, py_state = cpu.get_state(), random.getstate()
        cpu.manual_seed(seed)
        random.seed(seed)
        try:
            sample = decode_sample(raw)
            sample["epoch"] = epoch  # what per-epoch choices (an image's view) derive from
            return self.process(sample)
        finally:
            cpu.set_state(torch_state)
            random.setstate(py_state)

    def iterate(self, worker: int = 0, workers: int = 1, cursor: Cursor = (0, 0)) -> Iterator[Any]:
        """The stream of logical worker `worker` of `workers`, from `cursor` (what __iter__ runs)."""
        epoch, offset = cursor
        pending: list[dict] = []  # skips since the last item, sent with the next one
        dropped = [0]  # samples the keep list left out since the last item (or resume position)
        while True:
            shards, modulus, remainder = self.worker_shards(epoch, worker, workers)
            rng = np.random.default_rng([self.seed, self._salt, epoch, self.rank, worker])
            n_raw = n_good = 0
            last_reason, damaged = "", {}
            for position, (raw, last) in enumerate(_shuffled(self._raw(shards, modulus, remainder, dropped),
                                                             self.shuffle_buffer, rng)):
                n_raw += 1
                if position < offset:  # consumed before the resume: never decoded, its drops counted then
                    dropped[0] = 0
                    continue
                try:
                    item = self._process(raw, epoch, worker, position)
                except SampleError as err:
                    last_reason = str(err)
                    record = {"key": raw.get("__key__"), "source": raw.get("__url__"), "reason": str(err)}
                    if isinstance(err, DamagedShardError):
                        record["damaged"] = damaged[err.url] = self.damaged[err.url] = damage_record(err)
                    if record["key"] is not None:  # a sample lost (a whole unreadable shard lost none it had begun)
                        self.skipped += 1
                    if self.with_meta:
                        pending.append(record)  # the consumer logs it when it takes the item
                    else:
                        log.warning("skipped sample %s: %s (%d skipped so far)", record["key"], err,
                                    self.skipped)
                    continue
                n_good += 1
                self.not_kept += dropped[0]
                if self.with_meta:
                    after = (epoch + 1, 0) if last else (epoch, position + 1)
                    yield item, {"worker": worker, "cursor": after, "skips": pending, "not_kept": dropped[0]}
                    pending = []
                    dropped[0] = 0
                else:
                    dropped[0] = 0
                    yield item
            where = (f"rank {self.rank}/{self.world} worker {worker}/{workers}, epoch {epoch}, "
                     f"shards {_names(shards)}" + (f" (every {modulus}-th sample)" if modulus > 1 else ""))
            if n_raw == 0:
                kept = " kept by the keep list" if self.keep is not None else ""
                raise RuntimeError(f"stream {self.salt!r}: {where} hold no sample{kept}: an epoch would never end")
            if 0 < n_raw <= offset:
                raise RuntimeError(f"stream {self.salt!r}: resume cursor ({epoch}, {offset}) is past the "
                                   f"{n_raw} samples of {where}: the state belongs to other shards or settings")
            if n_good == 0 and offset == 0 and damaged:
                raise AllShardsDamagedError(
                    f"stream {self.salt!r}: {where}: no sample could be used; damaged shards: "
                    + "; ".join(f"{d['shard']}: {d['reason']} ({d['samples']} samples read)" for d in damaged.values()))
            if n_good == 0 and offset == 0:
                raise RuntimeError(f"stream {self.salt!r}: all {n_raw} samples of {where} were skipped "
                                   f"(last: {last_reason})")
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (physical + self._worker_offset) % workers
        if self._start is not None and len(self._start) != workers:
            raise ValueError(f"resume state has cursors for {len(self._start)} workers, the loader runs "
                             f"{workers}")
        cursor = self._start[worker] if self._start is not None else (0, 0)
        return self.iterate(worker, workers, cursor)


def _shuffled(samples: Iterable[dict], size: int, rng: np.random.Generator) -> Iterator[tuple[dict, bool]]:
    """(sample, last of the epoch) through a shuffle buffer of `size`; order depends on rng only."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(len(buffer)))
        buffer[j], sample = sample, buffer[j]
        yield sample, False
    for n, j in enumerate(rng.permutation(len(buffer))):
        yield buffer[j], n == len(buffer) - 1


def _names(shards: list[str], shown: int = 4) -> str:
    names = [os.path.basename(s) for s in shards[:shown]]
    return "[" + ", ".join(names) + (f", ... {len(shards) - shown} more" if len(shards) > shown else "") + "]"
