"""What a cluster job is, whichever way it reaches SLURM (`python -m dime_ds.launch` through submitit,
or `sbatch slurm/*.sh`): the stages by name, the sbatch request built from the config's `slurm.*`
section, the exit status of a stage that stopped after its checkpoint, the warning signal and its
lead, and the requeue of a plain sbatch job. Imports nothing heavy: the launcher and every entry
point read it.

Stopping and requeueing: SLURM sends SIGNAL `SIGNAL_LEAD_S` seconds before the time limit (SIGTERM on
preemption); the trainer checkpoints at the next step and its entry point returns STOPPED. Under
plain sbatch, rank 0 then requeues the job (`requeue_sbatch_job`, called by the training job through
distributed.stage.requeue_stopped) and every task exits with STOPPED after it; under submitit, launch.StageJob hands the stop to submitit's own requeue.
The requeued job resumes with `ckpt.resume=latest` (RESUME). The ranks that outlive a lost one exit
with STOPPED too (distributed/watchdog.py), but straight from their heartbeat thread, past run_entry."""
from __future__ import annotations

import importlib
import logging
import os
import subprocess
from typing import Callable, Mapping, NamedTuple, Sequence

from dime_ds.errors import UserError

log = logging.getLogger(__name__)

STOPPED = 3  # exit status: stopped after a complete checkpoint; requeue the job and resume from it
SIGNAL = "USR1"  # the trainer checkpoints on it (and on SIGTERM, which SLURM sends on preemption)
SIGNAL_LEAD_S = 120  # sent this long before the time limit: time to finish a step and checkpoint
RESUME = "ckpt.resume=latest"


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


def requeue_sbatch_job(job_id: str, reason: str = "stopped after a checkpoint") -> bool:
    """Rank 0's part after a stage returned STOPPED under plain sbatch (and every survivor's after a
    rank was lost). A failed `scontrol requeue` is a warning: on preemption SLURM is requeueing the job
    already. Returns whether it was requeued."""
    log.warning("%s: requeueing job %s (it resumes with %s)", reason, job_id, RESUME)
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or err
        log.warning("scontrol requeue %s failed (%s); the job is probably being requeued already",
                    job_id, str(detail).strip())
        return False
    return True
