"""Collectives on the default process group. In a single process without a process group every
function is the identity (or a no-op), so callers never branch on "am I distributed"."""
from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    """A default process group exists (it may hold a single rank)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed() and world_size() > 1:
        dist.barrier()


def _comm_device(t: torch.Tensor) -> torch.device:
    """NCCL only moves CUDA tensors; gloo takes either."""
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Rank `src`'s buffers (BatchNorm running statistics) on every rank, in place. Each rank's
    statistics follow its own micro-batches; a checkpoint and an evaluation need one set."""
    if not is_distributed() or world_size() == 1:
        return
    for buffer in module.buffers():
        t = buffer.detach().to(_comm_device(buffer))  # the buffer itself where the backend can move it
        dist.broadcast(t, src)
        if t.data_ptr() != buffer.data_ptr():
            buffer.detach().copy_(t)


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """`op` over ranks, out of place, no gradient, on `t`'s device (a CPU tensor is fine on NCCL)."""
    if not is_distributed() or world_size() == 1:
        return t.detach().clone()
    out = t.detach().to(_comm_device(t), copy=True).contiguous()
    dist.all_reduce(out, op=op)
    return out.to(t.device)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, out of place, no gradient, on `t`'s device (a CPU tensor is fine on NCCL)."""
    out = _all_reduce(t, dist.ReduceOp.SUM)
    return out / world_size() if is_distributed() and world_size() > 1 else out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, out of place, no gradient, on `t`'s device. Integer tensors sum exactly, in
    any order: what a result that must not depend on the rank split sums (entry counts)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def reduce_scalar(value: float, op: str = "sum") -> float:
    """A Python number reduced over ranks: op "sum", "max" or "min" (counts, stop flags, agreement)."""
    if not is_distributed() or world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    t = t.to(_comm_device(t))
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return float(t.item())


# torch 2.14 names the tensor-in-tensor-out collectives *_single and deprecates the older names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather_cat(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    out = t.new_empty((world_size() * t.shape[0], *t.shape[1:]))
    _all_gather_single(out, t)
    return out


def gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks along dim 0 (rank order), detached. Every rank must pass the same
    shape."""
    if not is_distributed() or world_size() == 1:
        return t.detach()
    with torch.no_grad():
        return _gather_cat(t.detach())


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums, over ranks, the gradients every rank computed for each block
    and hands the sum to the block's owner (reduce-scatter): the same contract as
    torch.distributed.nn.all_gather, which torch 2.14 deprecates with a warning on every call and
    whose gloo backward is a rank-by-rank scatter loop."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _gather_cat(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // world_size(), *grad.shape[1:]))
        _reduce_scatter_single(out, grad, op=dist.ReduceOp.SUM)
        return out


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks along dim 0 (rank order); the gradient of the result flows back to
    each block's owner, summed over the ranks that used it. Every rank must pass the same shape."""
    if not is_distributed() or world_size() == 1:
        return t
    return _GatherWithGrad.apply(t)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks, out of place, no gradient (a softmax's shift: any value works)."""
    return _all_reduce(t, dist.ReduceOp.MAX)


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks whose every rank's result depends on every rank's input: the backward sums the
    result's gradients over ranks and hands the sum to every input (what torch.distributed.nn.all_reduce
    does, without its deprecation warning)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _all_reduce(t, dist.ReduceOp.SUM)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _all_reduce(grad, dist.ReduceOp.SUM)


def all_reduce_sum_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks with gradient: d(sum over ranks of every rank's loss)/d(each rank's input)
    reaches each input, the same contract as gather_with_grad."""
    if not is_distributed() or world_size() == 1:
        return t
    return _AllReduceSumWithGrad.apply(t)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank (picklable objects)."""
    if not is_distributed() or world_size() == 1:
        return obj
    box: list[Any] = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (picklable objects)."""
    if not is_distributed() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object_to_main(obj: T) -> list[T] | None:
    """Every rank's `obj` on rank 0 (rank order), None on the others: half the memory of an
    all-gather when only rank 0 needs the result."""
    if not is_distributed() or world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
