"""Distributed-training utilities shared by every training entry point.

One script runs two ways:

    python -m minimind_v.train.clip ...                                   # one process
    torchrun --standalone --nproc_per_node 2 -m minimind_v.train.clip ... # DDP, one process per device

`setup_distributed()` reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE), starts a process group only when there is more than one process (NCCL on CUDA,
Gloo on CPU), and caps each process's CPU threads so that processes x threads <= cores: two
processes with two threads each on two cores run many times slower than one thread each, because
the threads fight over the cores.

A typical loop:

    info = setup_distributed()
    seed_everything(seed)                        # same initial weights on every rank
    model = wrap_ddp(build_model().to(info.device), info)
    for step in range(steps):
        idx = shard_indices(n, epoch_seed, info.rank, info.world_size)   # this rank's examples
        loss = ...; loss.backward(); opt.step()                          # DDP averages gradients
        print0(f"loss {all_reduce_mean(loss.detach()).item():.3f}")
    if info.is_main:
        unwrap(model).save_pretrained(out)
    cleanup_distributed()
"""

from __future__ import annotations

import gc
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "setup_distributed",
    "cleanup_distributed",
    "is_distributed",
    "available_cores",
    "threads_per_process",
    "all_reduce_mean",
    "all_gather_with_grad",
    "barrier",
    "print0",
    "seed_everything",
    "shard_indices",
    "wrap_ddp",
    "unwrap",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int  # global index of this process, 0..world_size-1
    world_size: int  # number of processes in the job
    local_rank: int  # index of this process on its machine (picks the GPU)
    device: torch.device  # cuda:<local_rank> when CUDA is available, else cpu
    is_main: bool  # rank 0: the one that prints, shows progress bars and saves
    backend: str | None  # "nccl", "gloo", or None when running without a process group


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from err


def is_distributed() -> bool:
    """True when a process group is running (so collectives must be called on every rank)."""
    return dist.is_available() and dist.is_initialized()


def available_cores() -> int:
    """CPU cores this process may use (respects taskset/cgroup affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_per_process(local_world_size: int) -> int:
    """Torch CPU threads for each of `local_world_size` processes on this machine.

    Each process gets an equal share of the cores, at least 1. An OMP_NUM_THREADS set by the user
    or by torchrun (which sets 1 for multi-process jobs) lowers that share but never raises it
    above the fair share: oversubscribed cores make every process wait on the others.
    """
    share = max(1, available_cores() // max(1, local_world_size))
    requested = _env_int("OMP_NUM_THREADS", 0)
    return min(share, requested) if requested > 0 else share


def setup_distributed(backend: str | None = None, num_threads: int | None = None) -> DistInfo:
    """Join the torchrun job if there is one, pick the device, and set the CPU thread count.

    backend: override the automatic choice (nccl on CUDA, gloo on CPU).
    num_threads: override the automatic torch thread count (see `threads_per_process`).
    Run without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) no process group is started.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world_size}")

    torch.set_num_threads(num_threads if num_threads is not None else threads_per_process(local_world_size))

    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    chosen = None
    if world_size > 1:
        chosen = backend or ("nccl" if device.type == "cuda" else "gloo")
        if not is_distributed():
            # torchrun provides MASTER_ADDR/MASTER_PORT, so the env:// rendezvous needs nothing else.
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend=chosen, rank=rank, world_size=world_size, **kwargs)
        chosen = dist.get_backend()
    return DistInfo(rank, world_size, local_rank, device, rank == 0, chosen)


def cleanup_distributed() -> None:
    """Leave the process group (a no-op when running alone).

    Drop every DDP-wrapped model first (let the function that built it return): a DDP reducer
    that outlives its process group can hang the process when it is finally destroyed.
    """
    if is_distributed():
        gc.collect()  # free DDP wrappers that are only kept alive by reference cycles
        dist.destroy_process_group()


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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so runs repeat."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shard_indices(
    n: int, epoch_seed: int, rank: int, world_size: int, drop_last: bool = False
) -> torch.Tensor:
    """This rank's share of a seeded permutation of range(n): a 1-D int64 tensor.

    All ranks draw the same permutation from `epoch_seed` and take disjoint contiguous slices that
    together cover it, so a resumed run that knows the epoch seed reproduces the order exactly.
    Slices differ in length by at most one; drop_last=True trims the permutation to a multiple of
    world_size so every rank gets exactly n // world_size items (DDP ranks must take equal steps).
    """
    if n < 0:
        raise ValueError(f"shard_indices: n must be >= 0, got {n}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_indices: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    generator = torch.Generator().manual_seed(epoch_seed)
    order = torch.randperm(n, generator=generator)
    if drop_last:
        order = order[: n - n % world_size]
    # First (len % world_size) ranks get one extra item.
    base, extra = divmod(len(order), world_size)
    start = rank * base + min(rank, extra)
    return order[start : start + base + (1 if rank < extra else 0)]


def wrap_ddp(model: nn.Module, info: DistInfo, **ddp_kwargs) -> nn.Module:
    """Wrap `model` (already on info.device) in DistributedDataParallel when world_size > 1."""
    if info.world_size == 1:
        return model
    if not is_distributed():
        raise RuntimeError("wrap_ddp: world_size > 1 but no process group; call setup_distributed() first")
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP (or torch.compile) wrapper; the model itself otherwise."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model
