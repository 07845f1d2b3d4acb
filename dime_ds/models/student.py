"""The student: any image tower OpenCLIP builds without a download (its ViTs and ResNets, and timm
towers: MobileCLIP's FastViT MCi, ConvNeXt, MobileNet, ... with timm_model_pretrained false), named,
inline or from a model-config JSON file, randomly initialised or started from local weights
(student.init_image); plus either its own text tower or none (the teacher's frozen text tower then
speaks for it). When its embedding width differs from the teacher's, a learned linear projection
maps it into the teacher's space; export folds that projection into the tower's last linear map."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence

import open_clip
import torch
from omegaconf import OmegaConf
from torch import nn

from dime_ds.errors import UserError

if TYPE_CHECKING:
    from dime_ds.config.schema import StudentConfig, TeacherConfig

log = logging.getLogger(__name__)
OPEN_CLIP_KEYS = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale")
# Stands in for a text tower the student never uses (student.text=teacher) when building the real one
# would need a download (an HF text tower); discarded after construction.
UNUSED_TEXT_CFG = {"context_length": 2, "vocab_size": 8, "width": 8, "heads": 1, "layers": 1}


class StudentConfigError(UserError, ValueError):
    """A student section that cannot be built as asked."""


def student_model_cfg(student_cfg: StudentConfig) -> dict:
    """The OpenCLIP model config of the student section: inline `model_cfg`, else `arch`: a path to an
    OpenCLIP model-config JSON file, or an architecture name open_clip knows."""
    if student_cfg.model_cfg is not None:
        cfg = OmegaConf.to_container(student_cfg.model_cfg, resolve=True) \
            if OmegaConf.is_config(student_cfg.model_cfg) else copy.deepcopy(dict(student_cfg.model_cfg))
        where = "student.model_cfg"
    elif str(student_cfg.arch).endswith(".json") or "/" in str(student_cfg.arch):
        cfg, where = _config_file(Path(student_cfg.arch).expanduser()), f"student.arch={student_cfg.arch}"
    else:
        cfg = open_clip.get_model_config(student_cfg.arch)
        if cfg is None:
            raise StudentConfigError(f"student.arch={student_cfg.arch!r} is not an OpenCLIP architecture "
                                     f"(open_clip.list_models() lists them), a model-config .json file, nor "
                                     "given inline as student.model_cfg")
        where = f"student.arch={student_cfg.arch}"
    missing = [k for k in ("embed_dim", "vision_cfg") if k not in cfg]
    if missing:
        raise StudentConfigError(f"{where}: an OpenCLIP model config needs {', '.join(missing)}")
    _check_towers(cfg, where, student_cfg.text)
    return cfg


def _config_file(path: Path) -> dict:
    if not path.is_file():
        raise StudentConfigError(f"student.arch={path}: no such model-config file")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StudentConfigError(f"student.arch={path}: not an OpenCLIP model-config JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise StudentConfigError(f"student.arch={path}: not an OpenCLIP model-config JSON (a {type(cfg).__name__})")
    return cfg


def _check_towers(cfg: dict, where: str, text: str) -> None:
    """Towers built from timm's own code, never downloaded; an HF text tower only from a local directory."""
    vision = cfg["vision_cfg"]
    name = vision.get("timm_model_name")
    if name:
        import timm

        if not timm.is_model(name):
            stem = name.split("_")[0]
            near = ", ".join(timm.list_models(f"{stem}*")[:12]) or "none"
            raise StudentConfigError(f"{where}: timm knows no model {name!r} (timm models named {stem}*: {near})")
        vision["timm_model_pretrained"] = False  # a student starts from scratch, or from student.init_image
    hf = cfg.get("text_cfg", {}).get("hf_model_name")
    if hf and text == "own" and not Path(hf).expanduser().is_dir():
        raise StudentConfigError(f"{where}: its text tower is the Hugging Face model {hf!r}, which would be "
                                 "downloaded: point text_cfg.hf_model_name at a local copy of it (a directory), "
                                 "or distil the image tower alone with student.text=teacher")


class StudentOutput(NamedTuple):
    """What a student forward returns; each field None when it was not asked for or does not exist."""

    image: torch.Tensor | None
    text: torch.Tensor | None
    # The learned CLIP logit scale (student.text=own), computed inside the forward so that a ZeRO-3
    # engine has it gathered; DIME-FM fixes its scale and ignores it.
    logit_scale: torch.Tensor | None = None
    # The images in each further teacher's space of an ensemble (its own projection head), in order.
    image_spaces: tuple[torch.Tensor, ...] = ()


