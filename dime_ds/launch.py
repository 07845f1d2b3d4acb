"""`python -m dime_ds.launch [flags] stage=<name> [hydra overrides]`: submit one stage (distill, curate,
semantic_balance, cluster, embed, match, eval) to SLURM through submitit (or run it on this machine with --local).

    python -m dime_ds.launch --nodes 8 stage=distill experiment=vitb32_from_vitl14
    python -m dime_ds.launch --dry-run --nodes 8 stage=distill experiment=vitb32_from_vitl14
    python -m dime_ds.launch --local --gpus-per-node 0 --tasks-per-node 2 stage=distill experiment=demo

Resources come from the config's `slurm.*` section; a flag overrides that value (and is recorded as a
`slurm.*` override, so the job's saved config says what it ran with). One task per GPU; with
`--gpus-per-node 0` the tasks are CPU processes, `--tasks-per-node` of them (default 1).

This module knows stages by name only (dime_ds/jobs.py): the job imports the stage's entry module
inside the job and calls its `main(overrides)`. What SLURM is asked for (resources, warning signal,
requeue) is jobs.sbatch_request, the same request slurm/*.sh make. On preemption or time-out the
trainer checkpoints and its stage returns jobs.STOPPED; the job then hands the stop to submitit's own
signal handler, which the trainer's had replaced: on rank 0 it calls `StageJob.checkpoint()` (this
stage again, with `ckpt.resume=latest`), requeues the job and exits. submitit counts a stop near the
time limit against the executor's max_num_timeout (3) and then gives up with an error; preemptions
are not counted by submitit, but every stop is by the job's requeue budget (slurm.max_requeues in a
row without a newer checkpoint, jobs.RequeueBudget): past it the stop is not handed to submitit, and
the job fails with jobs.REQUEUES_SPENT.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import submitit
from omegaconf import OmegaConf

from dime_ds import jobs
from dime_ds.cli import run_entry
from dime_ds.config import load_config
from dime_ds.errors import UserError

log = logging.getLogger(__name__)

# flag name -> config key in the `slurm` section
FLAG_KEYS = {"nodes": "nodes", "gpus_per_node": "gpus_per_node", "cpus_per_task": "cpus_per_task",
             "mem": "mem_gb", "time": "time_min", "partition": "partition", "account": "account", "qos": "qos",
             "constraint": "constraint", "job_dir": "job_dir"}
# sbatch option -> submitit's executor-independent parameter (the local executor reads them too);
# every other option of the request goes to SLURM as it is
SUBMITIT_PARAMS = {"job-name": "name", "nodes": "nodes", "ntasks-per-node": "tasks_per_node",
                   "gpus-per-node": "gpus_per_node", "cpus-per-task": "cpus_per_task", "time": "timeout_min"}


def submitit_signal() -> signal.Signals:
    """The signal submitit's job environment requeues on (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL)."""
    return signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]


class StageJob(submitit.helpers.Checkpointable):
    """What submitit runs on every task: the stage's entry point, in this process."""

    def __init__(self, stage: str, overrides: Sequence[str], budget: jobs.RequeueBudget | None = None):
        jobs.check_stage(stage)
        self.stage, self.overrides = stage, list(overrides)
        self.budget = budget  # the job's requeue budget, from the config at submission (None: no limit)

    def argv(self) -> list[str]:
        return [*jobs.STAGES[self.stage].args, *self.overrides]

    def run_stage(self) -> int:
        return run_entry(jobs.entry_main(self.stage), self.argv())

    def __call__(self) -> int:
        requeue = signal.getsignal(submitit_signal())  # submitit's, set before the job ran; the trainer replaces it
        code = self.run_stage()
        if code == jobs.STOPPED:
            if not self._within_budget():
                code = jobs.REQUEUES_SPENT
            else:
                self._requeue(requeue)
        if code != 0:
            raise RuntimeError(f"stage {self.stage} exited with status {code}")
        return code

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """The same stage, resuming from the latest checkpoint (the trainer wrote it on the signal)."""
        overrides = [o for o in self.overrides if not o.startswith("ckpt.resume=")] + [jobs.RESUME]
        return submitit.helpers.DelayedSubmission(StageJob(self.stage, overrides, self.budget))

    def _within_budget(self) -> bool:
        """Whether the job's requeue budget allows one more requeue (every task reads the same record)."""
        job_id = jobs.slurm_job_id()
        if job_id is None or self.budget is None:  # submitit's local executor: nothing counts
            return True
        try:
            n = self.budget.check(job_id, f"stage {self.stage} stopped")
        except jobs.RequeuesSpent as err:
            log.error("%s", err)
            return False
        log.warning("stage %s stopped: requeue %d of slurm.max_requeues=%d since the last progress", self.stage, n,
                    self.budget.max_requeues)
        return True

    def _requeue(self, handler) -> None:
        """The stage stopped after its checkpoint: give submitit its signal back and raise it. Its
        handler, on rank 0, stores `checkpoint()` as the job, requeues it and exits (or raises when
        the time-outs are used up); on the other ranks it returns, and the task exits here."""
        if not callable(handler):
            raise RuntimeError(f"stage {self.stage} stopped outside a submitit job: nothing requeues it")
        signal.signal(submitit_signal(), handler)
        try:
            signal.raise_signal(submitit_signal())
        except subprocess.CalledProcessError as err:  # its `scontrol requeue`: on preemption SLURM requeues already
            log.warning("%s (the job is probably being requeued already)", err)
        log.warning("stage %s stopped after a checkpoint: exiting for the requeue", self.stage)
        sys.exit(jobs.STOPPED)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dime_ds.launch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int, help="tasks per node follow it; 0: CPU tasks")
    p.add_argument("--tasks-per-node", type=int, default=None, help="with --gpus-per-node 0 (default 1)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem", type=int, help="GB per node; 0 = all of it")
    p.add_argument("--time", type=int, help="minutes")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--job-dir", help="jobs go to <job-dir>/<name>/<job id>")
    p.add_argument("--local", action="store_true", help="run the same job on this machine")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch request and the config; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job and exit with its status")
    p.add_argument("overrides", nargs="*", help="stage=<name> and Hydra overrides")
    return p.parse_args(list(argv))


