"""TensorBoard on rank 0 only; every other rank gets a writer that does nothing, so callers never
branch on rank."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch


class TBWriter:
    def __init__(self, log_dir: str | Path, enabled: bool):
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(log_dir))

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._writer:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._writer:
            # Markdown: indent so YAML keeps its layout.
            self._writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)

    def similarity_image(self, tag: str, teacher: torch.Tensor, student: torch.Tensor, step: int) -> None:
        """Teacher and student similarity matrices side by side, as one grey image in [0, 1]."""
        if self._writer:
            def scaled(m: torch.Tensor) -> np.ndarray:
                m = m.detach().float().cpu().numpy()
                return (m + 1.0) / 2.0  # cosine similarity -> [0, 1]

            gap = np.ones((teacher.shape[0], 2), dtype=np.float32)
            image = np.concatenate([scaled(teacher), gap, scaled(student)], axis=1)
            self._writer.add_image(tag, image[None], step, dataformats="CHW")

    def flush(self) -> None:
        if self._writer:
            self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()
            self._writer = None