class Student(nn.Module):
    """Trainable student. `encode_*` return raw embeddings in the teacher's space (target_dim).
    `ensemble_dims`: the widths of an ensemble's further teachers; the student learns one projection
    into each of their spaces (always, even where a width equals its own: the spaces differ), used by
    the distillation loss only and left out of the export."""

    def __init__(self, model_cfg: Mapping[str, Any], text: str, target_dim: int | None = None,
                 ensemble_dims: Sequence[int] = ()):
        super().__init__()
        self.model_cfg = copy.deepcopy(dict(model_cfg))
        own_dim = int(self.model_cfg["embed_dim"])
        self.target_dim = int(target_dim or own_dim)
        self.text_mode = text
        kwargs = {k: v for k, v in self.model_cfg.items() if k in OPEN_CLIP_KEYS}
        if text == "teacher" and "hf_model_name" in kwargs.get("text_cfg", {}):
            kwargs["text_cfg"] = UNUSED_TEXT_CFG
        # A [1]-shaped logit scale: DeepSpeed's broadcast cannot handle 0-dim parameters.
        clip = open_clip.CustomTextCLIP(**kwargs, nonscalar_logit_scale=True)
        self.visual = clip.visual
        self.image_proj = self._projection(own_dim)
        # None without an ensemble: a one-teacher student's state dict keeps its keys
        self.ensemble_proj = nn.ModuleList(nn.Linear(own_dim, int(d), bias=False) for d in ensemble_dims) \
            if ensemble_dims else None
        if text == "own":
            self.text = clip.text
            self.text_proj = self._projection(own_dim)
            self.logit_scale = clip.logit_scale  # learned only by the CLIP loss; DIME-FM fixes 100
        elif text == "teacher":
            self.text = self.text_proj = self.logit_scale = None
        else:
            raise ValueError(f"student.text={text!r} is not one of: teacher, own")

    def _projection(self, own_dim: int) -> nn.Module | None:
        return nn.Linear(own_dim, self.target_dim, bias=False) if own_dim != self.target_dim else None

    @property
    def has_text(self) -> bool:
        return self.text is not None

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> StudentOutput:
        """Raw embeddings of what was given. Engines call this: ZeRO-3 gathers partitioned parameters
        around module forwards."""
        image, spaces = self.encode_image_spaces(images) if images is not None else (None, ())
        return StudentOutput(image, self.encode_text(tokens) if tokens is not None else None,
                             self.logit_scale.clone() if self.logit_scale is not None and tokens is not None else None,
                             spaces)

    @property
    def ensemble_dims(self) -> tuple[int, ...]:
        return tuple(p.out_features for p in self.ensemble_proj) if self.ensemble_proj is not None else ()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = self.visual(images)
        return self.image_proj(x) if self.image_proj is not None else x

    def encode_image_spaces(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The images in the first teacher's space and in each further teacher's (one tower forward)."""
        x = self.visual(images)
        main = self.image_proj(x) if self.image_proj is not None else x
        return main, tuple(p(x) for p in self.ensemble_proj) if self.ensemble_proj is not None else ()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.text is None:
            raise RuntimeError("this student uses the teacher's text tower (student.text=teacher)")
        x = self.text(tokens)
        return self.text_proj(x) if self.text_proj is not None else x

    def openclip_state(self, text_state: Mapping[str, torch.Tensor] | None = None,
                       text_cfg: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
        """(state_dict, model_cfg) of a plain OpenCLIP CustomTextCLIP with projections folded in.
        A student without a text tower takes the teacher's (`text_state` keys without `text.`)."""
        state = {f"visual.{key}": value for key, value in self.visual.state_dict().items()}  # buffers too
        state.update({f"visual.{k}": v for k, v in fold_projection(self.visual, self.image_proj).items()})
        cfg = copy.deepcopy(self.model_cfg)
        cfg["embed_dim"] = self.target_dim
        cfg["custom_text"] = True
        if self.text is not None:
            for key, value in self.text.state_dict().items():
                state[f"text.{key}"] = value
            state["text.text_projection"] = _fold(self.text.text_projection, self.text_proj)
            state["logit_scale"] = self.logit_scale.detach().reshape([])
        else:
            if text_state is None or text_cfg is None:
                raise ValueError("a student with the teacher's text tower needs its text_state and text_cfg")
            state.update({f"text.{k}": v for k, v in text_state.items()})
            cfg["text_cfg"] = copy.deepcopy(dict(text_cfg))
            state["logit_scale"] = torch.tensor(float(torch.log(torch.tensor(100.0))))
        return {k: v.detach().float() for k, v in state.items()}, cfg


def _fold(tower_proj: torch.Tensor | None, head: nn.Linear | None) -> torch.Tensor:
    """x @ P @ Wᵀ == x @ (P @ Wᵀ): one projection matrix of shape (width, target_dim)."""
    if not isinstance(tower_proj, torch.Tensor):
        raise NotImplementedError("export needs a text tower with a matrix projection (OpenCLIP's default)")
    if head is None:
        return tower_proj.detach()
    return tower_proj.detach() @ head.weight.detach().t()


def fold_projection(visual: nn.Module, head: nn.Linear | None) -> dict[str, torch.Tensor]:
    """The tower's entries that change when the student's projection `head` (own -> target width) is
    folded into the tower's last linear map, so that the tower alone outputs target-width embeddings:
    a ViT's `proj` matrix (x @ P @ Wᵀ), else the last nn.Linear that outputs the embedding (a ResNet's
    attention-pool c_proj, a timm tower's head or classifier: W' = H W, b' = H b). {} without a head."""
    if head is None:
        return {}
    proj = getattr(visual, "proj", None)
    if isinstance(proj, torch.Tensor):
        return {"proj": _fold(proj, head)}
    own = head.in_features
    last = [(name, m) for name, m in visual.named_modules() if isinstance(m, nn.Linear) and m.out_features == own]
    if not last:
        raise StudentConfigError(f"this image tower ({type(visual).__name__}) ends in no linear map of width {own} "
                                 "to fold the projection into: give the student the teacher's embed_dim "
                                 f"({head.out_features}), so that it needs no projection")
    name, linear = last[-1]
    h = head.weight.detach()
    folded = {f"{name}.weight": h @ linear.weight.detach()}
    if linear.bias is not None:
        folded[f"{name}.bias"] = h @ linear.bias.detach()
    return folded


def build_student(student_cfg: StudentConfig, target_dim: int | None = None, quick_gelu: bool | None = None,
                  ensemble_dims: Sequence[int] = ()) -> Student:
    """A randomly initialised student from the `student` config section. `quick_gelu` (None: the
    student config's own) sets the activation of both towers, as OpenCLIP's flag does."""
    model_cfg = student_model_cfg(student_cfg)
    if quick_gelu is not None:
        own = model_cfg.get("quick_gelu")
        if own is not None and bool(own) != quick_gelu:
            raise StudentConfigError(
                f"student {student_cfg.arch!r} sets quick_gelu={own}, but the teacher's text tower it borrows "
                f"(student.text=teacher) uses quick_gelu={quick_gelu}; one OpenCLIP model has one activation: "
                "pick a student architecture without the flag (or with the teacher's)")
        model_cfg["quick_gelu"] = quick_gelu
    return Student(model_cfg, student_cfg.text, target_dim, ensemble_dims)


def build_run_student(student_cfg: StudentConfig, teacher_cfg: TeacherConfig, target_dim: int | None = None,
                      init: bool = True, ensemble_dims: Sequence[int] = ()) -> Student:
    """The student a run trains: one that borrows the teacher's text tower takes the teacher's
    activation, so that the exported model is one coherent OpenCLIP config. `init`: load
    student.init_image (False where the weights are about to be replaced, or on the meta device)."""
    from dime_ds.models.teacher import teacher_quick_gelu

    quick_gelu = teacher_quick_gelu(teacher_cfg) if student_cfg.text == "teacher" else None
    student = build_student(student_cfg, target_dim, quick_gelu, ensemble_dims)
    if init and getattr(student_cfg, "init_image", None):
        from dime_ds.models.init_weights import load_image_tower

        load_image_tower(student.visual, student_cfg.init_image)
    return student


def student_preprocess_cfg(model_cfg: Mapping[str, Any]) -> dict:
    """OpenCLIP's default preprocessing at the student's image size (OpenAI mean/std, bicubic)."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg

    return asdict(PreprocessCfg(size=model_cfg["vision_cfg"].get("image_size", 224)))


def student_tokenizer(student: Student):
    """OpenCLIP's BPE tokenizer at the student's text context length (ships with open_clip)."""
    return open_clip.SimpleTokenizer(context_length=student.context_length)
