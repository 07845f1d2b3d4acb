"""CLIP: symmetric InfoNCE on image-caption pairs with a learned logit scale, no teacher. It trains
the demo teacher and the from-scratch baseline that distillation is compared with."""
from __future__ import annotations


import torch

from dime_ds.config import ConfigError
from dime_ds.config.schema import DataConfig, RootConfig
from dime_ds.data.loaders import BatchStream, paired_batches
from dime_ds.data.pipelines import image_transform
from dime_ds.data.shards import list_shards
from dime_ds.data.workers import loader_workers
from dime_ds.losses.dime import clip_loss
from dime_ds.models import Student, student_preprocess_cfg, student_tokenizer
from dime_ds.objectives.base import Objective, RunContext, StudentForward


class ClipObjective(Objective):
    name = "clip"
    SHARED_FEATURES = ("logit_scale",)

    def __init__(self, data_cfg: DataConfig, ctx: RunContext):
        self.data_cfg, self.ctx = data_cfg, ctx
        self.pairs: BatchStream | None = None

    @classmethod
    def from_config(cls, cfg: RootConfig, ctx: RunContext) -> "ClipObjective":
        return cls(cfg.data, ctx)

    def start(self, student: Student, state: dict | None) -> None:
        if not student.has_text:
            raise ConfigError("loss.objective=clip trains both towers: it needs student.text=own")
        data, ctx = self.data_cfg, self.ctx
        transform = image_transform(student_preprocess_cfg(student.model_cfg), train=data.augment,
                                    crop_scale_min=data.crop_scale_min)
        self.pairs = paired_batches(list_shards(data.paired), transform, student_tokenizer(student), ctx.micro_batch,
                                    seed=ctx.seed, rank=ctx.world.rank, world=ctx.world.world_size,
                                    workers=loader_workers(data.workers, ctx.world.local_world_size),
                                    shuffle_buffer=data.shuffle_buffer,
                                    start=(state or {}).get("pairs"),
                                    memo_bytes=0 if data.augment else data.decoded_cache_mb * 2**20)

    def state_dict(self) -> dict:
        return {"pairs": self.pairs.state_dict()}

    def skipped(self) -> dict[str, int]:
        return {"pairs": self.pairs.skipped}

    def next_batch(self) -> dict:
        return next(self.pairs)

    def student_features(self, student: StudentForward, batch: dict) -> dict:
        device = self.ctx.device
        out = student(images=batch["images"].to(device, self.ctx.precision.dtype), tokens=batch["tokens"].to(device))
        return {"image": out.image.float(), "text": out.text.float(), "logit_scale": out.logit_scale.float()}

    def losses(self, features: dict, targets: dict) -> dict[str, torch.Tensor]:
        loss = clip_loss(features["image"], features["text"], features["logit_scale"])
        return {"clip": loss, "total": loss}
