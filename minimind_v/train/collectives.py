"""Talking to the other ranks: whether a job is running, and the collectives training uses.

Every function here is a no-op (or the identity) when running alone, so one script runs with or
without torchrun.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "barrier", "all_reduce_mean", "all_gather_with_grad", "print0"]


def is_distributed() -> bool:
    """True when a process group is running (so collectives must be called on every rank)."""
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait until every rank gets here (a no-op when running alone)."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over all ranks, as a new tensor (the input is left unchanged).

    Use it for logging (loss, accuracy) so rank 0 reports the whole job, not its own shard.
    """
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of its own slice, summed over ranks.

    Works on every backend (Gloo has no reduce_scatter): the backward all-reduces the full gradient
    and keeps this rank's rows.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world_size, ctx.rows = dist.get_rank(), dist.get_world_size(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)  # (world_size * rows, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (rows, ...) from all ranks in rank order -> (world_size*rows, ...).

    Gradients flow back to every rank's own rows. Every rank must pass the same number of rows.
    If every rank computes the same loss on the gathered tensor, the DDP-averaged gradient equals
    the gradient of that loss in a single process holding the whole batch.
    """
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if not is_distributed() or dist.get_rank() == 0:
        print(*args, **kwargs)

