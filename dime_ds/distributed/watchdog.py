"""Heartbeats, in every multi-rank stage (the training job and the stage runner, distributed/stage.py):
a rank that dies (SIGKILL, the OOM killer, a lost node) is noticed by the others within
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
rank per beat.

Leaving (`Watchdog.leave`): rank 0 waits, up to dead_rank_s, until every other rank has left, because
its process holds the store: gone first, it would look dead to a rank still beating (which would then
end with status 3 instead of its own). A rank that failed waits for rank 0's state: the same error
there means every rank had it, and only rank 0 prints it (the error gets `agreed_rank`, which
cli.run_entry reads). The heartbeat thread is joined before the process goes on, so it is never in
the middle of a store call when the interpreter shuts down (a C++ call cut off then aborts the
process).

Past the requeue budget (jobs.RequeueBudget) under plain sbatch, a survivor asks for no requeue and
ends with jobs.REQUEUES_SPENT instead of EXIT_RANK_LOST."""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import sys
import threading
import time
from typing import Iterator

import torch.distributed as dist

from dime_ds.distributed import collectives as C
from dime_ds.errors import UserError
from dime_ds.jobs import STOPPED, RequeueBudget, RequeuesSpent, requeue_sbatch_job, sbatch_job_id

log = logging.getLogger(__name__)

EXIT_RANK_LOST = STOPPED  # as a run stopped by a signal after its checkpoint: requeued, resumed from latest
_PREFIX = "dime_ds/heartbeat/"
AGREED_RANK = "agreed_rank"  # set on an error every rank raised alike: this rank's number (0 prints it)
_active: Watchdog | None = None  # this process's open watch_ranks block
_sessions = 0  # blocks opened so far, in the same order on every rank: a block's keys are its own


def _left(state: str) -> bool:
    return state == "done" or state.startswith("failed:")


def _outlive_the_step_kill() -> None:
    """This rank raised, so its exit status is decided. A launcher that ends the other tasks when the
    first one exits (srun --kill-on-bad-exit, torchrun) would cut the rest of this exit short with
    SIGTERM (status 143, not its own; rank 0's message perhaps unprinted): ignore it from here on.
    SIGKILL still follows, after SLURM's KillWait."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Watchdog:
    def __init__(self, rank: int, world_size: int, addr: str, port: int, dead_after_s: float,
                 budget: RequeueBudget | None = None, session: int = 0):
        self.rank, self.world_size, self.dead_after_s = rank, world_size, float(dead_after_s)
        self.budget = budget
        self.interval = max(self.dead_after_s / 10, 0.1)
        self.where = f"{addr}:{port}"
        self.store = dist.TCPStore(addr, port, world_size, is_master=False, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=max(self.dead_after_s, 1.0)))
        self.keys = [f"{_PREFIX}{session}/{r}" for r in range(world_size)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dime_ds-watchdog", daemon=True)

    def start(self) -> None:
        """Collective: every rank's key exists before anyone reads them all."""
        self.store.set(self.keys[self.rank], "0")
        C.barrier()
        self._thread.start()

    def stop(self, state: str) -> None:
        """Stop beating and write `state`, "done" or "failed: <reason>", what the others read. The
        thread's store calls end within the store's timeout (dead_after_s), so the join does too."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(Exception):  # rank 0 (the store) may be gone already: nothing to tell
            self.store.set(self.keys[self.rank], state[:2000])

    def leave(self, state: str) -> dict[int, str]:
        """`stop(state)`, then wait (up to dead_after_s) for the ranks this one must outlast: rank 0
        for all others, a failed rank for rank 0 (see the module docstring). Returns their last
        states (rank -> state), empty when it waited for none or the store is gone."""
        self.stop(state)
        if self.rank == 0:
            waited = [r for r in range(self.world_size) if r != 0]
        elif state.startswith("failed:"):
            waited = [0]
        else:
            return {}
        deadline = time.monotonic() + self.dead_after_s
        while True:
            try:
                states = dict(zip(waited, (v.decode("utf-8", "replace")
                                           for v in self.store.multi_get([self.keys[r] for r in waited]))))
            except Exception:  # noqa: BLE001 - rank 0 ended: nothing more to wait for
                return {}
            if all(map(_left, states.values())) or time.monotonic() > deadline:
                return states
            time.sleep(min(self.interval, 0.05))

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
        status, then = EXIT_RANK_LOST, "ckpt.resume=latest resumes from the last complete checkpoint"
        if job_id := sbatch_job_id():  # rank 0 may be the one lost: every survivor asks, the first requeues
            try:
                requeue_sbatch_job(job_id, reason=f"rank {self.rank}: a rank was lost", budget=self.budget)
            except RequeuesSpent as err:
                status, then = err.exit_status, str(err)
        message = f"rank {self.rank}: {message}. Ending this rank with status {status}; {then}"
        log.error("%s", message)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        print(f"dime_ds: {message}", file=sys.stderr, flush=True)
        os._exit(status)

    def wait_for_verdict(self) -> None:
        """After a collective failed: give the heartbeats time to name a dead rank (the thread then
        ends the process); returns when every rank still beats."""
        self._thread.join(self.dead_after_s + 3 * self.interval)


@contextlib.contextmanager
def watch_ranks(world, dead_after_s: float, budget: RequeueBudget | None = None) -> Iterator[Watchdog | None]:
    """Heartbeats for the block (a world of one, or dead_after_s=0: none; inside another block: that
    block's). Collective: every rank opens and leaves it. A collective that fails inside (gloo notices
    a closed peer at once) waits for the verdict, so the message names the rank; an error every rank
    raised alike (`AGREED_RANK`) needs none. `budget`: the job's requeue budget, for a lost rank."""
    global _active, _sessions
    if _active is not None:  # a pipeline's stage around each stage's own: one set of heartbeats
        yield _active
        return
    if world.world_size == 1 or not dead_after_s or not C.is_distributed():
        yield None
        return
    _sessions += 1
    watchdog = Watchdog(C.rank(), C.world_size(), world.master_addr, world.master_port, dead_after_s,
                        budget, session=_sessions)
    watchdog.start()
    _active = watchdog
    try:
        yield watchdog
    except BaseException as err:
        _outlive_the_step_kill()
        agreed = hasattr(err, AGREED_RANK)
        # how a collective with a dead peer fails; not a user's error (some are OSErrors), not an agreed one
        if isinstance(err, (RuntimeError, OSError)) and not isinstance(err, UserError) and not agreed:
            log.warning("rank %d: %s: %s; waiting up to %.0f s for the heartbeats to tell whether a rank died",
                        C.rank(), type(err).__name__, str(err)[:300], watchdog.dead_after_s)
            watchdog.wait_for_verdict()
        state = f"failed: {type(err).__name__}: {err}"[:2000]
        states = watchdog.leave(state)
        if not agreed and watchdog.rank != 0 and states.get(0) == state:
            with contextlib.suppress(AttributeError):  # rank 0 failed alike: it prints the error
                setattr(err, AGREED_RANK, watchdog.rank)
        raise
    else:
        watchdog.leave("done")
    finally:
        _active = None
