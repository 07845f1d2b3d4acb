"""Evaluation during training (`eval.every_n_steps`): the eval datasets' `eval.periodic_tasks` for the
student the Trainer holds and, once, its frozen teacher; every rank takes a share of the features,
rank 0 logs them to TensorBoard. The Trainer calls it as evaluate(trainer, step)."""
from __future__ import annotations

import logging

import torch

from dime_ds.distributed import collectives as C
from dime_ds.eval.suite import evaluate_suite, headline
from dime_ds.models import student_preprocess_cfg, student_tokenizer
from dime_ds.models.encoder import Encoder

log = logging.getLogger(__name__)


class PeriodicEval:
    def __init__(self):
        self._teacher: dict | None = None  # a frozen teacher scores the same every time

    @torch.no_grad()
    def __call__(self, trainer, step: int) -> dict:
        cfg = trainer.cfg.eval
        if not cfg.datasets:
            return {}
        student = student_encoder(trainer)
        if student is None:
            log.warning("no text tower to build zero-shot classifiers with (cached teacher); eval skipped")
            return {}
        trainer.engine.eval()
        # Every rank forwards the same number of batches: a ZeRO-3 forward is collective.
        opts = dict(tasks=cfg.periodic_tasks, lockstep=C.is_distributed(), progress=trainer.cfg.log.progress)
        results = {"student": evaluate_suite(student, cfg, **opts)}
        teacher = trainer.objective.teacher_encoder()
        if teacher is not None:
            if self._teacher is None:
                self._teacher = evaluate_suite(teacher, cfg, **opts)
            results["teacher"] = self._teacher
        trainer.engine.train()
        _log(trainer, step, results)
        return results


def student_encoder(trainer) -> Encoder | None:
    """The student for evaluation: its own text tower, else the one its objective lends."""
    student = trainer.student
    if student.has_text:
        encode_text, tokenize = (lambda t: trainer.forward(tokens=t).text), student_tokenizer(student)
    elif (borrowed := trainer.objective.borrowed_text()) is not None:
        encode_text, tokenize = borrowed
    else:
        return None
    return Encoder("student", lambda x: trainer.forward(images=x).image, encode_text, tokenize,
                   student_preprocess_cfg(student.model_cfg), trainer.device, trainer.precision.dtype)


def _log(trainer, step: int, results: dict) -> None:
    if trainer.world.rank == 0:
        log.info("step %d eval: %s", step, "  ".join(
            f"{model}/{name} {label}={100 * value:.1f}%" for model, per_set in results.items()
            for name, m in per_set.items() for _, label, value in headline(m) if isinstance(value, float)))
    for model, per_set in results.items():
        trainer.tb.scalars({f"{m['task']}_{model}/{name}" + ("" if key == "top1" else f"_{key}"): value
                            for name, m in per_set.items() for key, _, value in headline(m)
                            if isinstance(value, float)}, step)
    sample = trainer.objective.similarity_sample()
    if sample is not None:
        trainer.tb.similarity_image("similarity/teacher_vs_student", *sample, step)
