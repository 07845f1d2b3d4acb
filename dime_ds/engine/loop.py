"""The training loop: one optimizer step = grad_accum micro-steps of the objective (batch, teacher
targets, student forward, named losses) through a DeepSpeed engine, with one loss over all of them
when grad_accum > 1 (engine/accumulate.py); then log, evaluate, checkpoint.
The loop knows no method: DIME-FM and CLIP are objectives (dime_ds/objectives)."""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from dime_ds.config import ConfigError
from dime_ds.config.schema import RootConfig
from dime_ds.distributed import collectives as C
from dime_ds.distributed.env import WorldInfo
from dime_ds.engine import accumulate, build, checkpoint
from dime_ds.engine.checkpoint import OBJECTIVE_MODULE
from dime_ds.engine.ds_config import build_ds_config, engine_precision
from dime_ds.engine.param_groups import param_groups
from dime_ds.engine.schedule import lr_at
from dime_ds.engine.zero3_teacher import zero3_inference
from dime_ds.engine.metrics import StepMeter, StepMetrics
from dime_ds.models.flops import ModelFlops, student_flops, teacher_flops
from dime_ds.log.tensorboard import TBWriter
from dime_ds.models import PRECISIONS, build_run_student, precision_for
from dime_ds.models.precision import batchnorm_in_fp32
from dime_ds.objectives import RunContext, build_objective

log = logging.getLogger(__name__)
FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch has the fused AdamW kernel


