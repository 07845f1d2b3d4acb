"""Where the teacher's embeddings come from, per `teacher.shard` and `teacher.source`:
- replicate: a frozen half-precision copy on every rank;
- zero3: the same teacher wrapped by a ZeRO-3 engine with no optimizer, parameters partitioned
  across ranks and gathered per module forward (teachers too big to replicate);
- cache: embeddings the embed stage wrote, looked up by sample key; no teacher forward at all."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from dime_ds.data.embeddings import EmbeddingCache
from dime_ds.models import Teacher, load_teacher
from dime_ds.models.precision import compute_dtype, lift_scalar_parameters

log = logging.getLogger(__name__)


class _TeacherForward(nn.Module):
    """forward(images, tokens) -> raw embeddings: the shape a DeepSpeed engine wants to wrap."""

    def __init__(self, teacher: Teacher):
        super().__init__()
        self.model = teacher.model

    def forward(self, images: torch.Tensor | None, tokens: torch.Tensor | None):
        return (self.model.encode_image(images) if images is not None else None,
                self.model.encode_text(tokens) if tokens is not None else None)


class TeacherSource:
    def __init__(self, cfg: Any, device: torch.device, micro_batch: int):
        self.mode = "cache" if cfg.teacher.source == "cache" else cfg.teacher.shard
        self.device = device
        self.teacher: Teacher | None = None
        self._engine = None
        if self.mode == "cache":
            self.images = EmbeddingCache(f"{cfg.teacher.cache_dir}/images")
            self.texts = EmbeddingCache(f"{cfg.teacher.cache_dir}/texts")
            if self.images.dim != self.texts.dim:
                raise ValueError(f"teacher cache {cfg.teacher.cache_dir}: image dim {self.images.dim} "
                                 f"!= text dim {self.texts.dim}")
            self.embed_dim = self.images.dim
            if cfg.data.augment:
                log.warning("teacher.source=cache with data.augment=true: cached teacher embeddings are of "
                            "unaugmented images while the student sees augmented ones")
            return
        if self.mode == "zero3":
            self._build_zero3(cfg, device, micro_batch)
        else:
            self.teacher = load_teacher(cfg.teacher, device)
        self.embed_dim = self.teacher.embed_dim

    def _build_zero3(self, cfg: Any, device: torch.device, micro_batch: int) -> None:
        """Loaded in fp32, then cast whole by the engine: DeepSpeed's half precision covers every
        parameter, which open_clip's fp32-LayerNorm mixed precision would contradict."""
        import deepspeed

        from dime_ds.engine.ds_config import inference_ds_config

        self.dtype = compute_dtype(cfg.teacher.precision, device)
        fp32_cfg = OmegaConf.merge(cfg.teacher, {"precision": "fp32"})
        self.teacher = load_teacher(fp32_cfg, device)
        lift_scalar_parameters(self.teacher.model)
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")
        self._engine, *_ = deepspeed.initialize(model=_TeacherForward(self.teacher),
                                                config=inference_ds_config(precision, micro_batch))
        self._engine.eval()

    @property
    def tokenizer(self):
        return self.teacher.tokenizer if self.teacher is not None else None

    @property
    def preprocess_cfg(self) -> dict | None:
        return self.teacher.preprocess_cfg if self.teacher is not None else None

    @torch.no_grad()
    def embed(self, images: torch.Tensor | None, tokens: torch.Tensor | None,
              image_keys: Sequence[str] = (), text_keys: Sequence[str] = ()):
        """(teacher image embeddings, teacher text embeddings), fp32 raw, on the compute device.
        A cached teacher looks samples up by key (tokens are not needed then)."""
        if self.mode == "cache":
            return (self.images.lookup(list(image_keys)).to(self.device) if len(image_keys) else None,
                    self.texts.lookup(list(text_keys)).to(self.device) if len(text_keys) else None)
        if self.mode == "zero3":
            dtype = self.dtype
            img, txt = self._engine(images.to(self.device, dtype) if images is not None else None,
                                    tokens.to(self.device) if tokens is not None else None)
            return (img.float() if img is not None else None, txt.float() if txt is not None else None)
        return (self.teacher.encode_image(images) if images is not None else None,
                self.teacher.encode_text(tokens) if tokens is not None else None)
