"""What evaluation needs of any model (a student mid-training, a teacher, an exported directory):
raw embeddings in one space, its tokenizer and preprocessing. Below objectives/, engine/ and
eval/, so each can hand one to the others."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Encoder:
    """What evaluation needs of a model: raw embeddings in one space, its tokenizer and preprocessing."""

    name: str
    encode_image: Callable[[torch.Tensor], torch.Tensor]
    encode_text: Callable[[torch.Tensor], torch.Tensor]
    tokenize: Callable[[list[str]], torch.Tensor]
    preprocess_cfg: dict
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    info: dict = field(default_factory=dict)  # shown in reports: source, parameters, ...

    @torch.no_grad()
    def images(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encode_image(x.to(self.device, self.dtype)).float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.encode_text(self.tokenize(texts).to(self.device)).float(), dim=-1)
