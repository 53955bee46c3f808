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

* Joining the job and the set-up before training (loading models, data) may take each rank a
  different time; collectives there wait up to ``MINIMIND_V_DDP_SETUP_TIMEOUT_S`` seconds
  (default 1800).
* Once training starts (`use_step_timeout`), a collective that gets no answer within
  ``MINIMIND_V_DDP_TIMEOUT_S`` seconds (default 300) fails. The ranks that still run then check in
  through the rendezvous store (`ranks_not_answering`, at most min(T, 30) s more), and the error
  (`RankTimeoutError`) names the ranks that did not. So with gloo (CPU) a rank that stops answering
  ends the job within T + min(T, 30) seconds of its last answer (default 330 s); torchrun then
  stops the other processes (it waits 30 s before it SIGKILLs one that ignores SIGTERM, e.g. a
  stopped one). With NCCL the watchdog aborts the job within T (its log names the collective).
  One rank's save of a checkpoint during training must fit in T.
* Work that only rank 0 does while the others wait (building the feature cache, an evaluation)
  goes through `run_on_main`: the others poll the store for its result and for its heartbeat
  instead of sitting in a collective, so the work may take hours; if rank 0 stops beating for T
  seconds they fail naming it.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import random
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

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


DDP_TIMEOUT_ENV = "MINIMIND_V_DDP_TIMEOUT_S"
DDP_SETUP_TIMEOUT_ENV = "MINIMIND_V_DDP_SETUP_TIMEOUT_S"
DEFAULT_DDP_TIMEOUT_S = 300.0
DEFAULT_DDP_SETUP_TIMEOUT_S = 1800.0
STORE_PREFIX = "minimind_v"


class RankTimeoutError(RuntimeError):
    """A rank of the job stopped answering; the message names it and the time limit."""


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"environment variable {name}={value!r} must be a positive number of seconds")
    return seconds


def collective_timeout_s() -> float:
    """Seconds a collective waits for the other ranks during training (``MINIMIND_V_DDP_TIMEOUT_S``)."""
    return _env_seconds(DDP_TIMEOUT_ENV, DEFAULT_DDP_TIMEOUT_S)


def setup_timeout_s() -> float:
    """Seconds a collective waits while the job starts (``MINIMIND_V_DDP_SETUP_TIMEOUT_S``), never
    less than the training timeout."""
    return max(_env_seconds(DDP_SETUP_TIMEOUT_ENV, DEFAULT_DDP_SETUP_TIMEOUT_S), collective_timeout_s())


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


def use_step_timeout() -> float:
    """From now on a collective fails when a rank does not answer within `collective_timeout_s`.

    Call it when the ranks are in step (right before the training loop). Returns the limit in seconds.
    """
    seconds = collective_timeout_s()
    if is_distributed():
        set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        if set_timeout is None:  # an older torch: the set-up limit stays in force
            print(f"warning: this torch cannot change a process group's timeout; collectives wait up to "
                  f"{setup_timeout_s():g} s ({DDP_SETUP_TIMEOUT_ENV})", flush=True)
            return setup_timeout_s()
        set_timeout(timedelta(seconds=seconds))
    return seconds


def _store():
    """The job's rendezvous key-value store (torchrun's agent hosts it, so it answers even when a
    rank does not)."""
    return dist.distributed_c10d._get_default_store()


def _store_key(*parts) -> str:
    # torchrun restarts a failed job in the same store: keep each attempt's keys apart
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return "/".join([STORE_PREFIX, restart, *map(str, parts)])


def ranks_not_answering(wait_s: float) -> list[int]:
    """After a collective failed: check in through the store and wait up to ``wait_s`` seconds for
    every other rank to do the same (each does so when its own collective fails). Returns the ranks
    that never did, sorted. Without a process group: []."""
    if not is_distributed():
        return []
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        store = _store()
        store.set(_store_key("alive", rank), "1")
        waiting = [r for r in range(world) if r != rank]
        deadline = time.monotonic() + wait_s
        while waiting:
            waiting = [r for r in waiting if not store.check([_store_key("alive", r)])]
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        return waiting
    except Exception:  # the store itself is unreachable (it lives in a rank that stopped): no one can be vouched for
        return [r for r in range(world) if r != rank]


