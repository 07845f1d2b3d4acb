"""The training loop: one optimizer step = grad_accum micro-steps of (teacher embeddings, student
forward, loss, backward) through a DeepSpeed engine; then log, checkpoint, evaluate. One loop for
DIME-FM distillation (unpaired images + sentences) and the CLIP loss (paired shards: the demo
teacher and the from-scratch baseline)."""
from __future__ import annotations

import logging
import resource
import signal
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from dime_ds.data.loaders import image_batches, paired_batches, text_batches
from dime_ds.data.pipelines import image_transform, preprocess_size
from dime_ds.data.shards import list_shards
from dime_ds.distributed import collectives as C
from dime_ds.distributed.env import WorldInfo
from dime_ds.engine import checkpoint
from dime_ds.engine.ds_config import build_ds_config, student_precision
from dime_ds.engine.param_groups import param_groups
from dime_ds.engine.schedule import lr_at
from dime_ds.engine.teacher_source import TeacherSource
from dime_ds.eval.features import Encoder
from dime_ds.eval.suite import evaluate_suite, headline
from dime_ds.log.tensorboard import TBWriter
from dime_ds.losses.dime import clip_loss, dime_loss, reduce_for_logging
from dime_ds.models import build_run_student, student_preprocess_cfg, student_tokenizer

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


