"""Run a training job from a notebook cell (or a script) and watch it train.

    from minimind_v.launch import run_torchrun
    result = run_torchrun("minimind_v.train.clip", ["--out", "runs/clip", "--steps", "300"], nproc=2)
    result.metrics[-1]            # {"step": 300, "loss": ..., ...}

Why a child process and not a function call: DDP needs one process per device, and a crash or a
hung collective must not take the notebook's kernel down with it. While the job runs, the cell
shows its output, a progress bar and a loss curve, both read from the ``metrics.jsonl`` that rank
0 appends to in the run's ``--out`` folder. The whole output also goes to ``launch.log`` there.

Stopping. The job starts in a session of its own, so the notebook's stop button interrupts only
the kernel; the launcher then stops the job: SIGINT, then SIGTERM, then SIGKILL, each after the
previous one had its time. Signalling the job's process group is not enough: torchrun starts each
worker in a session of its own, and a failed worker's child outlives it. So every process of the
job carries a tag in its environment, which it passes on to whatever it starts, and on Linux the
launcher finds them all in /proc: it signals each, and says that every process of the job has
ended only once it has looked. Whatever a finished or failed job leaves running is stopped the
same way, and on Linux the job gets SIGTERM if the kernel itself dies (a restart).
"""

from __future__ import annotations

import os
import queue
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .machine import usable_cores
from .live_plot import MetricsWatch

__all__ = ["LaunchError", "LaunchResult", "run_torchrun"]

TAG_VAR = "MINIMIND_V_LAUNCH_TAGS"  # the tags of the jobs a process belongs to, colon-separated

# Runs a command with PR_SET_PDEATHSIG set: the command gets SIGTERM when the launcher dies (a
# kernel killed by a restart); torchrun then stops its workers. The setting survives exec.
_WITH_PARENT_DEATH_SIGNAL = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"  # 1 = PR_SET_PDEATHSIG
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"  # the launcher died before prctl
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class LaunchError(RuntimeError):
    """A job exited with a non-zero code. The message holds the command, the exit code and the
    last lines of the job's output; the attributes hold the same pieces."""

    def __init__(self, message: str, command: list[str], returncode: int, log_path: Path, tail: str):
        super().__init__(message)
        self.command, self.returncode, self.log_path, self.tail = command, returncode, log_path, tail


@dataclass
class LaunchResult:
    """What a finished job left."""

    command: list[str]
    returncode: int
    seconds: float
    log_path: Path
    metrics: list[dict]  # the records this run wrote to metrics.jsonl, in file order


