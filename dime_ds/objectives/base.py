"""The contract between the trainer and an objective.

One micro-step, as the trainer runs it for every objective:
    batch    = objective.next_batch()                      # host-side samples of this rank
    targets  = objective.targets(batch)                    # the teacher's side: no gradient
    features = objective.student_features(student, batch)  # the student's forward, with gradient
    losses   = objective.losses(features, targets)         # {"total": ..., one entry per term}
Keeping the four apart lets the trainer time each, and lets gradient accumulation (engine/accumulate.py)
embed several micro-batches before one loss over all of them: `losses` then receives the features
and targets of all of them concatenated along dim 0."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dime_ds.config.schema import RootConfig
from dime_ds.distributed.env import WorldInfo
from dime_ds.models import Precision, Student
from dime_ds.models.student import StudentOutput

# The student as the trainer hands it over: its engine's forward (ZeRO-3 gathers around it).
StudentForward = Callable[..., StudentOutput]


@dataclass(frozen=True)
class RunContext:
    """What every objective needs of the run besides its own config sections."""

    world: WorldInfo
    device: torch.device
    micro_batch: int  # samples per rank per micro-step
    precision: Precision  # the student's compute precision: its inputs are cast to it
    seed: int
    # The engine's ZeRO-3 inference wrapper (teacher.shard=zero3): objectives never import deepspeed.
    zero3_wrap: Callable[[torch.nn.Module, Precision, int], Any] | None = None


class Objective(ABC):
    name: str = ""
    # Width of the space the student must embed into (the teacher's); None: the student's own.
    target_dim: int | None = None
    # Widths of an ensemble's further teachers: the student learns a projection into each space.
    ensemble_dims: tuple[int, ...] = ()
    # Features that are not per-sample (the same value in every micro-batch, e.g. CLIP's logit scale):
    # accumulation takes one micro-batch's value instead of concatenating them.
    SHARED_FEATURES: tuple[str, ...] = ()

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: RootConfig, ctx: RunContext) -> "Objective":
        """Built from the root config: each objective takes only the sections it reads."""

    @abstractmethod
    def start(self, student: Student, state: dict | None) -> None:
        """Open the data streams for `student` at the positions `state` (a checkpoint's) holds."""

    @abstractmethod
    def state_dict(self) -> dict:
        """This rank's stream positions, for a checkpoint."""

    @abstractmethod
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far on this rank, per stream."""

    def data_faults(self) -> dict[str, dict]:
        """Per stream (every BatchStream the objective holds, by attribute name), on this rank:
        {"damaged": the damaged shards met, "damaged_epochs": {shard: [epochs it was met in]} (what
        engine/metrics.py unions over ranks), "truncated": sentences cut to the context}."""
        from dime_ds.data.loaders import BatchStream

        # A shard from a state written before epochs were recorded counts once, as epoch None.
        return {name: {"damaged": len(s.damaged), "truncated": s.truncated,
                       "damaged_epochs": {shard: list(s.damaged_epochs.get(shard) or [None]) for shard in s.damaged}}
                for name, s in vars(self).items() if isinstance(s, BatchStream)}

    @abstractmethod
    def next_batch(self) -> dict:
        """This rank's next micro-batch."""

    def targets(self, batch: dict) -> dict:
        """What the loss compares the student with (the teacher's embeddings); none by default."""
        return {}

    @abstractmethod
    def student_features(self, student: StudentForward, batch: dict) -> dict:
        """The student's embeddings of the batch, with gradient."""

    @abstractmethod
    def losses(self, features: dict, targets: dict) -> dict[str, torch.Tensor]:
        """This rank's local losses: `total` (what is backpropagated) and each named term."""

    def trainable_module(self) -> torch.nn.Module | None:
        """Parameters the objective trains beside the student (CLIP-CID's learnable centres); the engine
        wraps them with the student, so its optimizer, gradient averaging and checkpoints cover them.
        The objective reads them outside the student's forward: ZeRO-3 (partitioned parameters) refuses
        them. None: nothing of its own to train."""
        return None

    def borrowed_text(self) -> tuple[Callable, Callable] | None:
        """(encode_text, tokenize) for a student without a text tower (evaluation); None: none to lend."""
        return None

    def teacher_encoder(self):
        """The frozen teacher as an eval Encoder, to score beside the student; None without one."""
        return None

    def similarity_sample(self, n: int = 16) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(teacher, student) image-text cosine similarities of the last batch's first `n` rows."""
        return None

    def info(self) -> dict:
        """Figures for the run summary (the teacher's size, ...)."""
        return {}

    def live_teacher_cfgs(self) -> list[dict]:
        """The OpenCLIP model configs of the teachers that run forward every step (their FLOPs count in
        the throughput readout); none for cached teachers."""
        return []
