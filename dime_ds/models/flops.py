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


def _inputs(model: torch.nn.Module, with_text: bool = True):
    """A batch of zeros at the model's own input shapes (OpenCLIP's visual.image_size, already a
    pair, and context_length, which the Student shares), on the current default device."""
    images = torch.zeros(BATCH, 3, *model.visual.image_size)
    tokens = torch.zeros(BATCH, model.context_length, dtype=torch.long) if with_text else None
    return images, tokens


def student_flops(build: Callable[[], torch.nn.Module], with_text: bool) -> int:
    """Forward + backward FLOPs per (image, sentence) sample of the student `build()` returns."""
    with torch.device("meta"):
        model = build()
        images, tokens = _inputs(model, with_text)

    def step():
        out = model(images=images, tokens=tokens)
        loss = out.image.sum() + (out.text.sum() if out.text is not None else 0)
        loss.backward()

    return count_flops(step) // BATCH


def teacher_flops(model_cfg: Mapping) -> int:
    """Forward FLOPs per (image, sentence) sample of an OpenCLIP model with this config."""
    import open_clip

    from dime_ds.models.student import OPEN_CLIP_KEYS

    with torch.device("meta"):
        model = open_clip.CLIP(**{k: v for k, v in model_cfg.items() if k in OPEN_CLIP_KEYS}).eval()
        images, tokens = _inputs(model)

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


def image_forward_flops(encode_image: Callable[[torch.Tensor], torch.Tensor], image_size: int) -> int:
    """Forward FLOPs of one image through `encode_image` (torch's FLOP counter, batch of one)."""
    images = torch.zeros(1, 3, image_size, image_size)
    with torch.inference_mode():
        return count_flops(lambda: encode_image(images))
