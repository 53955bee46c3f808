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
        batch = ...                              # this rank's share (trainer.StepBatches)
        loss = ...; loss.backward(); opt.step()                          # DDP averages gradients
        print0(f"loss {all_reduce_mean(loss.detach()).item():.3f}")
    if info.is_main:
        unwrap(model).save_pretrained(out)
    cleanup_distributed()

A rank that stops answering (crashed, killed, frozen, its machine gone) must not hang the job:
the time limits, the check-in that names the ranks that went quiet and `run_on_main` are in
:mod:`minimind_v.train.rank_failures`; the collectives in :mod:`minimind_v.train.collectives`
(both re-exported here, where the entry points import them from).
"""

from __future__ import annotations

import gc
import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..machine import usable_cores
from .collectives import all_gather_with_grad, all_reduce_mean, barrier, is_distributed, print0
from .rank_failures import (DDP_SETUP_TIMEOUT_ENV, DDP_TIMEOUT_ENV, DEFAULT_DDP_SETUP_TIMEOUT_S,  # noqa: F401
                            DEFAULT_DDP_TIMEOUT_S, STORE_PREFIX, RankTimeoutError, check_in_wait_s,
                            collective_timeout_s, explain_communication_failure, is_communication_error,
                            ranks_not_answering, run_on_main, setup_timeout_s, use_step_timeout)

__all__ = [
    "DistInfo",
    "RankTimeoutError",
    "setup_distributed",
    "collective_timeout_s",
    "setup_timeout_s",
    "use_step_timeout",
    "ranks_not_answering",
    "is_communication_error",
    "explain_communication_failure",
    "check_in_wait_s",
    "run_on_main",
    "cleanup_distributed",
    "is_distributed",
    "available_cores",
    "threads_per_process",
    "all_reduce_mean",
    "all_gather_with_grad",
    "barrier",
    "print0",
    "seed_everything",
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



def available_cores() -> int:
    """CPU cores this process may use: :func:`minimind_v.machine.usable_cores` (affinity and quota)."""
    return usable_cores()


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
            # Ranks reach this point, and the first collectives, at different times (imports,
            # loading): the generous set-up limit here; use_step_timeout() tightens it for training.
            dist.init_process_group(backend=chosen, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=setup_timeout_s()), **kwargs)
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



def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so runs repeat."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