def run_torchrun(module: str, args=None, nproc: int = 1, *, use_torchrun: bool = True, plot: bool = True,
                 env: dict | None = None, log_path=None, echo: bool = True, tail_lines: int = 40,
                 stop_timeouts: tuple[float, float] = (5.0, 3.0)) -> LaunchResult:
    """Run ``python -m <module> <args>`` under torchrun with ``nproc`` processes (or alone, with
    ``use_torchrun=False``), wait for it, and return a :class:`LaunchResult`.

    args: the command-line arguments; ``--out <folder>`` among them says where ``metrics.jsonl``
        is followed and ``launch.log`` is written (else the log goes to a temporary file).
    plot: in Jupyter, a loss curve redrawn in place every few seconds.
    env: extra environment variables. OMP_NUM_THREADS defaults to cores // nproc.
    echo: stream the job's output (stdout and stderr, in the order written) here.
    tail_lines: how many lines of the output a :class:`LaunchError` quotes.
    stop_timeouts: seconds the job has after SIGINT, and after SIGTERM, when interrupted.

    Raises :class:`LaunchError` if the job fails, and KeyboardInterrupt (after stopping every
    process of the job) if interrupted.
    """
    args = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args or []]
    # --standalone: a private rendezvous on a free port, so jobs never clash on one.
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if use_torchrun else []
    command = [sys.executable, *torchrun, "-m", module, *args]
    name = module.rsplit(".", 1)[-1]
    tag = f"{os.getpid()}-{secrets.token_hex(8)}"
    out = Path(args[args.index("--out") + 1]) if "--out" in args[:-1] else None
    if log_path is None:
        log_path = out / "launch.log" if out is not None else Path(tempfile.gettempdir()) / f"{name}-{tag}.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)

    child_env = {**os.environ, **(env or {})}
    cores = usable_cores()
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, cores // max(1, nproc))))  # processes x threads <= cores
    child_env.setdefault("PYTHONUNBUFFERED", "1")  # lines arrive as they are printed
    if child_env.get("MPLBACKEND", "").startswith("module://matplotlib_inline"):
        child_env["MPLBACKEND"] = "Agg"  # a kernel's inline backend means nothing in a child
    child_env[TAG_VAR] = ":".join(filter(None, [child_env.get(TAG_VAR), tag]))
    spawn = command
    if sys.platform.startswith("linux"):
        spawn = [sys.executable, "-S", "-c", _WITH_PARENT_DEATH_SIGNAL, str(os.getpid()), *command]

    watch = MetricsWatch(out / "metrics.jsonl" if out is not None else None, name, plot and _in_notebook())
    lines: queue.Queue = queue.Queue()
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:

        def drain(timeout: float) -> None:
            """Write the job's output waiting in the queue to the log (and here)."""
            try:
                line = lines.get(timeout=timeout)
                while True:
                    log.write(line + "\n")
                    if echo:
                        tqdm.write(line, file=sys.stdout)  # above our progress bar, not through it
                    line = lines.get_nowait()
            except queue.Empty:
                log.flush()

        log.write(f"$ {shlex.join(command)}\n")
        # One pipe for stdout and stderr keeps their lines in the order they were written.
        proc = subprocess.Popen(spawn, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=child_env, start_new_session=True)
        job = _Job(proc, tag)
        reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
        reader.start()
        interrupted = None
        try:
            while proc.poll() is None:
                drain(timeout=0.2)
                watch.poll()
            # The job has ended. Whatever it left running (a failed worker's child, a DataLoader
            # worker) goes with it, which also closes the output pipe those processes still hold.
            plan = [(signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)]
        except BaseException as exc:  # KeyboardInterrupt above all: the notebook's stop button
            interrupted = exc
            plan = [(signal.SIGINT, stop_timeouts[0]), (signal.SIGTERM, stop_timeouts[1]), (signal.SIGKILL, 5.0)]
        stopped = job.stop(plan)
        reader.join(timeout=2.0)
        drain(timeout=0)
        watch.close()
        if interrupted is not None or not stopped:
            what = ("interrupted" if isinstance(interrupted, KeyboardInterrupt) else
                    f"stopped by {type(interrupted).__name__}" if interrupted else "the job has ended")
            note = f"{name}: {what}; {job.outcome(stopped)}"
            log.write(f"# {note}\n")
            print(note, file=sys.stderr, flush=True)
        if interrupted is not None:
            raise interrupted
    seconds = time.monotonic() - start

    if proc.returncode != 0:
        raise _failure(module, command, proc.returncode, log_path, tail_lines, use_torchrun)
    if echo:
        print(f"{name}: done in {seconds:.1f} s; log {log_path}", flush=True)
    return LaunchResult(command, proc.returncode, seconds, log_path, watch.records)


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (which has always imported IPython already)."""
    ipython = sys.modules.get("IPython")
    return ipython is not None and getattr(ipython.get_ipython(), "kernel", None) is not None


def _read_lines(pipe, lines: queue.Queue) -> None:
    """Queue each line the job writes. Of a progress bar that redraws itself with carriage
    returns, only what a terminal finally shows is kept: the text after the last one."""
    with pipe:
        for raw in pipe:
            lines.put(raw.decode("utf-8", errors="replace").rstrip("\r\n").rsplit("\r", 1)[-1])


# ------------------------------------------------------------------------------ stopping the job


class _Job:
    """The processes of a launched job: its process group, and every process that carries its
    tag. A process seen once is followed by pid and start time until it has really ended: one
    that is exiting no longer shows its environment, but may still hold a GPU."""

    def __init__(self, proc: subprocess.Popen, tag: str):
        self.proc, self.tag = proc, tag.encode()
        self.seen: dict[int, bytes] = {}  # pid -> start time (a pid used again is another process)

    def processes(self) -> dict[int, int] | None:
        """{pid: process group} of the job's running processes (zombies have ended); None where
        there is no /proc to look in."""
        self.proc.poll()  # reap the job's first process once it has exited
        if not os.path.isdir("/proc"):
            return None
        prefix = TAG_VAR.encode() + b"="
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            if pid in self.seen or pid == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    tags = b":".join(item[len(prefix):] for item in f.read().split(b"\0") if item.startswith(prefix))
            except OSError:  # gone, or another user's
                continue
            if self.tag in tags.split(b":") and (stat := _stat(pid)) is not None:
                self.seen[pid] = stat[2]
        running = {}
        for pid, start in list(self.seen.items()):
            stat = _stat(pid)
            if stat is None or stat[2] != start or stat[0] in (b"Z", b"X"):
                del self.seen[pid]
            else:
                running[pid] = stat[1]
        return running

    def alive(self) -> bool:
        processes = self.processes()
        if processes is not None:
            return bool(processes)
        try:  # no /proc (macOS): the job's process group is all there is to see
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def signal(self, sig: int) -> None:
        """``sig`` to the job's process group, and to each process of the job outside it (each
        process gets it once: a second SIGINT could cut a worker's clean-up short)."""
        with suppress(OSError):  # the group may be empty
            os.killpg(self.proc.pid, sig)
        for pid, pgrp in (self.processes() or {}).items():
            if pgrp != self.proc.pid:
                with suppress(OSError):  # gone since
                    os.kill(pid, sig)

    def stop(self, plan: list[tuple[int, float]]) -> bool:
        """Each (signal, seconds) of the plan in turn, until no process of the job is left. True
        only when it has checked that none is left."""
        i = 0
        while i < len(plan):
            sig, wait = plan[i]
            i += 1
            try:
                if not self.alive():
                    return True
                self.signal(sig)
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline:
                    if not self.alive():
                        return True
                    time.sleep(0.05)
            except KeyboardInterrupt:  # pressed again: the last signal now (again, if it was)
                i = len(plan) - 1
        return not self.alive()

    def outcome(self, stopped: bool) -> str:
        if stopped:
            return "every process of the job has ended" if os.path.isdir("/proc") else "its process group has ended"
        processes = self.processes()
        return f"processes {sorted(processes) if processes else f'of group {self.proc.pid}'} may still be running"


