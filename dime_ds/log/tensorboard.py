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

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._writer:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._writer:
            # Markdown: indent so YAML keeps its layout.
            self._writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)

    def similarity_image(self, tag: str, teacher: torch.Tensor, student: torch.Tensor, step: int) -> None:
        """Teacher and student similarity matrices side by side as heatmaps on one colour scale."""
        if self._writer:
            self._writer.add_image(tag, similarity_heatmaps(teacher, student), step, dataformats="HWC")

    def close(self) -> None:
        if self._writer:
            self._writer.close()
            self._writer = None


def similarity_heatmaps(teacher: torch.Tensor, student: torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8 picture, about 800 x 360 px: the two (images x texts) similarity matrices with
    titles and one colorbar, so equal colours mean equal similarities in both."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no GUI backend

    mats = [m.detach().float().cpu().numpy() for m in (teacher, student)]
    vmin, vmax = min(m.min() for m in mats), max(m.max() for m in mats)
    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, m, title in zip(axes, mats, ("teacher", "student")):
        shown = ax.imshow(m, vmin=vmin, vmax=vmax, cmap="viridis", interpolation="nearest", aspect="auto")
        ax.set(title=f"{title} similarity", xlabel="text", ylabel="image")
    fig.colorbar(shown, ax=list(axes), label="cosine similarity")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
