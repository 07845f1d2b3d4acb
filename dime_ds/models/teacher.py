"""The frozen teacher: any OpenCLIP architecture with a pretrained tag, a local weights file, or an
OpenCLIP model directory (local-dir:/hf-hub:). Eval mode, no gradients, half precision; it returns
raw fp32 embeddings so every loss sees the same dtype whatever the teacher ran in."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING

import open_clip
from open_clip.factory import parse_model_name
from open_clip.model import convert_to_custom_text_state_dict
from open_clip.transformer import QuickGELU
import torch
from torch import nn

from dime_ds.errors import UserError
from dime_ds.models.precision import Precision, precision_for

if TYPE_CHECKING:
    from dime_ds.config.schema import TeacherConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
OFFLINE_HINT = (
    "On a machine without network access, fetch the weights once elsewhere and point at them: "
    "teacher.pretrained=/path/to/open_clip_pytorch_model.bin (or .safetensors) with the architecture "
    "name in teacher.arch, or teacher.arch=local-dir:/path/to/model_dir (open_clip_config.json + "
    "open_clip_model.safetensors) with teacher.pretrained=null."
)


def teacher_name(teacher_cfg: TeacherConfig) -> str:
    """The model name a cache manifest records: the architecture, with its pretrained tag."""
    return str(teacher_cfg.arch) + (f"@{teacher_cfg.pretrained}" if teacher_cfg.pretrained else "")


class TeacherWeightsError(UserError, RuntimeError):
    """The teacher's weights cannot be had; the message names the local-file alternatives."""


class Teacher(nn.Module):
    """A frozen OpenCLIP model. `encode_*` return fp32 raw (unnormalised) embeddings."""

    def __init__(self, model: nn.Module, model_cfg: dict, preprocess_cfg: dict, tokenizer, dtype: torch.dtype):
        super().__init__()
        # Frozen by its forwards (no_grad), not by requires_grad_(False): torch's matmul decides by the
        # weights' flag how to multiply a transposed 3-D input, and without it expands and copies the
        # attention in-projection weight once per sequence position (nn.MultiheadAttention's
        # transposed batch), which makes the text tower several times slower on a bf16 CPU
        # (docs/performance.md).
        self.model = model.eval()
        self.model_cfg = model_cfg
        self.preprocess_cfg = preprocess_cfg
        self.tokenizer = tokenizer
        self.dtype = dtype

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> "Teacher":
        # A teacher never trains: dropout and friends stay off even inside a student's .train().
        return super().train(False)

    def text_tower_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The text tower as a CustomTextCLIP `text` submodule's state (keys without `text.`) and its
        text_cfg (context length, vocabulary, tokenizer): what a student without one exports with."""
        # A plain CLIP keeps its text tower at the top level; a CustomTextCLIP already under `text.`.
        state = convert_to_custom_text_state_dict(self.model.state_dict())
        text = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
        return text, copy.deepcopy(dict(self.model_cfg["text_cfg"]))

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images.to(self.device, self.dtype)).float()

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens.to(self.device)).float()


def _describe(arch: str, pretrained: str | None) -> str:
    return f"teacher.arch={arch}" + (f" teacher.pretrained={pretrained}" if pretrained else "")


def _check_source(arch: str, pretrained: str | None) -> None:
    """Fail before building anything when the weights obviously are not there."""
    schema, ident = parse_model_name(arch)
    if schema == "local-dir":
        path = Path(ident)
        if not (path / "open_clip_config.json").is_file():
            raise TeacherWeightsError(f"{_describe(arch, pretrained)}: {path} holds no open_clip_config.json. "
                                      + OFFLINE_HINT)
        if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
            raise TeacherWeightsError(f"{_describe(arch, pretrained)}: {path} holds no weights file "
                                      f"({', '.join(WEIGHT_SUFFIXES)}); a teacher must not be random.")
        if pretrained:
            raise TeacherWeightsError(f"{_describe(arch, pretrained)}: a local-dir: teacher carries its own "
                                      "weights; set teacher.pretrained=null.")
    elif schema is None:
        if not pretrained:
            raise TeacherWeightsError(f"{_describe(arch, pretrained)}: teacher.pretrained is null, so the "
                                      "teacher would be random. " + OFFLINE_HINT)
        looks_like_path = os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES)
        if looks_like_path and not os.path.isfile(pretrained):
            raise TeacherWeightsError(f"{_describe(arch, pretrained)}: no such weights file.")


def _tag_quick_gelu(arch: str, pretrained: str | None) -> bool:
    """Whether a pretrained tag's weights were trained with QuickGELU (OpenAI's were). open_clip only
    warns when `ViT-L-14` meets `openai`, and would run them with GELU."""
    if not pretrained or parse_model_name(arch)[0] is not None:
        return False
    return bool(open_clip.get_pretrained_cfg(arch, pretrained).get("quick_gelu", False))


def teacher_quick_gelu(teacher_cfg: TeacherConfig) -> bool:
    """Whether the teacher built by `load_teacher` uses QuickGELU, from its configs alone (no weights).
    A student that borrows the teacher's text tower must use the same activation: OpenCLIP builds
    both towers of one model from a single `quick_gelu` flag."""
    arch, pretrained = teacher_cfg.arch, teacher_cfg.pretrained
    try:
        model_cfg = open_clip.get_model_config(arch)
    except Exception as err:  # a missing local-dir, an unreachable hub
        raise TeacherWeightsError(f"{_describe(arch, pretrained)}: cannot read the teacher's model config: {err}. "
                                  + OFFLINE_HINT) from err
    if model_cfg is None:
        raise TeacherWeightsError(f"{_describe(arch, pretrained)}: not an OpenCLIP architecture")
    return bool(model_cfg.get("quick_gelu", False)) or _tag_quick_gelu(arch, pretrained)


def uses_quick_gelu(module: nn.Module) -> bool:
    """Whether a built model's transformer blocks use QuickGELU (what actually runs)."""
    return any(isinstance(m, QuickGELU) for m in module.modules())


def load_teacher(teacher_cfg: TeacherConfig, device: torch.device, precision: Precision | None = None) -> Teacher:
    """Build the frozen teacher from the `teacher` config section on `device`, in `precision`
    (default: the teacher's, from teacher.precision; evaluation and export pass their own)."""
    arch, pretrained = teacher_cfg.arch, teacher_cfg.pretrained
    _check_source(arch, pretrained)
    precision = precision or precision_for("teacher", device, teacher_cfg.precision)
    dtype = precision.dtype
    force_quick_gelu = _tag_quick_gelu(arch, pretrained)
    try:
        model = open_clip.create_model(
            arch,
            pretrained=pretrained,
            precision=precision.name,
            device=device,
            require_pretrained=True,
            weights_only=True,  # never unpickle a checkpoint
            force_quick_gelu=force_quick_gelu,
        )
        tokenizer = open_clip.get_tokenizer(arch)
    except TeacherWeightsError:
        raise
    except Exception as err:  # download failures, missing tags, corrupt files: say what to do instead
        raise TeacherWeightsError(f"could not load {_describe(arch, pretrained)}: {err}\n{OFFLINE_HINT}") from err
    model_cfg = open_clip.get_model_config(arch) or {}
    if force_quick_gelu:
        model_cfg["quick_gelu"] = True
    if "embed_dim" not in model_cfg:
        raise TeacherWeightsError(f"{_describe(arch, pretrained)}: no model config with embed_dim found")
    return Teacher(model, model_cfg, dict(model.visual.preprocess_cfg), tokenizer, dtype)