def is_communication_error(err: BaseException) -> bool:
    """True for a failed or timed-out collective (a peer gone, frozen or unreachable), as opposed to
    an error of this rank's own work. Gloo reports these as plain RuntimeErrors, hence the text."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(mark in text for mark in (
        "Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "gloo/transport",
        "NCCL", "ProcessGroup"))


def check_in_wait_s() -> float:
    """How long a rank whose collective failed waits for the others to check in: min(T, 30) s."""
    return min(collective_timeout_s(), 30.0)


def explain_communication_failure(err: BaseException, what: str = "", note: str = "",
                                  missing: list[int] | None = None) -> RankTimeoutError:
    """Find which ranks stopped answering after ``err`` and say so (call it on every rank whose
    collective failed; it waits at most `check_in_wait_s` for the others to check in, unless
    ``missing`` already says who did not)."""
    limit, wait_s = collective_timeout_s(), check_in_wait_s()
    if missing is None:
        missing = ranks_not_answering(wait_s)
    rank = dist.get_rank() if is_distributed() else 0
    where = f" {what}" if what else ""
    if missing:
        names = ", ".join(map(str, missing))
        message = (f"rank{'s' if len(missing) > 1 else ''} {names} stopped answering{where}: rank {rank}'s "
                   f"collective got no reply within {limit:g} s ({DDP_TIMEOUT_ENV}) and "
                   f"{'they' if len(missing) > 1 else 'it'} did not check in within {wait_s:g} s after that "
                   f"(crashed, killed, frozen or unreachable: see {'their' if len(missing) > 1 else 'its'} log)")
    else:
        message = (f"a collective failed on rank {rank}{where} although every rank still answers: the ranks "
                   f"ran different collectives (a bug), or the network is slower than {DDP_TIMEOUT_ENV}="
                   f"{limit:g} s allows")
    detail = str(err).splitlines()[0] if str(err) else ""
    return RankTimeoutError(f"{message}. {note + '. ' if note else ''}({type(err).__name__}: {detail})")


_main_work_counter = itertools.count()
_T = TypeVar("_T")


def run_on_main(work: Callable[[], _T], what: str) -> _T | None:
    """Run ``work()`` on rank 0 while the other ranks wait for it (they get None).

    The others do not sit in a collective (which would time out on long work such as encoding a
    dataset): they poll the store for rank 0's result, and for a heartbeat rank 0 sends every
    second. If rank 0 fails they fail with its error; if it stops beating for `collective_timeout_s`
    seconds they fail naming it. Alone it simply runs ``work()``.
    """
    if not is_distributed():
        return work()
    store, key = _store(), _store_key("main-work", next(_main_work_counter))
    if dist.get_rank() == 0:
        stop = threading.Event()

        def beat():
            while not stop.wait(1.0):
                try:
                    store.add(key + "/beat", 1)
                except Exception:
                    return

        thread = threading.Thread(target=beat, name="minimind-v-heartbeat", daemon=True)
        thread.start()
        try:
            result = work()
        except BaseException as err:
            store.set(key + "/done", f"failed: {type(err).__name__}: {err}"[:4000])
            raise
        finally:
            stop.set()
            thread.join()
        store.set(key + "/done", "ok")
        return result
    limit = collective_timeout_s()
    last_beat, last_change = None, time.monotonic()
    while True:
        if store.check([key + "/done"]):
            outcome = store.get(key + "/done").decode("utf-8", "replace")
            if outcome == "ok":
                return None
            raise RuntimeError(f"rank 0 {outcome.replace('failed: ', 'failed while ' + what + ': ', 1)}")
        beat_count = store.add(key + "/beat", 0)
        now = time.monotonic()
        if beat_count != last_beat:
            last_beat, last_change = beat_count, now
        elif now - last_change > limit:
            raise RankTimeoutError(f"rank 0 stopped answering while {what}: no heartbeat for {limit:g} s "
                                   f"({DDP_TIMEOUT_ENV})")
        time.sleep(0.5)


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
