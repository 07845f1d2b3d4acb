"""Heartbeats: a rank that dies (SIGKILL, the OOM killer, a lost node) is noticed by the others within
`dist.dead_rank_s`, not at the collective timeout (`dist.timeout_min`, 30 minutes by default, and
NCCL would wait that long in the collective the dead rank never joins).

Every rank's thread writes a counter to the job's rendezvous store (its own client of the TCPStore
rank 0 holds, the one the process group was made with) every `dead_rank_s / 10` seconds and reads
every rank's counter in one request. A rank whose counter has not moved for `dead_rank_s` is dead:
the survivor logs which rank, and ends its process (`os._exit`: its main thread may be blocked in a
collective that no exception reaches) with status EXIT_RANK_LOST, the trainer's "stopped" status,
so the launcher requeues and `ckpt.resume=latest` resumes from the last complete checkpoint (a save
cut off by the exit never becomes `latest`). When rank 0 dies the store goes with it; the others
see it unreachable and end the same way, naming rank 0.

A rank that leaves normally writes "done" and is no longer watched; one that raised writes
"failed: <its error>", and is reported once it has been gone `dead_rank_s` while this rank still
runs (an error every rank agreed on ends them all well before that). Cost: one store request per
rank per beat."""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import threading
import time
from typing import Iterator

import torch.distributed as dist

from dime_ds.distributed import collectives as C
from dime_ds.errors import UserError
from dime_ds.jobs import STOPPED, requeue_sbatch_job, sbatch_job_id

log = logging.getLogger(__name__)

EXIT_RANK_LOST = STOPPED  # as a run stopped by a signal after its checkpoint: requeued, resumed from latest
_PREFIX = "dime_ds/heartbeat/"


class Watchdog:
    def __init__(self, rank: int, world_size: int, addr: str, port: int, dead_after_s: float):
        self.rank, self.world_size, self.dead_after_s = rank, world_size, float(dead_after_s)
        self.interval = max(self.dead_after_s / 10, 0.1)
        self.where = f"{addr}:{port}"
        self.store = dist.TCPStore(addr, port, world_size, is_master=False, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=max(self.dead_after_s, 1.0)))
        self.keys = [f"{_PREFIX}{r}" for r in range(world_size)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dime_ds-watchdog", daemon=True)

    def start(self) -> None:
        """Collective: every rank's key exists before anyone reads them all."""
        self.store.set(self.keys[self.rank], "0")
        C.barrier()
        self._thread.start()

    def stop(self, state: str) -> None:
        """Leave: `state` is "done" or "failed: <reason>", what the others read."""
        self._stop.set()
        self._thread.join(self.interval * 5)
        with contextlib.suppress(Exception):  # rank 0 (the store) may be gone already: nothing to tell
            self.store.set(self.keys[self.rank], state[:2000])

    def _run(self) -> None:
        beat, last = 0, {}  # rank -> (value, monotonic time it was first seen)
        while not self._stop.wait(self.interval):
            beat += 1
            try:
                self.store.set(self.keys[self.rank], str(beat))
                values = [v.decode("utf-8", "replace") for v in self.store.multi_get(self.keys)]
            except Exception as err:  # noqa: BLE001 - any failure of the store means its host is gone
                if self._stop.is_set():
                    return
                self._lost(f"rank 0 of {self.world_size} is unreachable (the rendezvous store it holds at "
                           f"{self.where} answers no more: {type(err).__name__}: {err}); it died or its node was lost")
            now = time.monotonic()
            for r, value in enumerate(values):
                if r == self.rank or value == "done":
                    continue
                if last.get(r, (None,))[0] != value:
                    last[r] = (value, now)
                    continue
                gone = now - last[r][1]
                if gone <= self.dead_after_s:
                    continue
                if value.startswith("failed:"):
                    self._lost(f"rank {r} of {self.world_size} failed {gone:.0f} s ago and left the collectives "
                               f"({value[7:].strip()})")
                self._lost(f"rank {r} of {self.world_size} stopped beating {gone:.0f} s ago (dist.dead_rank_s="
                           f"{self.dead_after_s:g}): it was killed or its node was lost")

    def _lost(self, message: str) -> None:
        message = (f"rank {self.rank}: {message}. Ending this rank with status {EXIT_RANK_LOST}; "
                   "ckpt.resume=latest resumes from the last complete checkpoint")
        log.error("%s", message)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        print(f"dime_ds: {message}", file=sys.stderr, flush=True)
        if job_id := sbatch_job_id():  # rank 0 may be the one lost: every survivor asks, the first requeues
            requeue_sbatch_job(job_id, reason="a rank was lost")
        os._exit(EXIT_RANK_LOST)

    def wait_for_verdict(self) -> None:
        """After a collective failed: give the heartbeats time to name a dead rank (the thread then
        ends the process); returns when every rank still beats."""
        self._thread.join(self.dead_after_s + 3 * self.interval)


@contextlib.contextmanager
def watch_ranks(world, dead_after_s: float) -> Iterator[Watchdog | None]:
    """Heartbeats for the block (a world of one, or dead_after_s=0: none). A collective that fails
    inside (gloo notices a closed peer at once) waits for the verdict, so the message names the rank."""
    if world.world_size == 1 or not dead_after_s or not C.is_distributed():
        yield None
        return
    watchdog = Watchdog(C.rank(), C.world_size(), world.master_addr, world.master_port, dead_after_s)
    watchdog.start()
    try:
        yield watchdog
    except UserError as err:
        watchdog.stop(f"failed: {type(err).__name__}: {err}")
        raise
    except BaseException as err:
        if isinstance(err, (RuntimeError, OSError)):  # how a collective with a dead peer fails
            log.warning("rank %d: %s: %s; waiting up to %.0f s for the heartbeats to tell whether a rank died",
                        C.rank(), type(err).__name__, str(err)[:300], watchdog.dead_after_s)
            watchdog.wait_for_verdict()
        watchdog.stop(f"failed: {type(err).__name__}: {err}")
        raise
    watchdog.stop("done")
