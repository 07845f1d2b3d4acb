"""Where the teacher's embeddings come from, per `teacher.shard` and `teacher.source`:
- replicate: a frozen half-precision copy on every rank;
- zero3: the same teacher wrapped by a ZeRO-3 engine with no optimizer, parameters partitioned
  across ranks and gathered per module forward (teachers too big to replicate); the engine package
  builds that wrapper (it alone imports deepspeed) and hands it in;
- cache: embeddings the embed stage wrote, looked up by sample key (and, in a K-view cache, by the
  view the image stream showed); no teacher forward at all."""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dime_ds.config.schema import TeacherConfig
from dime_ds.data.embeddings import EmbeddingCache, EmbeddingCacheError
from dime_ds.data.views import ViewRecipe, check_cache_views
from dime_ds.models import PRECISIONS, Teacher, load_teacher, precision_for
from dime_ds.models.teacher import teacher_name
from dime_ds.models.precision import Precision, lift_scalar_parameters

log = logging.getLogger(__name__)


class TeacherForward(nn.Module):
    """forward(images, tokens) -> raw embeddings: the shape a DeepSpeed engine wants to wrap."""

    def __init__(self, teacher: Teacher):
        super().__init__()
        self.model = teacher.model

    def forward(self, images: torch.Tensor | None, tokens: torch.Tensor | None):
        return (self.model.encode_image(images) if images is not None else None,
                self.model.encode_text(tokens) if tokens is not None else None)


Zero3Wrap = Callable[[nn.Module, Precision, int], Any]


class TeacherSource:
    def __init__(self, teacher_cfg: TeacherConfig, device: torch.device, micro_batch: int, *,
                 augmented: bool = False, zero3_wrap: Zero3Wrap | None = None, views: ViewRecipe | None = None,
                 cache_dir: str | None = None, key: str = "teacher"):
        """`cache_dir`: where a cached teacher reads (default its own cache_dir); `key`: its config key,
        for messages (an ensemble's further teachers are ensemble.teachers[i])."""
        self.mode = "cache" if teacher_cfg.source == "cache" else teacher_cfg.shard
        self.device = device
        self.name = teacher_name(teacher_cfg)
        self.teacher: Teacher | None = None  # the live model (replicate, zero3); None for a cache
        self._engine = None
        if self.mode == "cache":
            cache_dir = cache_dir or teacher_cfg.cache_dir
            self.images = EmbeddingCache(f"{cache_dir}/images")
            self.texts = EmbeddingCache(f"{cache_dir}/texts")
            if self.images.dim != self.texts.dim:
                raise ValueError(f"teacher cache {cache_dir}: image dim {self.images.dim} "
                                 f"!= text dim {self.texts.dim}")
            for cache in (self.images, self.texts):
                if cache.model != self.name:
                    raise EmbeddingCacheError(
                        f"{key}.source=cache: {cache.directory} holds embeddings of {cache.model!r}, not of this "
                        f"teacher {self.name!r}: embed with it (stage=embed) or point {key}.cache_dir at its cache")
            self.embed_dim = self.images.dim
            check_cache_views(self.images, views)
            if augmented and self.images.views == 1:
                log.warning("teacher.source=cache with data.augment=true: cached teacher embeddings are of "
                            "unaugmented images while the student sees augmented ones (embed.views=K caches "
                            "augmented views)")
            return
        if self.mode == "zero3":
            if zero3_wrap is None:
                raise ValueError("teacher.shard=zero3 needs the engine's ZeRO-3 inference wrapper")
            self._build_zero3(teacher_cfg, device, micro_batch, zero3_wrap)
        else:
            self.teacher = load_teacher(teacher_cfg, device)
        self.embed_dim = self.teacher.embed_dim

    def _build_zero3(self, teacher_cfg: TeacherConfig, device: torch.device, micro_batch: int,
                     wrap: Zero3Wrap) -> None:
        """Loaded in fp32, then cast whole by the engine: DeepSpeed's half precision covers every
        parameter, which open_clip's fp32-LayerNorm mixed precision would contradict."""
        self.precision = precision_for("teacher", device, teacher_cfg.precision)
        self.teacher = load_teacher(teacher_cfg, device, PRECISIONS["fp32"])
        lift_scalar_parameters(self.teacher.model)
        self._engine = wrap(TeacherForward(self.teacher), self.precision, micro_batch)

    @property
    def live(self) -> bool:
        return self.teacher is not None

    @property
    def tokenizer(self):
        return self.teacher.tokenizer if self.teacher is not None else None

    @property
    def preprocess_cfg(self) -> dict | None:
        return self.teacher.preprocess_cfg if self.teacher is not None else None

    @torch.no_grad()
    def embed(self, images: torch.Tensor | None, tokens: torch.Tensor | None,
              image_keys: Sequence[str] = (), text_keys: Sequence[str] = (), image_views=None):
        """(teacher image embeddings, teacher text embeddings), fp32 raw, on the compute device.
        A cached teacher looks samples up by key (tokens are not needed then), images of a K-view
        cache by (key, the view the stream showed: `image_views`)."""
        if self.mode == "cache":
            views = None if image_views is None else torch.as_tensor(image_views).cpu().numpy()
            return (self.images.lookup(list(image_keys), views).to(self.device) if len(image_keys) else None,
                    self.texts.lookup(list(text_keys)).to(self.device) if len(text_keys) else None)
        if self.mode == "zero3":
            img, txt = self._engine(images.to(self.device, self.precision.dtype) if images is not None else None,
                                    tokens.to(self.device) if tokens is not None else None)
            return (img.float() if img is not None else None, txt.float() if txt is not None else None)
        return (self.teacher.encode_image(images) if images is not None else None,
                self.teacher.encode_text(tokens) if tokens is not None else None)