def _stat(pid: int) -> tuple[bytes, int, bytes] | None:
    """(state, process group, start time) of a process, from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (name)": state ppid pgrp ...
        return fields[0], int(fields[2]), fields[19]
    except (OSError, IndexError, ValueError):
        return None


# ------------------------------------------------------------------------------ failure


def _failure(module, command, returncode, log_path: Path, tail_lines: int, torchrun: bool) -> LaunchError:
    """A :class:`LaunchError` quoting the last lines of the job's output."""
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]  # not the "$ command" line
    if torchrun and any("ChildFailedError" in line for line in lines):
        # torchrun's own traceback and failure report come last and are long: leave them to the
        # log, so the failing worker's traceback (and torchrun's line naming it) shows.
        lines = lines[:max((i for i, line in enumerate(lines) if line.startswith("Traceback")), default=None)]
    tail = "\n".join(lines[-tail_lines:] if tail_lines > 0 else [])
    how = f"exit code {returncode}"
    if -returncode in {s.value for s in signal.Signals}:
        how += f" (killed by {signal.Signals(-returncode).name})"
    message = (f"{module} failed with {how}\n  command: {shlex.join(command)}\n  log: {log_path}\n"
               f"--- the last {min(tail_lines, len(lines))} lines of its output ---\n{tail}")
    return LaunchError(message, command, returncode, log_path, tail)
