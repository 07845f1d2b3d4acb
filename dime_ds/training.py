"""One training run as the distill entry point, the demo and the benches start it: the engine's
training job with periodic evaluation (eval/) plugged in. Above both engine/ and eval/, so neither
imports the other's upper half (eval reads checkpoints through the engine)."""
from __future__ import annotations

from dime_ds.config.schema import RootConfig
from dime_ds.engine.run import train_job
from dime_ds.eval.periodic import PeriodicEval


def run_training(cfg: RootConfig) -> dict:
    """Train on this process's rank (torchrun, srun and submitit alike); returns the run summary."""
    return train_job(cfg, PeriodicEval() if cfg.eval.every_n_steps else None)
