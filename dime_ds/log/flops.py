"""Model FLOPs per sample, counted (torch.utils.flop_counter), not guessed: the student's forward and
backward, and a live teacher's forward, each on copies of the architectures built on the meta
device (no memory, no arithmetic, nothing touched in the engine's model). The trainer turns them
into achieved FLOP/s per device and, with a peak in the config (`log.peak_tflops`), into MFU.

The counter counts matrix products and convolutions (what a ViT's FLOPs are) and attention where
torch has a formula for the kernel it dispatches; elementwise work is left out, as MFU conventions do."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

BATCH = 2  # counted at 2 samples and halved: no batch-of-one special case in any kernel


def count_flops(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _image_size(model_cfg: Mapping) -> tuple[int, int]:
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)


def _context(model_cfg: Mapping) -> int:
    return int(model_cfg.get("text_cfg", {}).get("context_length", 77))


def student_flops(build: Callable[[], torch.nn.Module], with_text: bool) -> int:
    """Forward + backward FLOPs per (image, sentence) sample of the student `build()` returns."""
    with torch.device("meta"):
        model = build()
        images = torch.zeros(BATCH, 3, *_image_size(model.model_cfg))
        tokens = torch.zeros(BATCH, _context(model.model_cfg), dtype=torch.long) if with_text else None

    def step():
        out = model(images=images, tokens=tokens)
        loss = out.image.sum() + (out.text.sum() if out.text is not None else 0)
        loss.backward()

    return count_flops(step) // BATCH


def teacher_flops(model_cfg: Mapping) -> int:
    """Forward FLOPs per (image, sentence) sample of an OpenCLIP model with this config."""
    import open_clip

    keys = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")
    with torch.device("meta"):
        model = open_clip.CLIP(**{k: v for k, v in model_cfg.items() if k in keys}).eval()
        images = torch.zeros(BATCH, 3, *_image_size(model_cfg))
        tokens = torch.zeros(BATCH, _context(model_cfg), dtype=torch.long)

    @torch.no_grad()
    def forward():
        model.encode_image(images)
        model.encode_text(tokens)

    return count_flops(forward) // BATCH


@dataclass(frozen=True)
class ModelFlops:
    """FLOPs per sample of one training step's model work, for the throughput readout."""

    student: int
    teacher: int  # 0: the teacher is read from a cache

    @property
    def per_sample(self) -> int:
        return self.student + self.teacher

    def readout(self, samples_per_s_per_device: float, peak_tflops: float | None) -> dict[str, float]:
        achieved = self.per_sample * samples_per_s_per_device / 1e12
        values = {"perf/model_tflops_per_device": achieved}
        if peak_tflops:
            values["perf/mfu"] = achieved / peak_tflops
        return values