def split_stage(overrides: Sequence[str]) -> tuple[str, list[str]]:
    stages = [o.split("=", 1)[1] for o in overrides if o.startswith("stage=")]
    if len(stages) != 1 or stages[0] not in jobs.STAGES:
        raise UserError(f"give exactly one stage=<{'|'.join(jobs.STAGES)}>, got {stages or 'none'}")
    return stages[0], [o for o in overrides if not o.startswith("stage=")]


def _override_value(value) -> str:
    return "null" if value is None else str(value)


def plan(args: argparse.Namespace) -> dict:
    """Everything the launch needs, resolved from the config and the flags; no side effects."""
    stage, overrides = split_stage(args.overrides)
    overrides = jobs.config_overrides(stage, overrides)  # eval's model=/pretrained=, so that this config composes
    flags = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}
    overrides += [f"slurm.{key}={_override_value(v)}" for key, v in flags.items()]  # the flag wins
    cfg = load_config(overrides)
    if args.local and cfg.slurm.nodes != 1:
        raise UserError("--local runs on this machine: use --nodes 1")
    request = jobs.sbatch_request(cfg.slurm, cfg.name, jobs.tasks_per_node(cfg.slurm, args.tasks_per_node))
    return dict(stage=stage, overrides=overrides, cfg=cfg, request=request,
                folder=Path(cfg.slurm.job_dir) / cfg.name / "%j", tensorboard=Path(cfg.run_dir) / "tensorboard")


def executor(p: dict, local: bool) -> submitit.AutoExecutor:
    """submitit's executor asking for exactly `p["request"]`."""
    request = p["request"]
    ex = submitit.AutoExecutor(folder=p["folder"], cluster="local" if local else "slurm")
    ex.update_parameters(**{SUBMITIT_PARAMS[k]: v for k, v in request.items() if k in SUBMITIT_PARAMS},
                         slurm_additional_parameters={k: v for k, v in request.items() if k not in SUBMITIT_PARAMS})
    return ex


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    p = plan(args)
    job_fn = StageJob(p["stage"], p["overrides"], jobs.RequeueBudget.of(p["cfg"]))
    request = p["request"]
    n_tasks = request["nodes"] * request["ntasks-per-node"]
    if args.dry_run:
        print("# sbatch request (not submitted)")
        print("\n".join(jobs.sbatch_lines(request)))
        print(f"# job folder: {p['folder']} (submitit's, with every rank's logs)")
        print(f"# srun starts {n_tasks} task(s), each running stage {p['stage']}: "
              f"{jobs.STAGES[p['stage']].module} {' '.join(map(shlex.quote, job_fn.argv()))}")
        print("# resolved config")
        print(OmegaConf.to_yaml(p["cfg"]))
        return 0
    job = executor(p, args.local).submit(job_fn)
    print(f"submitted job {job.job_id} ({'local' if args.local else 'slurm'}): stage {p['stage']}, "
          f"{request['nodes']} node(s) x {request['ntasks-per-node']} task(s)")
    print(f"job folder: {job.paths.folder}")
    for task in range(n_tasks):
        paths = job.task(task).paths
        print(f"rank {task} logs: {paths.stdout} {paths.stderr}")
    print(f"tensorboard --logdir {p['tensorboard']}")
    sys.stdout.flush()
    if not args.wait:
        return 0
    try:
        job.results()  # one result per task
    except Exception as err:  # submitit re-raises the job's failure with its traceback
        print(f"job {job.job_id} failed: {err}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} completed")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main))
