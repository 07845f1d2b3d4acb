"""Stand-ins for accumulation tests: a tiny student module (with dropout) and the real DIME-FM and
CLIP objectives' losses over tensor batches instead of shard streams, plus the two ways of taking
one step that must agree: the plain whole-batch loss and the two-pass accumulated one."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from dime_ds.engine import accumulate
from dime_ds.models.student import StudentOutput
from dime_ds.objectives import ClipObjective, DimeObjective

# Non-default weights and temperatures, L_ud switched on, so that every term reaches the total.
LOSS_CFG = SimpleNamespace(w_vl=0.5, w_pvl=0.2, w_ud=0.3, t_vl=1.5, t_pvl=3.0, t_ud=7.0, scale=100.0)
DIM_IN, DIM = 6, 8
CPU = torch.device("cpu")


class TinyStudent(nn.Module):
    """forward(images, tokens) -> StudentOutput, like the engine-wrapped Student: two small towers
    (dropout in the image one), a learned [1]-shaped logit scale."""

    def __init__(self, dropout: float = 0.0, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.img = nn.Sequential(nn.Linear(DIM_IN, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, DIM))
        self.txt = nn.Sequential(nn.Linear(DIM_IN, 16), nn.Dropout(dropout), nn.Linear(16, DIM))
        self.logit_scale = nn.Parameter(torch.tensor([2.5]))

    def forward(self, images=None, tokens=None) -> StudentOutput:
        return StudentOutput(self.img(images) if images is not None else None,
                             self.txt(tokens) if tokens is not None else None, self.logit_scale * 1.0)


class TensorDime(DimeObjective):
    """DIME-FM's own `losses` on tensor batches {x_img, x_txt, t_img, t_txt} (targets precomputed)."""

    def __init__(self, own_text: bool):
        self.loss_cfg, self.own_text, self._last, self.cid = LOSS_CFG, own_text, None, None
        self.sources, self.weights, self.scales, self.combine, self.cid_teacher = [None], None, None, "prob", 0

    def targets(self, batch: dict) -> dict:
        return {"image": batch["t_img"], "text": batch["t_txt"]}

    def student_features(self, student, batch: dict) -> dict:
        out = student(images=batch["x_img"], tokens=batch["x_txt"] if self.own_text else None)
        return {"image": out.image.float(), "text": out.text.float() if out.text is not None else None}


class TensorClip(ClipObjective):
    """CLIP's own `losses` and SHARED_FEATURES on tensor batches of pairs {x_img, x_txt}."""

    def __init__(self):
        pass

    def student_features(self, student, batch: dict) -> dict:
        out = student(images=batch["x_img"], tokens=batch["x_txt"])
        return {"image": out.image.float(), "text": out.text.float(), "logit_scale": out.logit_scale.float()}


OBJECTIVES = {"dime_frozen_text": lambda: TensorDime(False), "dime_own_text": lambda: TensorDime(True),
              "clip": TensorClip}


def global_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x_img": torch.randn(n, DIM_IN, generator=g), "x_txt": torch.randn(n, DIM_IN, generator=g),
            "t_img": torch.randn(n, DIM, generator=g), "t_txt": torch.randn(n, DIM, generator=g)}


def split(batch: dict, parts: int) -> list[dict]:
    n = next(iter(batch.values())).shape[0] // parts
    return [{k: v[i * n:(i + 1) * n] for k, v in batch.items()} for i in range(parts)]


def plain_step(objective, student: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """The reference: one forward and one backward of the loss over `batch` (grad_accum=1)."""
    losses = objective.losses(objective.student_features(student, batch), objective.targets(batch))
    losses["total"].backward()
    return {k: v.detach() for k, v in losses.items()}


def accumulated_step(objective, student: nn.Module, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
    """The two-pass step over `micro_batches`, plain autograd standing in for the engine."""
    targets = [objective.targets(b) for b in micro_batches]
    embedded = accumulate.embed(objective, student, micro_batches, CPU)
    return accumulate.backward_each(objective, student, lambda surrogate: surrogate.backward(), micro_batches,
                                    targets, embedded)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, want: dict, rtol: float = 1e-5) -> None:
    """fp32 agreement: each element within rtol of itself or of its tensor's largest element (entries
    near zero are sums of large terms that cancel)."""
    assert got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=rtol, atol=rtol * g.abs().max().item(), msg=name)


def cpu_context(seed: int = 0):
    """The RunContext of this CPU process in fp32: rank and world size of the process group, if any."""
    from dime_ds.distributed import collectives as C
    from dime_ds.distributed.env import WorldInfo
    from dime_ds.models import PRECISIONS
    from dime_ds.objectives import RunContext

    world = WorldInfo(C.rank(), C.rank(), C.world_size(), C.world_size(), "127.0.0.1", 0, "single")
    return RunContext(world, CPU, 4, PRECISIONS["fp32"], seed)


class TensorCid(TensorDime):
    """DIME-FM with CLIP-CID's terms, its own CidTerms (pseudo-labels read from `cluster_dir`), on
    tensor batches that also carry image `keys`."""

    def __init__(self, loss_cfg, cluster_dir, own_text: bool = False):
        from dime_ds.config.schema import ClusterConfig
        from dime_ds.objectives.cid import CidTerms

        self.loss_cfg, self.own_text, self._last = loss_cfg, own_text, None
        self.sources, self.weights, self.scales, self.combine, self.cid_teacher = [None], None, None, "prob", 0
        self.cid = CidTerms(loss_cfg, ClusterConfig(out_dir=str(cluster_dir)), DIM, cpu_context()) \
            if loss_cfg.w_cluster > 0 or loss_cfg.w_instance > 0 else None

    def targets(self, batch: dict) -> dict:
        return {**super().targets(batch), **(self.cid.batch_labels(batch["keys"]) if self.cid else {})}

    def student_features(self, student, batch: dict) -> dict:
        return {**super().student_features(student, batch), **(self.cid.student_features() if self.cid else {})}
