"""What a cluster job is, whichever way it reaches SLURM (`python -m dime_ds.launch` through submitit,
or `sbatch slurm/*.sh`): the stages by name, the sbatch request built from the config's `slurm.*`
section, the exit status of a stage that stopped after its checkpoint, the warning signal and its
lead, and the requeue of a plain sbatch job. Imports nothing heavy: the launcher and every entry
point read it.

Stopping and requeueing: SLURM sends SIGNAL `SIGNAL_LEAD_S` seconds before the time limit (SIGTERM on
preemption); the trainer checkpoints at the next step and its entry point returns STOPPED. Under
plain sbatch, rank 0 then requeues the job (`requeue_sbatch_job`, called by the training job through
distributed.stage.requeue_stopped) and every task exits with STOPPED after it; under submitit,
launch.StageJob hands the stop to submitit's own requeue.
The requeued job resumes with `ckpt.resume=latest` (RESUME). The ranks that outlive a lost one exit
with STOPPED too (distributed/watchdog.py), but straight from their heartbeat thread, past run_entry.

The requeue budget (`RequeueBudget`, slurm.max_requeues): a job requeued that many times in a row
without progress (no newer complete checkpoint than at the previous requeue) is not requeued again:
it ends with REQUEUES_SPENT and a message saying why. Progress resets the count, so a long run with an
occasional lost node goes on, while one whose rank dies before its first checkpoint every time stops.
The count lives beside the checkpoints (REQUEUE_RECORD, written atomically) and is written once per
run, by rank 0 at the start of a run SLURM restarted (SLURM_RESTART_COUNT; `RequeueBudget.charge`),
so a requeue SLURM made on its own (a failed node, a preemption) counts too; the ranks that ask for a
requeue only read it (`RequeueBudget.check`), every one the same record, so they agree without
talking (several survivors of a lost rank may ask at once; none could be the one writer)."""
from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

from dime_ds import atomic
from dime_ds.errors import UserError

log = logging.getLogger(__name__)

STOPPED = 3  # exit status: stopped after a complete checkpoint; requeue the job and resume from it
SIGNAL = "USR1"  # the trainer checkpoints on it (and on SIGTERM, which SLURM sends on preemption)
SIGNAL_LEAD_S = 120  # sent this long before the time limit: time to finish a step and checkpoint
RESUME = "ckpt.resume=latest"
REQUEUES_SPENT = 4  # exit status: requeued slurm.max_requeues times without progress; not requeued again
REQUEUE_RECORD = "requeues.json"  # the job's requeue count, in its checkpoint directory (ckpt.dir)
PROGRESS_MARK = "latest"  # the checkpoint directory's file naming its newest complete checkpoint (DeepSpeed's)


class Stage(NamedTuple):
    module: str  # the entry module whose `main(overrides)` runs it
    args: tuple[str, ...] = ()  # the overrides that select it there
    aliases: tuple[tuple[str, str], ...] = ()  # its shorthands (prefix -> config key), as its main expands them


STAGES: dict[str, Stage] = {
    "distill": Stage("dime_ds.distill"),
    "curate": Stage("dime_ds.curate", ("curate.stage=metaclip",)),
    "semantic_balance": Stage("dime_ds.curate", ("curate.stage=semantic_balance",)),
    "cluster": Stage("dime_ds.curate", ("curate.stage=cluster",)),
    "embed": Stage("dime_ds.match", ("match.stage=embed",)),
    "match": Stage("dime_ds.match", ("match.stage=match",)),
    "eval": Stage("dime_ds.eval", aliases=(("model=", "eval.model="), ("pretrained=", "eval.pretrained="))),
}


def check_stage(name: str) -> Stage:
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; one of {', '.join(STAGES)}")
    return STAGES[name]


def config_overrides(name: str, overrides: Sequence[str]) -> list[str]:
    """`overrides` with the stage's shorthands spelled out, so that the launcher composes the config
    the stage will (without importing the stage)."""
    aliases = check_stage(name).aliases
    out = []
    for o in overrides:
        key = next((key for prefix, key in aliases if o.startswith(prefix)), None)
        out.append(key + o.split("=", 1)[1] if key else o)
    return out


def entry_main(name: str) -> Callable[[Sequence[str]], int]:
    """The stage's `main`, imported now (inside the job, never by the launcher)."""
    module_name = check_stage(name).module
    module = importlib.import_module(module_name)
    return getattr(module, "main", None) or importlib.import_module(module_name + ".__main__").main


def tasks_per_node(slurm_cfg, asked: int | None = None) -> int:
    """One task per GPU; with gpus_per_node=0, `asked` CPU tasks (default 1)."""
    gpus = slurm_cfg.gpus_per_node
    if gpus > 0:
        if asked not in (None, gpus):
            raise UserError("--tasks-per-node follows --gpus-per-node (one task per GPU); set only one")
        return gpus
    return asked or 1


def sbatch_request(slurm_cfg, name: str, tasks: int) -> dict[str, object]:
    """The sbatch options of a job (option -> value; True: a bare flag): resources from the config,
    the signal, requeue and log policy from here. What launch submits and prints with --dry-run, and
    what each slurm/*.sh script's #SBATCH lines must equal (tests/slurm/test_launch_dry_run.py)."""
    s = slurm_cfg
    request: dict[str, object] = {"job-name": name, "nodes": s.nodes, "ntasks-per-node": tasks}
    if s.gpus_per_node > 0:
        request["gpus-per-node"] = s.gpus_per_node
    request.update({"cpus-per-task": s.cpus_per_task, "mem": f"{s.mem_gb}G" if s.mem_gb > 0 else "0",
                    "time": s.time_min, "signal": f"{SIGNAL}@{SIGNAL_LEAD_S}", "requeue": True,
                    "open-mode": "append"})  # logs of a requeued job continue the same files
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            request[key] = getattr(s, key)
    return request


