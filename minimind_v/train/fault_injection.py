"""Where the crash tests (tests/test_faults_training.py) kill a run: a no-op unless asked."""

from __future__ import annotations

import os
import signal

KILL_AT_ENV = "MINIMIND_V_TEST_KILL_AT"
KILL_SIGNAL_ENV = "MINIMIND_V_TEST_KILL_SIGNAL"


def fault_point(where: str) -> None:
    """Fault-injection point for the crash tests (tests/test_faults_training.py); a no-op unless
    ``MINIMIND_V_TEST_KILL_AT`` names it.

    ``MINIMIND_V_TEST_KILL_AT=<where>`` or ``<where>@<rank>``; ``MINIMIND_V_TEST_KILL_SIGNAL``:
    SIGKILL (default: the process dies on the spot, as in a power cut or the OOM killer) or e.g.
    SIGSTOP (it freezes). The points: ``step-<n>`` (in optimizer step n, after its backward, before
    the update) and ``final-save`` (after the model's weights are saved, before its tokenizer).
    """
    target = os.environ.get(KILL_AT_ENV)
    if not target:
        return
    name, _, rank = target.partition("@")
    if name != where or (rank and rank != os.environ.get("RANK", "0")):
        return
    sig = getattr(signal, os.environ.get(KILL_SIGNAL_ENV, "SIGKILL"))
    print(f"fault injection: rank {os.environ.get('RANK', '0')} (pid {os.getpid()}) sends itself "
          f"{sig.name} at {where}", flush=True)
    os.kill(os.getpid(), sig)
