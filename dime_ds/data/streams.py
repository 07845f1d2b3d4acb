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
"samples"} and the "epoch" it was met in).

Damage is decided per stream, not per worker. An epoch of one worker that yields no usable sample
because its shards are damaged (a *dead epoch*) stops nothing: its shards change with the epoch, so
the worker goes on to its next epoch while the others keep feeding. With `with_meta` it first
reports the dead epoch as one whole consumer batch of markers `(None, meta)` (`batch_size` items,
meta["dead"] = {"epoch", "shards", "message"}; the samples of the batch it interrupted go with it,
as drop_last drops an epoch's tail), so a DataLoader keeps serving its workers round-robin and the
consumer (`BatchStream`, which decides over all workers and ranks when the stream is dead) hears of
it at once. A plain iterator (no consumer to tell) logs it, and raises AllShardsDamagedError once its
dead epochs in a row have tried every shard of the stream. With `with_meta=True` every item comes as
`(item, meta)`, meta = {"worker", "cursor" (after this item), "skips" (records of the samples skipped
since the previous item), "not_kept" (samples left out by the keep list since the previous item)}:
how positions and counts reach the main process through DataLoader workers (see
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
    """No usable sample can reach a consumer of the stream: every shard of it is unreadable (over all
    workers and ranks), or a rank's workers tried every shard and none gave it a sample."""


def unreadable(damaged: dict[str, dict]) -> dict[str, dict]:
    """The damaged shards (records as in `damage_record`) of which no whole sample could be read."""
    return {url: d for url, d in damaged.items() if d["samples"] == 0}


def dead_stream_message(salt: str, urls: Sequence[str], damaged: dict[str, dict], who: str = "") -> str:
    """The AllShardsDamagedError message: `who` (a rank that got nothing; "" when every shard is
    unreadable) and every damaged shard by name, in sorted order, so that ranks holding the same
    records word it the same."""
    listed = "; ".join(f"{u}: {damaged[u]['reason']} ({damaged[u]['samples']} samples read)" for u in sorted(damaged))
    if not who:
        return f"stream {salt!r}: no sample could be used: all {len(urls)} shards are unreadable: {listed}"
    return (f"stream {salt!r}: no sample could be used by {who} after trying all {len(urls)} shards (the readable "
            f"samples are too few to reach every rank and worker); damaged shards: {listed or 'none'}")


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
                 fields: Iterable[str] | None = None, with_meta: bool = False, keep: Container[str] | None = None,
                 memo_bytes: int = 0):
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
        self.batch_size = 1  # items per consumer batch: a dead epoch's report fills one (BatchStream sets it)
        self.keep = keep
        self.not_kept = 0  # samples the keep list left out, in iterators run in this process
        self.skipped = 0  # samples skipped by iterators run in this process
        self.damaged: dict[str, dict] = {}  # damaged shards seen by iterators run in this process
        self._start: list[Cursor] | None = None
        self._worker_offset = 0
        # `memo_bytes` > 0: `process` draws no randomness, so a sample's item is kept after its first
        # use (per loader process, first come until the budget is spent: epochs read samples in a cycle,
        # where evicting would keep nothing) and later epochs skip its decoding.
        self.memo_bytes = memo_bytes
        self._memo: dict[tuple[str, str], Any] = {}
        self._memo_used = 0

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
        memo_key = (raw["__url__"], raw["__key__"]) if self.memo_bytes else None
        if memo_key in self._memo:
            return self._memo[memo_key]
        item = self._decode_and_process(raw, epoch, worker, position)
        if memo_key is not None:
            size = _nbytes(item)
            if self._memo_used + size <= self.memo_bytes:
                self._memo[memo_key], self._memo_used = item, self._memo_used + size
        return item

    def _decode_and_process(self, raw: dict, epoch: int, worker: int, position: int) -> Any:
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
        out = 0  # items yielded: a cursor always sits at a consumer's batch boundary, so out % batch_size
        tried: set[str] = set()  # shards of the dead epochs in a row (plain iteration)
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
                    record = {"key": raw.get("__key__"), "source": raw.get("__url__"), "reason": str(err),
                              "epoch": epoch}
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
                    out += 1
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
                message = (f"stream {self.salt!r}: {where}: no usable sample this epoch; damaged: "
                           + "; ".join(f"{os.path.basename(d['shard'])}: {d['reason']}" for d in damaged.values()))
                if self.with_meta:  # one whole batch of markers: the consumer's round-robin goes on
                    dead = {"epoch": epoch, "shards": shards, "message": message}
                    self.not_kept += dropped[0]
                    for _ in range(self.batch_size - out % self.batch_size):
                        yield None, {"worker": worker, "cursor": (epoch + 1, 0), "skips": pending,
                                     "not_kept": dropped[0], "dead": dead}
                        pending, dropped[0] = [], 0
                    out = 0
                else:
                    tried.update(shards)
                    if tried >= set(self.urls):  # every shard tried in a row: nothing will ever come
                        raise AllShardsDamagedError(dead_stream_message(
                            self.salt, self.urls, self.damaged,
                            "" if set(unreadable(self.damaged)) >= set(self.urls) else where))
                    log.warning("%s; going on with the next epoch", message)
                epoch, offset = epoch + 1, 0
                continue
            tried.clear()
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


def _nbytes(item: Any) -> int:
    """What a kept item holds: its tensors' bytes, plus a little for the dict and its strings."""
    values = item.values() if isinstance(item, dict) else (item,)
    return 256 + sum(v.nbytes if isinstance(v, torch.Tensor) else 64 for v in values)


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