def sbatch_lines(request: Mapping[str, object]) -> list[str]:
    return [f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={v}" for k, v in request.items()]


def sbatch_job_id(environ: Mapping[str, str] = os.environ) -> str | None:
    """The id of the plain sbatch job this task runs in; None outside SLURM and under submitit, which
    requeues its own jobs (launch.StageJob)."""
    if environ.get("SUBMITIT_EXECUTOR"):
        return None
    return environ.get("SLURM_JOB_ID") or None


def slurm_job_id(environ: Mapping[str, str] = os.environ) -> str | None:
    """The id of the SLURM job this task runs in, plain sbatch or submitit; None outside SLURM."""
    return environ.get("SLURM_JOB_ID") or None


def slurm_restart_count(environ: Mapping[str, str] = os.environ) -> int:
    """How many times SLURM has restarted this job (requeued it, by anyone); 0 on its first run."""
    try:
        return int(environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


class RequeuesSpent(UserError):
    """The job was requeued slurm.max_requeues times in a row without progress."""

    exit_status = REQUEUES_SPENT  # cli.run_entry exits with it (a UserError's status is 2 otherwise)


@dataclass(frozen=True)
class RequeueBudget:
    """The requeue count of one job, in `ckpt_dir` (see the module docstring). The record:
    {"job": id, "restart": the SLURM restart that was counted last, "requeues": requeues in a row
    without progress, "progress": the checkpoint `latest` named then}."""

    ckpt_dir: Path
    max_requeues: int

    @classmethod
    def of(cls, cfg) -> RequeueBudget:
        return cls(Path(cfg.ckpt.dir), int(cfg.slurm.max_requeues))

    @property
    def path(self) -> Path:
        return self.ckpt_dir / REQUEUE_RECORD

    def progress(self) -> str | None:
        mark = self.ckpt_dir / PROGRESS_MARK
        try:
            return mark.read_text().strip() or None
        except OSError:  # no checkpoint yet
            return None

    def record(self, job_id: str) -> dict:
        """This job's record; a fresh one when there is none or it is another job's (a new submission
        of the same run starts with the whole budget)."""
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            record = None
        except (OSError, ValueError) as err:  # written atomically, so only a foreign file gets here
            log.warning("%s is unreadable (%s): counting requeues from zero", self.path, err)
            record = None
        if not isinstance(record, dict) or record.get("job") != job_id:
            return {"job": job_id, "restart": 0, "requeues": 0, "progress": self.progress()}
        return record

    def next_requeue(self, job_id: str) -> int:
        """The number the next requeue has: 1 after progress, else one more than the requeues so far."""
        record = self.record(job_id)
        return (record.get("requeues", 0) if record.get("progress") == self.progress() else 0) + 1

    def check(self, job_id: str, reason: str = "") -> int:
        """Before asking for a requeue: its number, or RequeuesSpent past the budget. Reads only."""
        n = self.next_requeue(job_id)
        if n > self.max_requeues:
            raise RequeuesSpent(self._spent(job_id, n - 1, reason))
        return n

    def charge(self, job_id: str, restart: int) -> int:
        """Rank 0, at the start of a run SLURM restarted (`restart` = SLURM_RESTART_COUNT): count that
        requeue, once per restart, and return the count; RequeuesSpent when it is past the budget
        (SLURM requeued the job on its own: a lost node, a preemption, a manual requeue)."""
        record = self.record(job_id)
        if restart <= record.get("restart", 0):
            return record.get("requeues", 0)  # counted already (an enclosing stage, an earlier one of this run)
        n = self.next_requeue(job_id)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.path, {"job": job_id, "restart": restart, "requeues": n, "progress": self.progress()})
        log.warning("job %s restarted (restart %d): requeue %d of slurm.max_requeues=%d since the last progress",
                    job_id, restart, n, self.max_requeues)
        if n > self.max_requeues:
            raise RequeuesSpent(self._spent(job_id, n - 1, "SLURM restarted it once more"))
        return n

    def _spent(self, job_id: str, requeues: int, reason: str) -> str:
        return (f"job {job_id} was requeued {requeues} time(s) in a row without progress (no newer checkpoint "
                f"in {self.ckpt_dir}) and slurm.max_requeues={self.max_requeues}: not requeueing it again"
                + (f" ({reason})" if reason else "") + ". The log above tells why each run ended; fix that and "
                "submit the job again (a new job starts with the whole budget), or raise slurm.max_requeues")


def requeue_sbatch_job(job_id: str, reason: str = "stopped after a checkpoint",
                       budget: RequeueBudget | None = None) -> bool:
    """Rank 0's part after a stage returned STOPPED under plain sbatch (and every survivor's after a
    rank was lost). With a `budget`, RequeuesSpent instead of a requeue past it. A failed `scontrol
    requeue` is a warning: on preemption SLURM is requeueing the job already. Returns whether it was
    requeued."""
    count = ""
    if budget is not None:
        count = (f", requeue {budget.check(job_id, reason)} of slurm.max_requeues={budget.max_requeues} since the "
                 "last progress")
    log.warning("%s: requeueing job %s (it resumes with %s%s)", reason, job_id, RESUME, count)
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or err
        log.warning("scontrol requeue %s failed (%s); the job is probably being requeued already",
                    job_id, str(detail).strip())
        return False
    return True
