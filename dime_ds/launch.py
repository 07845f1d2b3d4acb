"""`python -m dime_ds.launch [flags] stage=<name> [hydra overrides]`: submit one stage (distill, curate,
semantic_balance, cluster, embed, match, eval) to SLURM through submitit (or run it on this machine with --local).

    python -m dime_ds.launch --nodes 8 stage=distill experiment=vitb32_from_vitl14
    python -m dime_ds.launch --dry-run --nodes 8 stage=distill experiment=vitb32_from_vitl14
    python -m dime_ds.launch --local --gpus-per-node 0 --tasks-per-node 2 stage=distill experiment=demo

Resources come from the config's `slurm.*` section; a flag overrides that value (and is recorded as a
`slurm.*` override, so the job's saved config says what it ran with). One task per GPU; with
`--gpus-per-node 0` the tasks are CPU processes, `--tasks-per-node` of them (default 1).

This module knows stages by name only: the job imports the stage's entry module inside the job and
calls its `main(overrides)`. On preemption or time-out (SIGUSR1/SIGTERM) the trainer checkpoints and
returns "stopped"; the job then hands submitit a copy of itself with `ckpt.resume=latest` and
requeues, so the requeued job resumes from that checkpoint.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import submitit
from omegaconf import OmegaConf

from dime_ds.cli import run_entry
from dime_ds.config import load_config
from dime_ds.errors import UserError

log = logging.getLogger(__name__)

# stage -> (entry module, arguments the module needs to select the stage)
STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "distill": ("dime_ds.distill", ()),
    "curate": ("dime_ds.curate", ("stage=metaclip",)),
    "semantic_balance": ("dime_ds.curate", ("stage=semantic_balance",)),
    "cluster": ("dime_ds.curate", ("stage=cluster",)),
    "embed": ("dime_ds.match", ("stage=embed",)),
    "match": ("dime_ds.match", ("stage=match",)),
    "eval": ("dime_ds.eval", ()),
}
RESUME = "ckpt.resume=latest"
STOPPED = 3  # entry points' exit status: stopped by a signal after checkpointing
SIGNAL_DELAY_S = 120  # SIGUSR1 this long before the time limit: time for a checkpoint
# flag name -> config key in the `slurm` section
FLAG_KEYS = {"nodes": "nodes", "gpus_per_node": "gpus_per_node", "cpus_per_task": "cpus_per_task",
             "mem": "mem_gb", "time": "time_min", "partition": "partition", "account": "account", "qos": "qos",
             "constraint": "constraint", "job_dir": "job_dir"}


class StageJob(submitit.helpers.Checkpointable):
    """What submitit runs on every task: the stage's entry point, in this process."""

    def __init__(self, stage: str, overrides: Sequence[str]):
        if stage not in STAGES:
            raise UserError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
        self.stage, self.overrides = stage, list(overrides)

    def argv(self) -> list[str]:
        return [*STAGES[self.stage][1], *self.overrides]

    def __call__(self) -> int:
        module_name = STAGES[self.stage][0]
        module = importlib.import_module(module_name)  # lazily: only inside the job
        main = getattr(module, "main", None) or importlib.import_module(module_name + ".__main__").main
        code = run_entry(main, self.argv())
        if code == STOPPED:
            self._requeue()
        if code != 0:
            raise RuntimeError(f"stage {self.stage} exited with status {code}")
        return code

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """The same stage, resuming from the latest checkpoint (the trainer wrote it on the signal)."""
        overrides = [o for o in self.overrides if not o.startswith("ckpt.resume=")] + [RESUME]
        return submitit.helpers.DelayedSubmission(StageJob(self.stage, overrides))

    def _requeue(self) -> None:
        """The trainer's own SIGUSR1/SIGTERM handler replaced submitit's, so do submitit's part here:
        rank 0 stores `checkpoint()` as the job's pickle and requeues; then every task exits without a
        result, as submitit's handler would."""
        env = submitit.JobEnvironment()
        if env.global_rank == 0:
            paths = env.paths
            old = submitit.helpers.DelayedSubmission.load(paths.submitted_pickle)
            new = self.checkpoint()
            countdown = old._timeout_countdown - 1
            if countdown < 0:
                raise RuntimeError("stopped too many times (submitit's max_num_timeout); not requeued")
            new.set_timeout(old._timeout_min, countdown)
            tmp = paths.submitted_pickle.with_suffix(".tmp.pkl")
            new.dump(tmp)
            tmp.replace(paths.submitted_pickle)
            try:
                env._requeue(countdown)
            except subprocess.CalledProcessError as err:  # SLURM is already requeueing it (preemption)
                log.warning("scontrol requeue: %s (the job is probably being requeued already)", err)
        log.warning("stage %s stopped after a checkpoint: exiting for requeue", self.stage)
        sys.exit(-1)


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
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the config; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job and exit with its status")
    p.add_argument("overrides", nargs="*", help="stage=<name> and Hydra overrides")
    return p.parse_args(list(argv))


