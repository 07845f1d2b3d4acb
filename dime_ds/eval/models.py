"""The models `python -m dime_ds.eval` compares, as Encoders: a dime_ds run or checkpoint directory
(the student, consolidated from its ZeRO shards, with the teacher's text tower when it has none), an
OpenCLIP model directory (an exported student, the demo teacher), or any OpenCLIP name with a
pretrained tag, local-dir: or hf-hub:."""
from __future__ import annotations

from pathlib import Path

import torch

from dime_ds.config.schema import EvalConfig, TeacherConfig
from dime_ds.errors import UserError
from dime_ds.models.encoder import Encoder
from dime_ds.models import Teacher, TeacherWeightsError, load_teacher, student_preprocess_cfg, student_tokenizer
from dime_ds.models.openclip_dir import CONFIG_NAME
from dime_ds.models.precision import precision_for


class EvalModelError(UserError, ValueError):
    """A model spec that names nothing loadable."""


def _image_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def teacher_encoder(teacher: Teacher, name: str, source: str) -> Encoder:
    return Encoder(name, teacher.encode_image, teacher.encode_text, teacher.tokenizer, dict(teacher.preprocess_cfg),
                   teacher.device, teacher.dtype,
                   {"source": source, "image_params": _image_params(teacher.model.visual)})


def openclip_encoder(spec: str, pretrained: str | None, precision: str, device: torch.device, name: str,
                     key: str = "eval.model") -> Encoder:
    """An OpenCLIP model by name + tag, local-dir:/hf-hub:, or a plain path to a model directory."""
    is_model_dir = (Path(spec).expanduser() / CONFIG_NAME).is_file()
    arch = f"local-dir:{Path(spec).expanduser().resolve()}" if is_model_dir else spec
    try:
        teacher = load_teacher(TeacherConfig(arch=arch, pretrained=pretrained), device,
                               precision_for("eval", device, precision))
    except TeacherWeightsError as err:
        raise EvalModelError(f"{key}={spec}: {err}") from None
    return teacher_encoder(teacher, name, spec + (f" ({pretrained})" if pretrained else ""))


def checkpoint_encoders(path: str, precision: str, device: torch.device, with_teacher: bool
                        ) -> tuple[Encoder, Encoder | None]:
    """The student of a dime_ds run/checkpoint (and its teacher, loaded once for both roles)."""
    from dime_ds.engine.consolidate import load_student  # the engine owns the checkpoint layout

    student, run_cfg = load_student(path)
    policy = precision_for("eval", device, precision)
    dtype = policy.dtype
    student = student.to(device, dtype).eval()
    teacher = None
    if with_teacher or not student.has_text:
        teacher = load_teacher(run_cfg.teacher, device, policy)
    if student.has_text:
        encode_text, tokenize = student.encode_text, student_tokenizer(student)
    else:  # student.text=teacher: the teacher's frozen text tower speaks for the student
        encode_text, tokenize = teacher.encode_text, teacher.tokenizer
    params = _image_params(student.visual) + (_image_params(student.image_proj) if student.image_proj else 0)
    enc = Encoder("student", student.encode_image, encode_text, tokenize, student_preprocess_cfg(student.model_cfg),
                  device, dtype, {"source": str(path), "image_params": params, "run": run_cfg.name})
    return enc, (teacher_encoder(teacher, "teacher", run_cfg.teacher.arch) if with_teacher else None)


def is_checkpoint(spec: str) -> bool:
    """A directory without an OpenCLIP config is taken for a dime_ds run or checkpoint."""
    path = Path(spec).expanduser()
    return path.is_dir() and not (path / CONFIG_NAME).is_file()


def load_encoders(eval_cfg: EvalConfig, device: torch.device) -> list[Encoder]:
    """[model] or [teacher, model] for the eval section's model / teacher settings."""
    if not eval_cfg.model:
        raise EvalModelError("nothing to evaluate: set model=<run dir | checkpoint | OpenCLIP dir | OpenCLIP "
                             "name with pretrained=<tag>>")
    teacher_spec = (eval_cfg.teacher or "none").strip()
    if is_checkpoint(eval_cfg.model):
        model, teacher = checkpoint_encoders(eval_cfg.model, eval_cfg.precision, device,
                                             with_teacher=teacher_spec == "auto")
    else:
        if not Path(eval_cfg.model).expanduser().exists() \
                and ("/" in eval_cfg.model or eval_cfg.model.startswith(".")) and ":" not in eval_cfg.model:
            raise EvalModelError(f"eval.model={eval_cfg.model}: no such directory")
        model, teacher = openclip_encoder(eval_cfg.model, eval_cfg.pretrained, eval_cfg.precision, device,
                                          "model"), None
    if teacher_spec not in ("auto", "none"):
        teacher = openclip_encoder(teacher_spec, eval_cfg.teacher_pretrained, eval_cfg.precision, device,
                                   "teacher", key="eval.teacher")
        model.name = "student"
    return [teacher, model] if teacher is not None else [model]