class StopRequested:
    """SIGTERM, SIGUSR1 (sbatch --signal) or SIGUSR2 (submitit's warning before a time limit or
    preemption) set a flag; the loop checkpoints at the next step boundary, once every rank has seen
    it, and the run ends as "stopped" (exit 3) for its launcher to requeue."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        log.warning("received signal %d: checkpointing at the next step", signum)
        self.flag = True

    def any_rank(self) -> bool:
        return C.reduce_scalar(1.0 if self.flag else 0.0, op="max") > 0


def attach_objective_module(student: torch.nn.Module, module: torch.nn.Module | None, ds_config: dict) -> None:
    """The objective's own trainable parameters become a submodule of the student the engine wraps
    (optimizer, gradient averaging, checkpoint and resume as for the student's); consolidation strips
    them from the student's weights. The objective reads them outside the student's forward, where
    ZeRO-3 leaves a partitioned parameter empty: refused."""
    if module is None:
        return
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if stage == 3:
        raise ConfigError("loss.learn_centres=true with dist.ds_config (ZeRO stage 3): the learnable centres "
                          "are read outside the student's forward, where ZeRO-3 partitions them away; use "
                          "ZeRO stage 0-2 (dist.ds_config=zero1|zero2) or loss.learn_centres=false")
    student.add_module(OBJECTIVE_MODULE, module)


# A periodic evaluation: called as evaluate(trainer, step) at every eval.every_n_steps on every rank;
# returns the results for the run summary. Built above the engine (eval/periodic.py), handed in.
Evaluate = Callable[["Trainer", int], dict]


class Trainer:
    def __init__(self, cfg: RootConfig, world: WorldInfo, device: torch.device, evaluate: Evaluate | None = None):
        self.cfg, self.world, self.device = cfg, world, device
        self.evaluate = evaluate
        ds_config = build_ds_config(cfg.dist.ds_config, cfg.optim, world.world_size,
                                    precision_for("student", device, cfg.student.precision).name)
        self.precision = PRECISIONS[engine_precision(ds_config)]  # a JSON's explicit bf16/fp16 wins
        micro = cfg.optim.global_batch_size // (world.world_size * cfg.optim.grad_accum)
        self.objective = build_objective(cfg, RunContext(world, device, micro, self.precision, cfg.seed,
                                                         zero3_wrap=zero3_inference))
        torch.manual_seed(cfg.seed)  # identical initial student on every rank
        student = build_run_student(cfg.student, cfg.teacher, self.objective.target_dim,
                                    ensemble_dims=self.objective.ensemble_dims)
        if self.precision.half:
            batchnorm_in_fp32(student)
        attach_objective_module(student, self.objective.trainable_module(), ds_config)
        self.image_params = sum(p.numel() for m in (student.visual, student.image_proj) if m is not None
                                for p in m.parameters())
        optimizer = torch.optim.AdamW(param_groups(student, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                      betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                      fused=cfg.optim.fused and device.type in FUSED_ADAMW_DEVICES)
        self.engine, self.scheduler = build.initialize(
            student, optimizer, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: lr_at(step, cfg.optim) / cfg.optim.lr))
        # DeepSpeed's plain fp32 path (no ZeRO, no bf16/fp16 wrapper: a CPU without native bf16) records
        # no gradient norm, and its step zeroes the gradients: the loop takes the norm itself there, at the
        # steps it logs.
        e = self.engine
        self._own_grad_norm = not (e.zero_optimization() or e.bfloat16_enabled() or e.fp16_enabled())
        self._grad_norm: torch.Tensor | None = None
        self._norm_due = False  # this step is logged and the norm is the loop's to take
        self.tb = TBWriter(Path(cfg.run_dir) / "tensorboard", enabled=world.rank == 0 and cfg.log.tensorboard)
        self.stop = StopRequested()
        self.meter = StepMeter()
        self.metrics = StepMetrics(world.world_size, device, self._count_flops(cfg), cfg.log.peak_tflops)

    @property
    def student(self):
        return self.engine.module

    def _count_flops(self, cfg: RootConfig) -> ModelFlops | None:
        """FLOPs per sample of this run's models, on meta-device copies; a model the counter cannot
        build costs the readout, never the run."""
        try:
            teachers = self.objective.live_teacher_cfgs()
            # the counted copies' initialisers draw nothing from the run's CPU RNG (meta tensors use no
            # CUDA generator: devices=[] also spares fork_rng's warning on multi-GPU nodes)
            with torch.random.fork_rng(devices=[]):
                student = student_flops(lambda: build_run_student(cfg.student, cfg.teacher, self.objective.target_dim,
                                                                  init=False,
                                                                  ensemble_dims=self.objective.ensemble_dims),
                                        with_text=self.student.has_text)
                return ModelFlops(student=student, teacher=sum(teacher_flops(t) for t in teachers))
        except Exception as err:  # noqa: BLE001 - a readout
            log.warning("model FLOPs not counted (%s: %s): no perf/model_tflops_per_device", type(err).__name__, err)
            return None

    def forward(self, images=None, tokens=None):
        """The student through the engine (ZeRO-3 gathers its parameters); evaluation uses it too."""
        return self.engine(images=images, tokens=tokens)

    def train(self) -> dict:
        cfg, steps = self.cfg, self.cfg.optim.steps
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        start, state = checkpoint.load(self.engine, cfg.ckpt.dir, cfg.ckpt.resume, self.world.rank)
        self.objective.start(self.student, state)
        if start == 0:
            self.tb.text("config", config_yaml)
        bar = tqdm(total=steps, initial=start, desc=cfg.name, dynamic_ncols=True,
                   disable=self.world.rank != 0 or not cfg.log.progress)
        summary = {"start_step": start, "image_params": self.image_params, **self.objective.info()}
        step, status = start, "completed"
        while step < steps:
            self._norm_due = self._own_grad_norm and self._due(step + 1, cfg.log.every_n_steps)
            losses = self._optimizer_step()
            step += 1
            bar.update(1)
            if self._due(step, cfg.log.every_n_steps):
                summary["loss"] = self._log(step, losses, bar)
            evaluating = (self.evaluate is not None and cfg.eval.every_n_steps
                          and self._due(step, cfg.eval.every_n_steps))
            if evaluating:
                C.broadcast_buffers(self.student)  # one set of running statistics, rank 0's: eval leaves them
                summary["eval"] = self.evaluate(self, step)
            stop = self.stop.any_rank()
            if stop or self._due(step, cfg.ckpt.every_n_steps):
                if not evaluating:  # every rank checkpoints rank 0's statistics: resume is exact
                    C.broadcast_buffers(self.student)
                checkpoint.save(self.engine, cfg.ckpt.dir, step, self.objective.state_dict(), config_yaml,
                                cfg.ckpt.keep_last)
            if stop:
                status = "stopped"
                break
        bar.close()
        self.tb.close()
        summary.update(self.metrics.run_summary(self.meter))
        return {**summary, "status": status, "step": step, "skipped": self.objective.skipped(),
                "data_faults": self.metrics.data_faults(self.objective)}  # collective: over all ranks

    def _due(self, step: int, every: int) -> bool:
        """At every `every`-th step, and always at the last."""
        return step == self.cfg.optim.steps or (every > 0 and step % every == 0)

    def _optimizer_step(self) -> dict:
        t0 = time.perf_counter()
        losses = self._accumulated_step() if self.cfg.optim.grad_accum > 1 else self._single_step()
        self.meter.step_done(self.cfg.optim.global_batch_size, time.perf_counter() - t0)
        return losses

    def _single_step(self) -> dict:
        """grad_accum=1: one micro-batch per rank, one forward with gradient."""
        objective = self.objective
        with self.meter.timed("data_s"):
            batch = objective.next_batch()
        with self.meter.timed("teacher_s"):
            targets = objective.targets(batch)
        with self.meter.timed("student_s"):
            losses = objective.losses(objective.student_features(self.forward, batch), targets)
            self.engine.backward(losses["total"])
            self._step()
        return losses

    def _accumulated_step(self) -> dict:
        """grad_accum=A: the softmaxes span all A micro-batches of every rank (engine/accumulate.py);
        the extra forward without gradient is timed as embed_s. DeepSpeed steps the optimizer at the
        A-th engine.step()."""
        objective, batches, targets = self.objective, [], []
        for _ in range(self.cfg.optim.grad_accum):
            with self.meter.timed("data_s"):
                batches.append(objective.next_batch())
            with self.meter.timed("teacher_s"):
                targets.append(objective.targets(batches[-1]))
        with self.meter.timed("embed_s"):
            embedded = accumulate.embed(objective, self.forward, batches, self.device, self.student)
        with self.meter.timed("student_s"):
            return accumulate.backward_each(objective, self.forward, self._backward_and_step, batches, targets,
                                            embedded)

    def _backward_and_step(self, surrogate: torch.Tensor) -> None:
        # Not divided by grad_accum: the surrogate's gradients already sum to the whole batch's.
        self.engine.backward(surrogate, scale_wrt_gas=False)
        self._step()

    def _step(self) -> None:
        if self._norm_due and self.engine.is_gradient_accumulation_boundary():
            # the gradients are all-reduced by now (backward at the boundary); the norm before clipping,
            # as DeepSpeed's optimizers report it
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            self._grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        self.engine.step()

    def _global_grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        if norm is None and self._grad_norm is not None:
            norm = float(self._grad_norm)
        return norm

    def _log(self, step: int, losses: dict, bar) -> dict:
        lr = self.scheduler.get_last_lr()[0] if self.scheduler else self.cfg.optim.lr
        values = self.metrics.collect(losses, self.meter.take(), lr, self._global_grad_norm(), self.objective)
        self.tb.scalars(values, step)
        bar.set_postfix(loss=f"{values.get('loss/total', float('nan')):.4f}",
                        sps=f"{values.get('perf/samples_per_s', 0):.0f}")
        if bar.disable and self.world.rank == 0:
            log.info("step %d/%d %s", step, self.cfg.optim.steps,
                     " ".join(f"{k}={v:.4g}" for k, v in values.items()))
        return {k: v for k, v in values.items() if k.startswith("loss/")}
