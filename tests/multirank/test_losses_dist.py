"""Distributed losses on 2 gloo ranks equal the single-process losses of the whole global batch,
and so do the gradients after DeepSpeed/DDP-style averaging over ranks (docs/design.md, "Scale-out")."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dime_ds.losses import functional
from tests.multirank.harness import RankError, run_ranks

WORLD = 2
# Non-default weights and temperatures, L_ud switched on, so that every term reaches the total.
CFG = dict(w_vl=0.5, w_pvl=0.2, w_ud=0.3, t_vl=1.5, t_pvl=3.0, t_ud=7.0, scale=100.0)
DIM_IN, DIM = 6, 8


def _batch(n_img: int, n_txt: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"t_img": torch.randn(n_img, DIM, generator=g), "t_txt": torch.randn(n_txt, DIM, generator=g),
            "x_img": torch.randn(n_img, DIM_IN, generator=g), "x_txt": torch.randn(n_txt, DIM_IN, generator=g)}


class Student(nn.Module):
    """Stands in for a student: linear image and text towers into the teacher's space."""

    def __init__(self, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.img = nn.Linear(DIM_IN, DIM)
        self.txt = nn.Linear(DIM_IN, DIM)
        self.logit_scale = nn.Parameter(torch.tensor(2.5))


def _share(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    n = x.shape[0] // world_size
    return x[rank * n:(rank + 1) * n]


def _dime_inputs(student: Student, b: dict, own_text: bool):
    s_txt = student.txt(b["x_txt"]) if own_text else b["t_txt"]
    return b["t_img"], b["t_txt"], student.img(b["x_img"]), s_txt


def _averaged_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a DDP/DeepSpeed engine does after each rank's backward: average the gradients."""
    from dime_ds.distributed import collectives as C

    return {n: C.all_reduce_mean(p.grad) for n, p in model.named_parameters() if p.grad is not None}


def _dime_rank(rank: int, world_size: int, batch: dict, own_text: bool):
    from dime_ds.losses.dime import dime_loss, reduce_for_logging

    local = {k: _share(v, rank, world_size) for k, v in batch.items()}
    student = Student()
    losses = dime_loss(*_dime_inputs(student, local, own_text), SimpleNamespace(**CFG))
    losses["total"].backward()
    return ({k: v.item() for k, v in losses.items()}, reduce_for_logging(losses), _averaged_grads(student))


@pytest.mark.parametrize("n_img, n_txt, own_text", [(6, 10, True), (6, 10, False), (8, 4, True)])
def test_dime_loss_and_gradients_equal_the_global_batch(n_img, n_txt, own_text):
    batch = _batch(n_img, n_txt, seed=n_img * 10 + n_txt)
    student = Student()
    want = functional.dime_losses(*_dime_inputs(student, batch, own_text), **CFG)
    want["total"].backward()
    want_grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert set(want_grads) == ({"img.weight", "img.bias", "txt.weight", "txt.bias"} if own_text
                               else {"img.weight", "img.bias"})

    ranks = run_ranks(_dime_rank, WORLD, batch, own_text)
    for key in ("vl", "pvl", "ud", "total"):
        local = [r[0][key] for r in ranks]
        assert local[0] != pytest.approx(local[1]), f"{key}: the ranks should hold different rows"
        assert sum(local) / WORLD == pytest.approx(want[key].item(), rel=1e-5, abs=1e-6), key
        for logged, _ in (r[1:] for r in ranks):
            assert logged[key] == pytest.approx(want[key].item(), rel=1e-5, abs=1e-6), key
    for _, _, grads in ranks:
        assert set(grads) == set(want_grads)
        for name, g in grads.items():
            torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _clip_rank(rank: int, world_size: int, batch: dict):
    from dime_ds.losses.dime import clip_loss, reduce_for_logging

    local = {k: _share(v, rank, world_size) for k, v in batch.items()}
    student = Student()
    loss = clip_loss(student.img(local["x_img"]), student.txt(local["x_txt"]), student.logit_scale)
    loss.backward()
    return loss.item(), reduce_for_logging({"clip": loss})["clip"], _averaged_grads(student)


def test_clip_loss_and_gradients_equal_the_global_batch():
    batch = _batch(8, 8, seed=7)
    student = Student()
    want = functional.clip_loss(student.img(batch["x_img"]), student.txt(batch["x_txt"]), student.logit_scale)
    want.backward()
    want_grads = {n: p.grad for n, p in student.named_parameters()}

    ranks = run_ranks(_clip_rank, WORLD, batch)
    assert sum(r[0] for r in ranks) / WORLD == pytest.approx(want.item(), rel=1e-5)
    for _, logged, grads in ranks:
        assert logged == pytest.approx(want.item(), rel=1e-5)
        assert set(grads) == set(want_grads)
        for name, g in grads.items():
            torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _collectives_rank(rank: int, world_size: int):
    from dime_ds.distributed import collectives as C

    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = C.gather_with_grad(x)
    # Rank r weighs the gathered rows by (r + 1): the owner's gradient is the sum over ranks.
    (gathered.sum(dim=1) * torch.arange(1.0, 5.0) * (rank + 1)).sum().backward()
    return {"rank": C.rank(), "world": C.world_size(), "gathered": gathered.detach(),
            "no_grad": C.gather_no_grad(x * 2), "grad": x.grad,
            "object": C.broadcast_object({"from": rank}, src=1), "objects": C.all_gather_object(rank),
            "mean": C.all_reduce_mean(torch.tensor([rank * 4.0])).item()}


def test_collectives_on_two_ranks():
    out = run_ranks(_collectives_rank, WORLD)
    full = torch.tensor([1.0, 1, 2, 2]).repeat_interleave(3).reshape(4, 3)
    for rank, r in enumerate(out):
        assert (r["rank"], r["world"]) == (rank, WORLD)
        torch.testing.assert_close(r["gathered"], full)
        torch.testing.assert_close(r["no_grad"], 2 * full)
        # d/dx of sum_r (r+1) * sum_j w_j * gathered_j, for rank `rank`'s rows w = (1,2) or (3,4).
        w = torch.tensor([1.0, 2.0]) + 2 * rank
        torch.testing.assert_close(r["grad"], (1 + 2) * w[:, None].expand(2, 3))
        assert r["object"] == {"from": 1} and r["objects"] == [0, 1] and r["mean"] == 2.0


def _fails_on_rank_one(rank: int, world_size: int):
    if rank == 1:
        raise ValueError("boom on rank one")
    from dime_ds.distributed import collectives as C

    C.barrier()  # rank 0 would wait here forever: the harness must kill it


def test_harness_reports_the_remote_traceback():
    with pytest.raises(RankError, match="(?s)rank 1.*ValueError: boom on rank one"):
        run_ranks(_fails_on_rank_one, WORLD, timeout=60)
