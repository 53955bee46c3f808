"""A rank that stops answering (crashed, killed, frozen, its machine gone) must not hang the job.

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

import itertools
import math
import os
import threading
import time
from datetime import timedelta
from typing import Callable, TypeVar

import torch.distributed as dist

from .collectives import is_distributed

__all__ = ["RankTimeoutError", "collective_timeout_s", "setup_timeout_s", "use_step_timeout", "ranks_not_answering",
           "is_communication_error", "explain_communication_failure", "check_in_wait_s", "run_on_main"]

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