def split_stage(overrides: Sequence[str]) -> tuple[str, list[str]]:
    stages = [o.split("=", 1)[1] for o in overrides if o.startswith("stage=")]
    if len(stages) != 1 or stages[0] not in STAGES:
        raise UserError(f"give exactly one stage=<{'|'.join(STAGES)}>, got {stages or 'none'}")
    return stages[0], [o for o in overrides if not o.startswith("stage=")]


def _override_value(value) -> str:
    return "null" if value is None else str(value)


def plan(args: argparse.Namespace) -> dict:
    """Everything the launch needs, resolved from the config and the flags; no side effects."""
    stage, overrides = split_stage(args.overrides)
    if stage == "eval":  # its model=/pretrained=/suite= shorthands, so that this config composes too
        from dime_ds.eval.__main__ import expand_aliases

        overrides = expand_aliases(overrides)
    flags = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}
    overrides += [f"slurm.{key}={_override_value(v)}" for key, v in flags.items()]  # the flag wins
    cfg = load_config(overrides)
    s = cfg.slurm
    if s.gpus_per_node > 0:
        if args.tasks_per_node not in (None, s.gpus_per_node):
            raise UserError("--tasks-per-node follows --gpus-per-node (one task per GPU); set only one")
        tasks_per_node = s.gpus_per_node
    else:
        tasks_per_node = args.tasks_per_node or 1
    if args.local and s.nodes != 1:
        raise UserError("--local runs on this machine: use --nodes 1")
    params: dict = dict(name=cfg.name, nodes=s.nodes, tasks_per_node=tasks_per_node, cpus_per_task=s.cpus_per_task,
                        timeout_min=s.time_min)
    if s.gpus_per_node > 0:
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb > 0:
        params["mem_gb"] = s.mem_gb
    # submitit's own warning signal is SIGUSR2, which would requeue without a checkpoint: the trainer
    # checkpoints on SIGUSR1 (and SIGTERM, which SLURM sends on preemption), so ask SLURM for SIGUSR1.
    slurm: dict = {"signal_delay_s": SIGNAL_DELAY_S, "additional_parameters": {"signal": f"USR1@{SIGNAL_DELAY_S}"}}
    if s.mem_gb == 0:
        slurm["mem"] = "0"  # all memory of each node
    for key in ("partition", "account", "qos", "constraint"):
        if s[key]:
            slurm[key] = s[key]
    return dict(stage=stage, overrides=overrides, cfg=cfg, params=params, slurm=slurm,
                folder=Path(s.job_dir) / cfg.name / "%j", tensorboard=Path(cfg.run_dir) / "tensorboard")


def sbatch_script(p: dict) -> str:
    """The sbatch file submitit would write for this plan (built by submitit itself, not submitted)."""
    from submitit.slurm import slurm as submitit_slurm

    eq = submitit_slurm.SlurmExecutor._equivalence_dict()
    params = {eq.get(k, k): v for k, v in p["params"].items()}
    if "mem" in params:
        params["mem"] = submitit_slurm._convert_mem(params["mem"])
    params.update(p["slurm"])
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(p["folder"]))])
    return submitit_slurm._make_sbatch_string(command=command, folder=p["folder"], **params)


def executor(p: dict, local: bool) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=p["folder"], cluster="local" if local else "slurm")
    ex.update_parameters(**p["params"], **{f"slurm_{k}": v for k, v in p["slurm"].items()})
    return ex


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    p = plan(args)
    job_fn = StageJob(p["stage"], p["overrides"])
    if args.dry_run:
        print("# sbatch script (not submitted)")
        print(sbatch_script(p))
        print("# resolved config")
        print(OmegaConf.to_yaml(p["cfg"]))
        print(f"# stage {p['stage']}: {STAGES[p['stage']][0]} {' '.join(map(shlex.quote, job_fn.argv()))}")
        return 0
    job = executor(p, args.local).submit(job_fn)
    n_tasks = p["params"]["nodes"] * p["params"]["tasks_per_node"]
    print(f"submitted job {job.job_id} ({'local' if args.local else 'slurm'}): stage {p['stage']}, "
          f"{p['params']['nodes']} node(s) x {p['params']['tasks_per_node']} task(s)")
    print(f"job folder: {job.paths.folder}")
    for task in range(n_tasks):
        paths = submitit.core.utils.JobPaths(job.paths.folder.parent / "%j", job_id=job.job_id, task_id=task)
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