class Trainer:
    def __init__(self, cfg: Any, world: WorldInfo, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        self.clip = cfg.loss.kind == "clip"
        self.micro = cfg.optim.global_batch_size // (world.world_size * cfg.optim.grad_accum)
        self.precision = student_precision(device)
        self.dtype = DTYPES.get(self.precision, torch.float32)
        self.teacher = None if self.clip else TeacherSource(cfg, device, self.micro)
        target_dim = None if self.clip else self.teacher.embed_dim
        torch.manual_seed(cfg.seed)  # identical initial student on every rank
        student = build_run_student(cfg, target_dim)  # with the teacher's activation when it borrows its text tower
        self.student_preprocess = student_preprocess_cfg(student.model_cfg)
        self.student_tokenize = student_tokenizer(student) if student.has_text else None
        self.has_text = student.has_text
        self.image_params = sum(p.numel() for m in (student.visual, student.image_proj) if m is not None
                                for p in m.parameters())
        optimizer = torch.optim.AdamW(param_groups(student, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                      betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        base_lr = cfg.optim.lr
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=student, optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: lr_at(step, cfg.optim) / base_lr),
            config=build_ds_config(cfg.dist.ds_config, cfg.optim, world.world_size, self.precision))
        self.tb = TBWriter(Path(cfg.run_dir) / "tensorboard", enabled=world.rank == 0 and cfg.log.tensorboard)
        self.stop = StopRequested()
        self._teacher_eval: dict | None = None

    # ------------------------------------------------------------------ data
    def _stream_preprocess(self) -> dict:
        """Images are transformed once, at the teacher's preprocessing when a live teacher runs."""
        if self.teacher is not None and self.teacher.preprocess_cfg is not None:
            return self.teacher.preprocess_cfg
        return self.student_preprocess

    def _build_streams(self, state: dict | None) -> None:
        cfg, w = self.cfg, self.world
        common = dict(seed=cfg.seed, rank=w.rank, world=w.world_size, workers=cfg.data.workers,
                      shuffle_buffer=cfg.data.shuffle_buffer)
        transform = image_transform(self._stream_preprocess(), train=cfg.data.augment,
                                    crop_scale_min=cfg.data.crop_scale_min)
        state = state or {}
        if self.clip:
            self.images = paired_batches(list_shards(cfg.data.paired), transform, self.student_tokenize,
                                         self.micro, start=state.get("images"), **common)
            self.texts = None
            return
        self.images = image_batches(list_shards(cfg.data.images), transform, self.micro,
                                    start=state.get("images"), **common)
        tokenize = self.teacher.tokenizer or self.student_tokenize  # None: keys are all the cache needs
        self.texts = text_batches(list_shards(cfg.data.texts), tokenize, self.micro,
                                  start=state.get("texts"), **common)

    def _stream_state(self) -> dict:
        return {"images": self.images.state_dict(), **({"texts": self.texts.state_dict()} if self.texts else {})}

    def _to_student(self, images: torch.Tensor) -> torch.Tensor:
        """Resize / renormalise stream images when the student's preprocessing differs."""
        src, dst = self._stream_preprocess(), self.student_preprocess
        if preprocess_size(src) != preprocess_size(dst):
            images = F.interpolate(images, size=preprocess_size(dst), mode="bicubic", antialias=True, align_corners=False)
        if list(src["mean"]) != list(dst["mean"]) or list(src["std"]) != list(dst["std"]):
            def vec(v):
                return torch.tensor(v, dtype=images.dtype).view(1, -1, 1, 1)
            images = (images * vec(src["std"]) + vec(src["mean"]) - vec(dst["mean"])) / vec(dst["std"])
        return images.to(self.device, self.dtype)

    # ------------------------------------------------------------------ steps
    def _micro_step(self) -> tuple[dict, float, float]:
        img_batch = next(self.images)
        t0 = time.perf_counter()
        if self.clip:
            s_img, s_txt = self.engine(self._to_student(img_batch["images"]), img_batch["tokens"].to(self.device))
            losses = {"clip": clip_loss(s_img.float(), s_txt.float(), self.engine.module.logit_scale.float())}
            losses["total"] = losses["clip"]
            teacher_s = 0.0
        else:
            txt_batch = next(self.texts)
            t_img, t_txt = self.teacher.embed(img_batch["images"], txt_batch.get("tokens"),
                                              img_batch["keys"], txt_batch["keys"])
            teacher_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            tokens = None
            if self.has_text:  # the stream already tokenized for the student when no live teacher needs tokens
                tokens = txt_batch["tokens"] if self.teacher.tokenizer is None else \
                    self.student_tokenize(txt_batch["texts"])
                tokens = tokens.to(self.device)
            s_img, s_txt = self.engine(self._to_student(img_batch["images"]), tokens)
            s_txt = t_txt if s_txt is None else s_txt.float()
            losses = dime_loss(t_img, t_txt, s_img.float(), s_txt, self.cfg.loss)
            self._last = (t_img.detach(), t_txt.detach(), s_img.detach().float(), s_txt.detach())
        self.engine.backward(losses["total"])
        self.engine.step()
        return losses, teacher_s, time.perf_counter() - t0

    def train(self) -> dict:
        cfg = self.cfg
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        start, state = checkpoint.load(self.engine, cfg.ckpt.dir, cfg.ckpt.resume, self.world.rank)
        self._build_streams(state)
        if start == 0:
            self.tb.text("config", config_yaml)
        steps = cfg.optim.steps
        bar = tqdm(total=steps, initial=start, desc=cfg.name, dynamic_ncols=True,
                   disable=self.world.rank != 0 or not cfg.log.progress)
        window = {"samples": 0, "time": 0.0, "teacher_s": 0.0, "student_s": 0.0}
        step, status = start, "completed"
        summary: dict = {"start_step": start, "image_params": self.image_params}
        if self.teacher is not None and self.teacher.teacher is not None:
            summary["teacher_image_params"] = sum(p.numel() for p in self.teacher.teacher.model.visual.parameters())
        train_time = 0.0
        while step < steps:
            t_step = time.perf_counter()
            for _ in range(cfg.optim.grad_accum):
                losses, teacher_s, student_s = self._micro_step()
                window["teacher_s"] += teacher_s
                window["student_s"] += student_s
            step += 1
            window["samples"] += cfg.optim.global_batch_size
            window["time"] += time.perf_counter() - t_step
            train_time += time.perf_counter() - t_step
            bar.update(1)
            if step % cfg.log.every_n_steps == 0 or step == steps:
                summary["loss"] = self._log(step, losses, window, bar)
                window = {k: 0 for k in window}
            if cfg.eval.every_n_steps and (step % cfg.eval.every_n_steps == 0 or step == steps):
                summary["eval"] = self.evaluate(step)
            stop = self.stop.any_rank()
            if stop or step == steps or (cfg.ckpt.every_n_steps and step % cfg.ckpt.every_n_steps == 0):
                checkpoint.save(self.engine, cfg.ckpt.dir, step, self._stream_state(), config_yaml, cfg.ckpt.keep_last)
            if stop:
                status = "stopped"
                break
        bar.close()
        self.tb.close()
        if step > start:
            summary["samples_per_s"] = (step - start) * cfg.optim.global_batch_size / train_time
        return {**summary, "status": status, "step": step, "skipped": self._skipped()}

    def _skipped(self) -> dict:
        out = {"images": self.images.state_dict().get("skipped", 0)}
        if self.texts:
            out["texts"] = self.texts.state_dict().get("skipped", 0)
        return out

    def _log(self, step: int, losses: dict, window: dict, bar) -> dict:
        values = {f"loss/{k}": v for k, v in reduce_for_logging(losses).items()}
        values["optim/lr"] = self.scheduler.get_last_lr()[0] if self.scheduler else self.cfg.optim.lr
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            values["optim/grad_norm"] = float(norm)
        if window["time"] > 0:
            values["perf/samples_per_s"] = window["samples"] / window["time"]
        n = max(1, self.cfg.log.every_n_steps)
        values["perf/teacher_s_per_step"] = window["teacher_s"] / n
        values["perf/student_s_per_step"] = window["student_s"] / n
        for name, count in self._skipped().items():
            values[f"data/skipped_{name}"] = C.reduce_scalar(count)
        values["memory/host_max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if self.device.type == "cuda":
            values["memory/gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.tb.scalars(values, step)
        bar.set_postfix(loss=f"{values.get('loss/total', float('nan')):.4f}",
                        sps=f"{values.get('perf/samples_per_s', 0):.0f}")
        if bar.disable and self.world.rank == 0:
            log.info("step %d/%d %s", step, self.cfg.optim.steps,
                     " ".join(f"{k}={v:.4g}" for k, v in values.items()))
        return {k: v for k, v in values.items() if k.startswith("loss/")}

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """The eval datasets of `eval.periodic_tasks`, student (and once, the teacher); every rank takes
        a share of the features; rank 0 logs to TensorBoard."""
        if not self.cfg.eval.datasets:
            return {}
        if not self.has_text and (self.teacher is None or self.teacher.teacher is None):
            log.warning("no text tower to build zero-shot classifiers with (cached teacher); eval skipped")
            return {}
        self.engine.eval()
        if self.has_text:
            encode_text, tokenize = (lambda t: self.engine(None, t)[1]), self.student_tokenize
        else:
            encode_text, tokenize = (lambda t: self.teacher.embed(None, t)[1]), self.teacher.tokenizer
        student = Encoder("student", lambda x: self.engine(x, None)[0], encode_text, tokenize,
                          self.student_preprocess, self.device, self.dtype)
        # Every rank forwards the same number of batches: a ZeRO-3 forward is collective.
        opts = dict(tasks=self.cfg.eval.periodic_tasks, lockstep=C.is_distributed(), progress=self.cfg.log.progress)
        results = {"student": evaluate_suite(student, self.cfg.eval, **opts)}
        if self.teacher is not None and self.teacher.teacher is not None:
            if self._teacher_eval is None:  # a frozen teacher scores the same every time
                teacher = Encoder("teacher", lambda x: self.teacher.embed(x, None)[0],
                                  lambda t: self.teacher.embed(None, t)[1], self.teacher.tokenizer,
                                  self.teacher.preprocess_cfg, self.device, torch.float32)
                self._teacher_eval = evaluate_suite(teacher, self.cfg.eval, **opts)
            results["teacher"] = self._teacher_eval
        self.engine.train()
        if self.world.rank == 0:
            log.info("step %d eval: %s", step, "  ".join(
                f"{model}/{name} {label}={100 * value:.1f}%" for model, per_set in results.items()
                for name, m in per_set.items() for _, label, value in headline(m) if isinstance(value, float)))
        for model, per_set in results.items():
            self.tb.scalars({f"{m['task']}_{model}/{name}" + ("" if key == "top1" else f"_{key}"): value
                             for name, m in per_set.items() for key, _, value in headline(m)
                             if isinstance(value, float)}, step)
        if getattr(self, "_last", None) is not None:
            t_img, t_txt, s_img, s_txt = (F.normalize(x[:16], dim=-1) for x in self._last)
            self.tb.similarity_image("similarity/teacher_vs_student", t_img @ t_txt.t(), s_img @ s_txt.t(), step)
        return results
