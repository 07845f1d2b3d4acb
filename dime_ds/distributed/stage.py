"""One way to run a stage on every rank of a job: the process group made from the world view, errors
agreed by all ranks, results gathered to rank 0 or sent from it.

    with stage(cfg.dist, cfg.device) as ctx:            # group made here when the world has several ranks
        part = agreed(compute_share, ctx.rank, what="partial top-k")   # a failure on any rank fails all
        parts = gather_to_main(part)                     # only after the agreement: nobody waits for a rank that left
        report = on_main(lambda: merge_and_write(parts), what="writing the outputs")  # rank 0's result on all

Why agreement: a rank that raises leaves the collectives, and the others would wait in the next one
until the timeout (dist.timeout_min). Every agreement is one small all-gather (or broadcast) of the
errors. A rank that died outright is noticed by the heartbeats every stage runs (distributed/
watchdog.py, dist.dead_rank_s): the survivors end as the training job's do, naming it, with status 3
(requeued under SLURM, within the job's requeue budget, which each run SLURM restarted counts first).

Errors are rebuilt on every rank the same way: a UserError (or a class the caller names in `keep`)
keeps its class and the first failing rank's message, so entry points still print a message and
exit 2; anything else becomes a StageError listing each failing rank's `Type: message`. The
failing rank raises it `from` its own exception, so its traceback is kept. An agreed error carries
`agreed_rank` (this rank's number): only rank 0 prints it (cli.run_entry), every rank exits with the
same status. In a world of one (with or without a group) nothing is communicated and `fn`'s own
exception propagates unchanged."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import torch
from omegaconf import DictConfig

from dime_ds.distributed import collectives as C
from dime_ds.distributed.env import WorldInfo, backend_for, device_for, init_distributed, shutdown, world_info
from dime_ds.distributed.watchdog import AGREED_RANK, watch_ranks
from dime_ds.errors import UserError
from dime_ds.jobs import (RequeueBudget, RequeuesSpent, requeue_sbatch_job, sbatch_job_id, slurm_job_id,
                          slurm_restart_count)

if TYPE_CHECKING:
    from dime_ds.config.schema import DistConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


class StageError(RuntimeError):
    """A failure (not the user's) on one or more ranks, raised on every rank."""


@dataclass(frozen=True)
class StageContext:
    """Where this process runs a stage: the environment's world view, its device, and its rank in
    the process group (which an enclosing caller may have made)."""

    world: WorldInfo
    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_group(dist_cfg: DistConfig, device: str = "auto", *,
                  always: bool = False) -> tuple[WorldInfo, torch.device, bool]:
    """(world view, device, whether a group was made now). A group is made from `dist_cfg`
    (backend, timeout_min) when none exists and the world has several ranks, or `always`
    (DeepSpeed wants one even for a world of one). With `always`, an existing group is checked
    against the world view and the world exported, as engine/run.py needs (init_distributed)."""
    info = world_info()
    dev = device_for(info, device)
    made = not C.is_distributed() and (always or info.world_size > 1)
    if made or always:
        init_distributed(info, backend_for(dev, dist_cfg.backend), dist_cfg.timeout_min)
    if C.is_distributed() and (C.rank(), C.world_size()) != (info.rank, info.world_size):
        log.warning("process group rank %d/%d differs from the environment's %d/%d; using the group",
                    C.rank(), C.world_size(), info.rank, info.world_size)
    return info, dev, made


def requeue_stopped(world: WorldInfo, budget: RequeueBudget | None = None) -> None:
    """A run that stopped after its checkpoint, in a plain sbatch job: rank 0 asks SLURM to requeue
    the job (it resumes from latest) while the other ranks wait, so that none exits first: srun
    --kill-on-bad-exit would end rank 0 before its requeue. Past the `budget`, no requeue: every rank
    raises RequeuesSpent (each reads the same record, so they agree without a message). Submitit
    requeues its own jobs (launch.StageJob); outside SLURM nothing is asked."""
    job_id = sbatch_job_id()
    if job_id is None:
        return
    spent = None
    try:
        if world.rank == 0:
            requeue_sbatch_job(job_id, budget=budget)
        elif budget is not None:
            budget.check(job_id)
    except RequeuesSpent as err:
        spent = err
    C.barrier()
    if spent is not None:
        raise _agreed(spent)


def job_budget(dist_cfg: DistConfig) -> RequeueBudget | None:
    """The requeue budget of the job whose config has `dist_cfg` as its `dist` section (the stages hand
    the runner that section alone); None for a section standing alone (a test's namespace)."""
    root = dist_cfg._get_root() if isinstance(dist_cfg, DictConfig) else None
    if root is None or "slurm" not in root or "ckpt" not in root:
        return None
    return RequeueBudget.of(root)


def count_requeue(budget: RequeueBudget | None) -> None:
    """Collective, at the start of a run: when SLURM restarted the job, rank 0 counts the requeue in
    the budget's record (once per restart: nested stages count nothing more), and past the budget
    every rank raises RequeuesSpent before any work. Nothing outside SLURM or on a first run."""
    job_id, restart = slurm_job_id(), slurm_restart_count()
    if budget is None or job_id is None or restart == 0:
        return
    on_main(budget.charge, job_id, restart, what="counting the requeue")


@contextmanager
def stage(dist_cfg: DistConfig, device: str = "auto") -> Iterator[StageContext]:
    """The process group for one stage (see `process_group`), destroyed on leaving if made here; a
    group that already existed (an enclosing stage, a test harness) is used and left alone. Inside it:
    a restarted job's requeue counted first (`count_requeue`), then heartbeats (dist.dead_rank_s),
    one set for nested stages, as the training job runs them (engine/run.py). A process
    that runs several stages opens one `stage` around them all: a group re-made on the port just
    released can race with the old store's shutdown (a rank connects to the closing server)."""
    info, dev, made = process_group(dist_cfg, device)
    try:
        budget = job_budget(dist_cfg)
        count_requeue(budget)
        # a bare namespace (tests) may lack dead_rank_s: no heartbeats then
        with watch_ranks(info, getattr(dist_cfg, "dead_rank_s", 0), budget):
            yield StageContext(world=info, device=dev, rank=C.rank(), world_size=C.world_size())
    finally:
        if made:
            shutdown()


def _report(error: BaseException | None, keep: tuple[type, ...]) -> tuple | None:
    """What a rank tells the others about its error: (rank, class if it can be rebuilt, type name,
    message). Classes travel by reference (every rank runs the same code), never instances."""
    if error is None:
        return None
    rebuild = type(error) if isinstance(error, (UserError, *keep)) else None
    return C.rank(), rebuild, type(error).__name__, str(error)


def _agreed(error: E) -> E:
    """`error`, marked as raised alike on every rank (see the module docstring)."""
    setattr(error, AGREED_RANK, C.rank())
    return error


def _rebuild(reports: list[tuple], what: str) -> Exception:
    rank, cls, _, message = reports[0]
    if cls is not None:
        try:
            return _agreed(cls(message))
        except Exception:  # noqa: BLE001 - a class whose constructor wants more than a message
            return _agreed(UserError(message))
    lines = "\n".join(f"rank {r}: {name}: {msg}" for r, _, name, msg in reports)
    return _agreed(StageError(f"{what} failed on {len(reports)} rank(s):\n{lines}"))


def raise_agreed(error: BaseException | None, what: str = "the stage", keep: tuple[type, ...] = ()) -> None:
    """Collective: every rank passes its error (None: fine). When any rank failed, every rank raises
    the same error (see the module docstring); else returns. Also a barrier."""
    if C.world_size() == 1:
        if error is not None:
            raise error
        return
    reports = [r for r in C.all_gather_object(_report(error, keep)) if r is not None]
    if reports:
        raise _rebuild(reports, what) from error


def agreed(fn: Callable[..., T], *args: Any, what: str = "the stage", keep: tuple[type, ...] = (),
           **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on every rank; its result here, or on every rank the agreed error of
    any rank that raised."""
    if C.world_size() == 1:
        return fn(*args, **kwargs)
    try:
        result = fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - agreed with the others just below
        if not isinstance(err, UserError):  # a user error's message is the whole story: rank 0 prints it
            log.exception("rank %d: %s failed", C.rank(), what)
        raise_agreed(err, what, keep)
        raise  # not reached: raise_agreed raises when any rank (this one) failed
    raise_agreed(None, what, keep)
    return result


def on_main(fn: Callable[..., T], *args: Any, what: str = "the stage", keep: tuple[type, ...] = (),
            **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on rank 0 only; its result on every rank (picklable), or its agreed
    error raised on every rank. The other ranks wait here for rank 0."""
    if C.world_size() == 1:
        return fn(*args, **kwargs)
    result, error = None, None
    if C.is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - sent to the others just below
            if not isinstance(err, UserError):
                log.exception("rank 0: %s failed", what)
            error = err
    result, report = C.broadcast_object((result, _report(error, keep)))
    if report is not None:
        raise _rebuild([report], what) from error
    return result


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's `obj` on rank 0 in rank order, None elsewhere. Call it only after the ranks have
    agreed that each has its part (`agreed`), so none waits for a rank that failed."""
    return C.gather_object_to_main(obj)
