"""One training job on this process's rank: world view, process group, trainer, final weights.
Run by dime_ds.training, which adds periodic evaluation."""
from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import save_file

from dime_ds import atomic
from dime_ds.config import save_config
from dime_ds.config.schema import RootConfig
from dime_ds.distributed.stage import count_requeue, process_group, requeue_stopped
from dime_ds.distributed.watchdog import watch_ranks
from dime_ds.engine.checkpoint import tag_for
from dime_ds.engine.consolidate import fp32_state_dict
from dime_ds.engine.loop import Evaluate, Trainer
from dime_ds.jobs import RequeueBudget

log = logging.getLogger(__name__)
FINAL_WEIGHTS = "student.safetensors"


def train_job(cfg: RootConfig, evaluate: Evaluate | None = None) -> dict:
    """`evaluate`: the periodic evaluation the Trainer calls (dime_ds.training builds it from eval/)."""
    world, device, _ = process_group(cfg.dist, cfg.device, always=True)  # DeepSpeed wants one even alone
    budget = RequeueBudget.of(cfg)  # its count beside the checkpoints, reset by a newer one
    count_requeue(budget)
    if world.rank == 0:
        save_config(cfg, cfg.run_dir)
    with watch_ranks(world, cfg.dist.dead_rank_s, budget):  # a dead rank ends the others in seconds, naming it
        summary = Trainer(cfg, world, device, evaluate).train()
    if world.rank == 0 and summary["status"] == "completed":
        # The fp32 masters, read back from the last checkpoint by the one reader of DeepSpeed's
        # layouts (every ZeRO stage; the bf16 module copies would lose precision).
        out = Path(cfg.run_dir) / "final"
        out.mkdir(parents=True, exist_ok=True)
        state = fp32_state_dict(cfg.ckpt.dir, tag_for(summary["step"]))
        with atomic.replacing(out / FINAL_WEIGHTS) as tmp:
            save_file(state, str(tmp))
        summary["final_weights"] = str(out / FINAL_WEIGHTS)
    log.info("run %s %s at step %d", cfg.name, summary["status"], summary["step"])
    if summary["status"] == "stopped":
        requeue_stopped(world, budget)
    return summary
