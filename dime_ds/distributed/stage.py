"""One way to run a stage on every rank of a job: the process group made from the world view, errors
agreed by all ranks, results gathered to rank 0 or sent from it.

    with stage(cfg.dist, cfg.device) as ctx:            # group made here when the world has several ranks
        part = agreed(compute_share, ctx.rank, what="partial top-k")   # a failure on any rank fails all
        parts = gather_to_main(part)                     # only after the agreement: nobody waits for a rank that left
        report = on_main(lambda: merge_and_write(parts), what="writing the outputs")  # rank 0's result on all

Why agreement: a rank that raises leaves the collectives, and the others would wait in the next one
until the timeout (dist.timeout_min). Every agreement is one small all-gather (or broadcast) of the
errors; a rank that died outright is only noticed when that collective times out or breaks.

Errors are rebuilt on every rank the same way: a UserError (or a class the caller names in `keep`)
keeps its class and the first failing rank's message, so entry points still print a message and
exit 2; anything else becomes a StageError listing each failing rank's `Type: message`. The
failing rank raises it `from` its own exception, so its traceback is kept. In a world of one
(with or without a group) nothing is communicated and `fn`'s own exception propagates unchanged."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import torch

from dime_ds.distributed import collectives as C
from dime_ds.distributed.env import WorldInfo, backend_for, device_for, init_distributed, shutdown, world_info
from dime_ds.errors import UserError
from dime_ds.jobs import requeue_sbatch_job, sbatch_job_id

if TYPE_CHECKING:
    from dime_ds.config.schema import DistConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


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


def process_group(dist_cfg: DistConfig, device: str = "auto", *, always: bool = False) -> tuple[WorldInfo, torch.device, bool]:
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


def requeue_stopped(world: WorldInfo) -> None:
    """A run that stopped after its checkpoint, in a plain sbatch job: rank 0 asks SLURM to requeue
    the job (it resumes from latest) while the other ranks wait, so that none exits first: srun
    --kill-on-bad-exit would end rank 0 before its requeue. Submitit requeues its own jobs
    (launch.StageJob); outside SLURM nothing is asked."""
    job_id = sbatch_job_id()
    if job_id is None:
        return
    if world.rank == 0:
        requeue_sbatch_job(job_id)
    C.barrier()


@contextmanager
def stage(dist_cfg: DistConfig, device: str = "auto") -> Iterator[StageContext]:
    """The process group for one stage (see `process_group`), destroyed on leaving if made here; a
    group that already existed (an enclosing stage, a test harness) is used and left alone. A process
    that runs several stages opens one `stage` around them all: a group re-made on the port just
    released can race with the old store's shutdown (a rank connects to the closing server)."""
    info, dev, made = process_group(dist_cfg, device)
    try:
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


def _rebuild(reports: list[tuple], what: str) -> Exception:
    rank, cls, _, message = reports[0]
    if cls is not None:
        try:
            return cls(message)
        except Exception:  # noqa: BLE001 - a class whose constructor wants more than a message
            return UserError(message)
    lines = "\n".join(f"rank {r}: {name}: {msg}" for r, _, name, msg in reports)
    return StageError(f"{what} failed on {len(reports)} rank(s):\n{lines}")


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
