"""Run a training job from a notebook cell (or a script) and watch it train.

Every training stage is a module entry point that runs alone or under torchrun. This module
starts one as a child process and, while it runs, streams its output into the cell, follows the
``metrics.jsonl`` its rank 0 appends to, and shows a progress bar and a live loss curve:

    from minimind_v.launch import run_torchrun
    result = run_torchrun("minimind_v.train.clip", {"out": "runs/clip", "steps": 300}, nproc=2)
    result.metrics[-1]            # {"step": 300, "loss": ..., "lr": ..., ...}

Why a child process and not a function call: DDP needs one process per device, and a crash or a
hung collective must not take the notebook's kernel down with it.

* The job runs in its own process group (a new session), so the notebook's interrupt button
  reaches only the kernel; the launcher then stops the *whole* job (SIGINT, then SIGTERM, then
  SIGKILL), so no torchrun worker, DataLoader worker or other grandchild is left holding a GPU.
  torchrun starts each worker in a session of its own, outside the group: every process of the
  job carries a tag in its environment (``MINIMIND_V_LAUNCH_TAGS``), and on Linux the launcher
  finds them all in /proc, and says every process has ended only once it has checked. Whatever a
  finished or failed job leaves running (a failed worker's child) is stopped the same way.
  On Linux the job also gets SIGTERM if the kernel itself dies (a restart), via PR_SET_PDEATHSIG.
* A failed job raises :class:`LaunchError` carrying the command, the exit code and the end of the
  log, with torchrun's own traceback and report cut out, so the failing rank's traceback shows.
* The whole output is kept in a log file (``launch.log`` in the run's output folder by default).
"""

from __future__ import annotations

import codecs
import json
import math
import os
import queue
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

__all__ = [
    "LaunchError",
    "LaunchResult",
    "args_to_flags",
    "module_command",
    "run_module",
    "run_torchrun",
    "torchrun_command",
]

# Flags naming the run's output folder (where metrics.jsonl is and launch.log goes by default).
OUT_DIR_FLAGS = ("--out", "--out-dir", "--out_dir", "--output", "--output-dir", "--output_dir")
STEPS_FLAGS = ("--steps", "--total-steps", "--total_steps", "--max-steps", "--max_steps")
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "launch.log"
PLOT_MIN_INTERVAL_S = 0.5  # live figure: at most 2 redraws a second...
PLOT_MAX_LOAD = 0.1  # ...and at most 10% of the time spent drawing
REDRAW_INTERVAL_S = 1.0  # the job's own progress-bar redraws are echoed at most once a second
POLL_S = 0.1

# Run a command with PR_SET_PDEATHSIG set, so it gets SIGTERM when the launching thread dies
# (a notebook kernel killed by a restart). The setting survives exec; pid and group stay the same.
_EXEC_WITH_PARENT_DEATH_SIGNAL = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"  # 1 = PR_SET_PDEATHSIG
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"  # the launcher died before prctl
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class LaunchError(RuntimeError):
    """A launched job exited with a non-zero code. The message holds the command, the exit code
    and the end of the job's log; the attributes hold the same pieces."""

    def __init__(self, message: str, command: list[str], returncode: int, log_path: Path, tail: str):
        super().__init__(message)
        self.command, self.returncode, self.log_path, self.tail = command, returncode, log_path, tail


@dataclass
class LaunchResult:
    """What a finished job left: its exit code, wall time, log and metrics."""

    returncode: int
    seconds: float
    log_path: Path
    metrics: list[dict]  # the metrics records this run appended, in file order
    summary: str  # the job's last non-empty output line (its one-line summary)
    command: list[str] = field(default_factory=list)
    metrics_path: Path | None = None

    def losses(self) -> tuple[list[float], list[float]]:
        """(steps, losses) of the records that have both, ready for plotting."""
        points = [(r["step"], r["loss"]) for r in self.metrics if _is_number(r.get("step")) and _is_number(r.get("loss"))]
        return [s for s, _ in points], [v for _, v in points]


# ------------------------------------------------------------------------------ commands


def args_to_flags(args: Mapping) -> list[str]:
    """``{"out": "runs/a", "batch_size": 8, "resume": True, "seed": None}`` ->
    ``["--out", "runs/a", "--batch-size", "8", "--resume"]``.

    Underscores become dashes; True is a bare flag; False, None and empty lists are left out;
    a list or tuple gives one flag followed by all its items.
    """
    flags: list[str] = []
    for key, value in args.items():
        if not isinstance(key, str) or not key.strip("-"):
            raise TypeError(f"args: flag names must be non-empty strings, got {key!r}")
        flag = key if key.startswith("-") else "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            if value:
                flags += [flag, *(_flag_value(key, v) for v in value)]
        else:
            flags += [flag, _flag_value(key, value)]
    return flags


def _flag_value(key: str, value) -> str:
    if isinstance(value, (str, int, float, os.PathLike)) and not isinstance(value, bool):
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    raise TypeError(f"args[{key!r}]: expected a string, number, path, bool, None or a list of those, "
                    f"got {type(value).__name__} {value!r}")


def _args_list(args) -> list[str]:
    if args is None:
        return []
    if isinstance(args, Mapping):
        return args_to_flags(args)
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise TypeError(f"args: expected a list of strings or a dict of flags, got {type(args).__name__} {args!r}")
    out = []
    for i, item in enumerate(args):
        if isinstance(item, bool) or not isinstance(item, (str, int, float, os.PathLike)):
            raise TypeError(f"args[{i}]: expected a string, number or path, got {type(item).__name__} {item!r}")
        out.append(os.fspath(item) if isinstance(item, os.PathLike) else str(item))
    return out


def _check_module(module: str) -> None:
    if not isinstance(module, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module):
        raise ValueError(f"module: expected a dotted module name like 'minimind_v.train.clip', got {module!r}")


def module_command(module: str, args=None) -> list[str]:
    """``python -m <module> <args>`` with this interpreter."""
    _check_module(module)
    return [sys.executable, "-m", module, *_args_list(args)]


def torchrun_command(module: str, args=None, nproc: int = 1) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m <module> <args>``.

    ``--standalone`` runs a private rendezvous on a free port, so jobs never clash on a port.
    """
    _check_module(module)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc: expected a positive number of processes, got {nproc!r}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", module, *_args_list(args)]


def _find_flag(argv: list[str], names: Sequence[str]) -> str | None:
    """The value of the last ``--name value`` or ``--name=value`` in argv."""
    found = None
    for i, item in enumerate(argv):
        for name in names:
            if item == name and i + 1 < len(argv):
                found = argv[i + 1]
            elif item.startswith(name + "="):
                found = item[len(name) + 1 :]
    return found


# ------------------------------------------------------------------------------ public entry points


def run_torchrun(
    module: str,
    args: list[str] | dict | None = None,
    nproc: int = 1,
    metrics_path: str | os.PathLike | None = None,
    plot: bool = True,
    progress: bool = True,
    env: Mapping[str, str | None] | None = None,
    log_path: str | os.PathLike | None = None,
    tail_lines: int = 40,
    *,
    plot_path: str | os.PathLike | None = None,
    total_steps: int | None = None,
    cwd: str | os.PathLike | None = None,
    echo: bool = True,
    stop_timeouts: tuple[float, float] = (5.0, 3.0),
    use_torchrun: bool = True,
) -> LaunchResult:
    """Run ``module`` under torchrun with ``nproc`` processes and wait for it, showing progress.

    module: the entry point, e.g. "minimind_v.train.clip".
    args: its command-line arguments, as a list or as a dict (see :func:`args_to_flags`).
    nproc: processes on this machine (one per GPU; on CPU, each gets cores // nproc threads).
    metrics_path: the JSON-lines file rank 0 appends to; default ``<out>/metrics.jsonl`` when the
        args name an output folder (``--out`` and the like), else none is followed.
    plot: in Jupyter, a loss curve redrawn in place while the job runs (no window otherwise).
    progress: a progress bar over steps (total from a ``{"total_steps": N}`` record or ``--steps``).
    env: extra environment variables for the job (None removes one). OMP_NUM_THREADS defaults to
        max(1, cores // nproc), so processes x threads never exceeds the cores.
    log_path: where the whole output goes; default ``<out>/launch.log``, else next to the
        metrics file, else a temporary file.
    tail_lines: how many log lines a :class:`LaunchError` quotes.
    plot_path: also save the final loss curve there (any format matplotlib knows).
    total_steps: the bar's total, overriding the one the job reports.
    cwd: the job's working directory (default: this process's).
    echo: stream the job's output (stdout and stderr, in the order written) to sys.stdout.
    stop_timeouts: seconds to wait after SIGINT and after SIGTERM before the next signal.
    use_torchrun: False runs one plain ``python -m <module>`` process instead (see :func:`run_module`).

    Returns a :class:`LaunchResult`; raises :class:`LaunchError` if the job fails, and
    KeyboardInterrupt (after stopping every process of the job) if interrupted.
    """
    command = torchrun_command(module, args, nproc) if use_torchrun else module_command(module, args)
    return _run(command, module, nproc, _args_list(args), metrics_path=metrics_path, plot=plot, progress=progress, env=env,
                log_path=log_path, tail_lines=tail_lines, plot_path=plot_path, total_steps=total_steps,
                cwd=cwd, echo=echo, stop_timeouts=stop_timeouts)


def run_module(module: str, args: list[str] | dict | None = None, **options) -> LaunchResult:
    """Like :func:`run_torchrun` (same options), but one plain ``python -m <module>`` process."""
    return run_torchrun(module, args, nproc=1, use_torchrun=False, **options)


# ------------------------------------------------------------------------------ the run


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (where output goes to the cell and figures are displayed)."""
    ipython_module = sys.modules.get("IPython")  # a kernel has always imported it already
    if ipython_module is None:
        return False
    shell = ipython_module.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _child_env(env: Mapping[str, str | None] | None, nproc: int, tag: str | None = None) -> dict[str, str]:
    merged = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    # Oversubscribed cores make every process wait on the others (and silence torchrun's warning).
    merged.setdefault("OMP_NUM_THREADS", str(max(1, _available_cores() // nproc)))
    merged.setdefault("PYTHONUNBUFFERED", "1")  # lines arrive as they are printed
    # A kernel exports its inline backend; a child is no kernel, so it draws with Agg.
    if merged.get("MPLBACKEND", "").startswith("module://matplotlib_inline"):
        merged["MPLBACKEND"] = "Agg"
    if tag is not None:  # inherited by every process of the job (see _job_processes)
        merged[LAUNCH_TAG_VAR] = ":".join(filter(None, (merged.get(LAUNCH_TAG_VAR), tag)))
    return merged


def _default_paths(argv: list[str], metrics_path, log_path, cwd) -> tuple[Path | None, Path]:
    base = Path(cwd) if cwd is not None else Path.cwd()
    out = _find_flag(argv, OUT_DIR_FLAGS)
    out_dir = base / out if out is not None else None
    if metrics_path is not None:
        metrics = Path(metrics_path)
    else:
        metrics = out_dir / METRICS_FILE if out_dir is not None else None
    if log_path is not None:
        log = Path(log_path)
    elif out_dir is not None:
        log = out_dir / LOG_FILE
    elif metrics is not None:
        log = metrics.parent / LOG_FILE
    else:
        fd, name = tempfile.mkstemp(prefix="launch-", suffix=".log")
        os.close(fd)
        log = Path(name)
    return metrics, log


def _run(command, module, nproc, argv, *, metrics_path, plot, progress, env, log_path, tail_lines, plot_path,
         total_steps, cwd, echo, stop_timeouts) -> LaunchResult:
    if isinstance(tail_lines, bool) or not isinstance(tail_lines, int) or tail_lines < 0:
        raise ValueError(f"tail_lines: expected a number >= 0, got {tail_lines!r}")
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1):
        raise ValueError(f"total_steps: expected a positive int or None, got {total_steps!r}")
    metrics_path, log_path = _default_paths(argv, metrics_path, log_path, cwd)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    args_total = _find_flag(argv, STEPS_FLAGS)
    notebook = _in_notebook()
    name = module.rsplit(".", 1)[-1]

    follower = _MetricsFollower(metrics_path) if metrics_path is not None else None
    bar = _StepProgress(progress, name, total_steps,
                        int(args_total) if args_total and args_total.isdigit() else None)
    curve = _LossCurve(name, live=plot and notebook)
    out = _Echo(echo, notebook, bar)

    spawn = command
    if sys.platform.startswith("linux"):
        spawn = [sys.executable, "-S", "-c", _EXEC_WITH_PARENT_DEATH_SIGNAL, str(os.getpid()), *command]
    popen_group = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt"
                   else {"start_new_session": True})

    tag = _new_tag()
    log = open(log_path, "w", encoding="utf-8")
    log.write("$ " + shlex.join(command) + "\n")
    log.flush()
    events: queue.Queue = queue.Queue()
    start = time.monotonic()
    try:
        # One pipe for stdout and stderr keeps their lines in the order they were written.
        proc = subprocess.Popen(spawn, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=_child_env(env, nproc, tag), cwd=cwd, **popen_group)
    except BaseException:
        log.close()
        raise
    lock = threading.Lock()
    reader = _OutputReader(proc.stdout, events, log, lock)

    def take(records):
        for record in records:
            bar.add(record)
            curve.add(record)
        curve.total = bar.total

    try:
        exited_at = None
        while True:
            _pump(events, out, timeout=POLL_S)
            out.tick()
            if follower is not None:
                take(follower.poll())
            curve.show()
            if proc.poll() is not None:
                if not reader.is_alive():
                    break
                exited_at = exited_at or time.monotonic()
                waited = time.monotonic() - exited_at
                if waited > 2.0 and _group_alive(proc, tag):
                    # The job is gone but something it started still holds its output open.
                    _stop_process_group(proc, (0.0, 1.0), tag, interrupt=False)
                elif waited > 4.0:
                    break  # held open from outside the job: stop reading
        _pump(events, out, timeout=0)
        # Leftovers of a finished (or failed) job go with it: a failed worker's child, a
        # DataLoader worker, anything that left the group.
        if _group_alive(proc, tag) and not _stop_process_group(proc, (0.0, 1.0), tag, interrupt=False):
            note = f"{name}: the job has ended, but {_leftovers(proc, tag)}"
            with lock:
                if not log.closed:
                    log.write(f"# {note}\n")
            warnings.warn(note, RuntimeWarning, stacklevel=3)
    except BaseException as exc:  # KeyboardInterrupt (the notebook's stop button) above all
        stopped = _stop_process_group(proc, stop_timeouts, tag)
        reader.join(timeout=2.0)
        _pump(events, out, timeout=0)
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"stopped by {type(exc).__name__}"
        # Said only after checking: no process of the group, and none that left it.
        note = f"{name}: {what}; " + ("every process of the job has ended" if stopped else _leftovers(proc, tag))
        with lock:
            log.write(f"# {note}\n")
        if echo:
            print(note, file=sys.stderr, flush=True)
        raise
    finally:
        reader.join(timeout=2.0)
        with lock:
            log.close()
        seconds = time.monotonic() - start
        if follower is not None:
            take(follower.poll(final=True))
        bar.close()
        curve.show(final=True)
        if plot_path is not None:
            curve.save(plot_path)

    returncode = proc.returncode
    records = follower.records if follower is not None else []
    if returncode != 0:
        message, tail = _failure_message(module, command, returncode, log_path, tail_lines)
        raise LaunchError(message, command, returncode, log_path, tail)
    result = LaunchResult(returncode, seconds, log_path, records, reader.last_line, command, metrics_path)
    if echo:
        steps, losses = result.losses()
        last = f", loss {losses[-1]:.4g} at step {steps[-1]}" if losses else ""
        print(f"{name}: done in {seconds:.1f} s{last}; log {log_path}", flush=True)
    return result


def _pump(events: queue.Queue, out: "_Echo", timeout: float) -> None:
    """Echo every output event waiting in the queue (blocking up to `timeout` for the first)."""
    try:
        event = events.get(timeout=timeout) if timeout > 0 else events.get_nowait()
        while True:
            out.handle(*event)
            event = events.get_nowait()
    except queue.Empty:
        pass


# ------------------------------------------------------------------------------ output


def _screen(line: str) -> str:
    """What a terminal finally shows of a line: the text after its last carriage return
    (a carriage return at the end erases nothing)."""
    return line.rstrip("\r").rsplit("\r", 1)[-1]


class _OutputReader(threading.Thread):
    """Reads the job's output, writes finished lines to the log, queues lines for echoing.

    A line's progress-bar redraws ("\\r" without "\\n") are queued as ("partial", text) and only
    the line's last state reaches the log, so the log reads like the terminal looked.
    """

    def __init__(self, pipe, events: queue.Queue, log, lock: threading.Lock):
        super().__init__(daemon=True, name="launch-output")
        self.pipe, self.events, self.log, self.lock = pipe, events, log, lock
        self.last_line = ""  # last non-empty finished line
        self.start()

    def _line(self, text: str) -> None:
        with self.lock:
            if not self.log.closed:  # closed: the launcher gave up on a pipe held open elsewhere
                self.log.write(text + "\n")
                self.log.flush()
        if text.strip():
            self.last_line = text.strip()
        self.events.put(("line", text))

    def run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd, pending, shown = self.pipe.fileno(), "", None
        try:
            while True:
                data = os.read(fd, 1 << 16)
                pending += decoder.decode(data, final=not data)
                *lines, pending = pending.split("\n")
                for line in lines:
                    self._line(_screen(line))
                    shown = None
                cut = pending.rstrip("\r").rfind("\r")
                if cut >= 0:  # what came before a carriage return has been drawn over
                    pending = pending[cut + 1 :]
                screen = _screen(pending)
                if screen and screen != shown:
                    self.events.put(("partial", screen))
                    shown = screen
                if not data:
                    break
            if _screen(pending).strip():
                self._line(_screen(pending))
        finally:
            self.pipe.close()
            self.events.put(("eof", ""))


class _Echo:
    """Writes the job's output here. Finished lines go out at once. An unfinished line (a progress
    bar redrawing itself with "\\r") is shown once it has waited 0.5 s, then at most once a second,
    only on a terminal or in a notebook, and never while our own step bar is showing (two bars
    would fight over one line)."""

    def __init__(self, enabled: bool, notebook: bool, bar: "_StepProgress"):
        self.enabled, self.notebook, self.bar = enabled, notebook, bar
        self.partial: str | None = None  # the latest state of the unfinished line
        self.since: float | None = None  # when the current line started waiting for its end
        self.on_screen = False  # a redraw of the current line is shown
        self.last_redraw = 0.0

    def _write(self, text: str) -> None:
        fp = sys.stdout
        if self.bar.bar is not None and not self.notebook:
            with tqdm.external_write_mode(file=fp):  # clear our bar, write, redraw it
                fp.write(text)
                fp.flush()
        else:
            fp.write(text)
            fp.flush()

    def handle(self, kind: str, text: str) -> None:
        if not self.enabled or kind == "eof":
            return
        if kind == "partial":
            self.partial = text
            self.since = self.since or time.monotonic()
            return
        self._write(("\r" if self.on_screen else "") + text + "\n")
        self.partial, self.since, self.on_screen = None, None, False

    def tick(self) -> None:
        if not self.enabled or self.bar.bar is not None or self.partial is None:
            return
        now = time.monotonic()
        if now - self.since >= 0.5 and now - self.last_redraw >= REDRAW_INTERVAL_S and self._redraws_show():
            self._write("\r" + self.partial)
            self.partial, self.on_screen, self.last_redraw = None, True, now

    def _redraws_show(self) -> bool:
        if self.notebook:
            return True
        isatty = getattr(sys.stdout, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed stream
            return False


# ------------------------------------------------------------------------------ metrics


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _MetricsFollower:
    """Reads the records a job appends to a JSON-lines file, a little at a time.

    Records already in the file when the job starts belong to an earlier run and are skipped; a
    file that is replaced (new inode) or truncated while the job runs is read from its start.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: list[dict] = []
        self._rest = b""  # an unfinished last line, completed by the next read
        try:
            st = os.stat(self.path)
            self._inode, self._offset = st.st_ino, st.st_size
        except FileNotFoundError:
            self._inode, self._offset = None, 0

    def poll(self, final: bool = False) -> list[dict]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._inode, self._offset, self._rest = None, 0, b""
            return []
        if st.st_ino != self._inode or st.st_size < self._offset:
            self._inode, self._offset, self._rest = st.st_ino, 0, b""
        data = b""
        if st.st_size > self._offset:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read(st.st_size - self._offset)
        start = self._offset - len(self._rest)
        self._offset += len(data)
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        if final and self._rest.strip():  # the job ended without finishing its last line
            lines.append(self._rest)
            self._rest = b""
        new = []
        for line in lines:
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    new.append(record)
                else:
                    warnings.warn(f"{self.path}: the line at byte {start} is not a JSON object, skipped: "
                                  f"{line[:80]!r}", stacklevel=2)
            start += len(line) + 1
        self.records += new
        return new


class _StepProgress:
    """A tqdm bar over the job's steps, with loss, lr and throughput beside it."""

    def __init__(self, enabled: bool, desc: str, total_override: int | None, total_from_args: int | None):
        self.enabled, self.desc = enabled, desc
        self.override, self.from_metrics, self.from_args = total_override, None, total_from_args
        self.bar = None

    @property
    def total(self) -> int | None:
        return self.override or self.from_metrics or self.from_args

    def add(self, record: dict) -> None:
        if _is_number(record.get("total_steps")) and record["total_steps"] > 0:
            self.from_metrics = int(record["total_steps"])
            if self.bar is not None and self.bar.total != self.total:
                n = self.bar.n
                self.bar.reset(total=self.total)
                self.bar.update(n)
        step = record.get("step")
        if not self.enabled or not _is_number(step):
            return
        if self.bar is None:
            self.bar = tqdm(total=self.total, desc=self.desc, unit="step", dynamic_ncols=True, leave=True)
        postfix = {}
        if _is_number(record.get("loss")):
            postfix["loss"] = f"{record['loss']:.4f}"
        if _is_number(record.get("lr")):
            postfix["lr"] = f"{record['lr']:.2e}"
        if _is_number(record.get("samples_per_s")):
            postfix["samples/s"] = f"{record['samples_per_s']:.0f}"
        if "epoch" in record:
            postfix["epoch"] = record["epoch"]
        self.bar.set_postfix(postfix, refresh=False)
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)
        else:  # the same step again, or a restart from an earlier one
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _LossCurve:
    """Loss against step, drawn off-screen with matplotlib's Agg renderer. In Jupyter the image is
    displayed once and then replaced in place; nowhere does a window open."""

    def __init__(self, title: str, live: bool):
        self.title, self.live = title, live
        self.series: dict[str, tuple[list, list]] = {}  # "loss", "val_loss", ... -> (steps, values)
        self.total: int | None = None
        self.handle = None
        self.dirty, self.next_draw = False, 0.0

    def add(self, record: dict) -> None:
        if not _is_number(record.get("step")):
            return
        for key, value in record.items():
            if key.endswith("loss") and _is_number(value):
                steps, values = self.series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(value)
                self.dirty = True

    def figure(self):
        from matplotlib.figure import Figure  # no pyplot: no window, nothing shown behind our back

        fig = Figure(figsize=(6.4, 3.2), dpi=100, layout="constrained")
        ax = fig.subplots()
        for key, (steps, values) in self.series.items():
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=key)
        if self.total:
            ax.set_xlim(0, self.total)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(self.title)
        ax.grid(alpha=0.3)
        if len(self.series) > 1:
            ax.legend()
        return fig

    def show(self, final: bool = False) -> None:
        if not self.live or not self.dirty or (not final and time.monotonic() < self.next_draw):
            return
        import io

        from IPython.display import Image, display

        t0 = time.monotonic()
        buf = io.BytesIO()
        self.figure().savefig(buf, format="png")
        image = Image(data=buf.getvalue(), format="png")
        if self.handle is None:
            self.handle = display(image, display_id=True)
        else:
            self.handle.update(image)
        spent = time.monotonic() - t0
        self.next_draw = time.monotonic() + max(PLOT_MIN_INTERVAL_S, spent / PLOT_MAX_LOAD)
        self.dirty = False

    def save(self, path) -> None:
        if self.series:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.figure().savefig(path)


# ------------------------------------------------------------------------------ stopping


# Every process a job starts inherits this variable, holding the job's tag (colon-separated, so a
# job launched from inside a job carries both tags). torchrun starts each worker in a session of
# its own (setsid), outside the job's process group, and a worker's child that outlives it is
# re-parented to init: the tag is how the launcher still finds them.
LAUNCH_TAG_VAR = "MINIMIND_V_LAUNCH_TAGS"


def _new_tag() -> str:
    return f"{os.getpid()}-{secrets.token_hex(8)}"


def _read_stat(pid: str) -> tuple[bytes, int, int] | None:
    """(state, ppid, pgrp) of a process from /proc, or None when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (name)": state ppid pgrp ...
        return fields[0], int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def _carries_tag(pid: int, tag: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:  # another user's process (not ours to find), or gone
        return False
    prefix = LAUNCH_TAG_VAR.encode() + b"="
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return tag.encode() in item[len(prefix):].split(b":")
    return False


def _job_processes(proc: subprocess.Popen, tag: str | None) -> dict[int, int] | None:
    """{pid: process group} of every running process of the job: its process group, the leader's
    descendants, and every process carrying the job's tag (workers that called setsid, orphans).
    Zombies don't count. None where there is no /proc to look in."""
    proc.poll()  # reap the leader, so it stops counting
    if not os.path.isdir("/proc"):
        return None
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(entry)
            if stat is not None and stat[0] not in (b"Z", b"X"):
                table[int(entry)] = stat
    found = {pid for pid, (_, _, pgrp) in table.items() if pgrp == proc.pid}
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = [proc.pid]
    while stack:  # descendants of the leader, in whatever group or session they are
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    if tag is not None:
        found |= {pid for pid in table if pid not in found and _carries_tag(pid, tag)}
    found.discard(os.getpid())  # never the launcher itself
    return {pid: table[pid][2] for pid in sorted(found) if pid in table}


def _group_alive(proc: subprocess.Popen, tag: str | None = None) -> bool:
    """Whether any process of the job still runs (zombies waiting to be reaped don't count)."""
    proc.poll()
    if os.name == "nt":
        return proc.returncode is None
    processes = _job_processes(proc, tag)
    if processes is not None:
        return bool(processes)
    try:  # no /proc (macOS): the process group is all we can see
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(proc: subprocess.Popen, sig: int, tag: str | None = None) -> None:
    """``sig`` to the job's process group, and to each process of the job outside it."""
    if os.name == "nt":
        try:
            if sig == signal.SIGINT:
                proc.send_signal(signal.CTRL_BREAK_EVENT)
            elif sig == signal.SIGTERM:
                proc.terminate()
            else:
                proc.kill()
        except OSError:
            pass
        return
    try:
        os.killpg(proc.pid, sig)
    except OSError:  # the group is empty (or gone)
        pass
    for pid, pgrp in (_job_processes(proc, tag) or {}).items():
        if pgrp != proc.pid:  # group members had theirs; one signal each, not two
            try:
                os.kill(pid, sig)
            except OSError:
                pass


def _stop_process_group(proc: subprocess.Popen, timeouts: tuple[float, float], tag: str | None = None,
                        interrupt: bool = True) -> bool:
    """SIGINT, then SIGTERM, then SIGKILL to every process of the job (its group, and the
    processes that left it: see :func:`_job_processes`), each after the previous one had its
    time. A second Ctrl-C (or stop button) skips straight to SIGKILL. True only when it has
    checked that none is left. ``interrupt=False`` starts at SIGTERM (leftovers of a job that has
    ended: no KeyboardInterrupt traceback from them in its output)."""
    kill = getattr(signal, "SIGKILL", signal.SIGTERM)
    plan = [(signal.SIGINT, timeouts[0]), (signal.SIGTERM, timeouts[1]), (kill, 5.0)][0 if interrupt else 1:]
    i = 0
    while i < len(plan):
        sig, wait = plan[i]
        if not _group_alive(proc, tag):
            return True
        _signal_group(proc, sig, tag)
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                if not _group_alive(proc, tag):
                    return True
                time.sleep(0.05)
        except KeyboardInterrupt:
            if sig == kill:
                break
            i = len(plan) - 1  # impatient: kill now
            continue
        i += 1
    return not _group_alive(proc, tag)


def _leftovers(proc: subprocess.Popen, tag: str | None) -> str:
    processes = _job_processes(proc, tag)
    return (f"processes {sorted(processes)} of the job" if processes
            else f"processes of group {proc.pid}") + " may still be running"


# ------------------------------------------------------------------------------ failure report

_TRACEBACK = re.compile(r"^(\[\w+\]:\s*)?Traceback \(most recent call last\):")
_LAUNCHER_FRAME = re.compile(r"torch[\\/]distributed[\\/]run\.py")


def _read_tail(path: Path, max_bytes: int = 1 << 20) -> list[str]:
    """The log's last lines (at most `max_bytes` of them), without the command header."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - max_bytes))
        text = f.read().decode("utf-8", errors="replace")
    lines = text.splitlines()
    if size > max_bytes:
        lines = lines[1:]  # the first one was cut
    elif lines and lines[0].startswith("$ "):
        lines = lines[1:]
    return lines


def _launcher_report(lines: list[str]) -> tuple[int | None, str | None]:
    """Where torchrun's own traceback starts in `lines` (None if it is not there), and its root
    cause (failing rank and exit code) when its report names one."""
    start = None
    for i, line in enumerate(lines):
        if _TRACEBACK.match(line) and any(_LAUNCHER_FRAME.search(l) for l in lines[i + 1 : i + 12]):
            start = i
    if start is None:
        return None, None
    report, cause = lines[start:], {}
    for i, line in enumerate(report):
        if line.startswith("Root Cause"):
            for later in report[i + 1 : i + 10]:
                m = re.match(r"^\s*(rank|exitcode)\s*:\s*(.*?)\s*$", later)
                if m and m.group(1) not in cause:
                    cause[m.group(1)] = m.group(2)
    root = ", ".join(f"{k} {cause[k]}" for k in ("rank", "exitcode") if k in cause) or None
    return start, root


def _failure_message(module, command, returncode, log_path, tail_lines) -> tuple[str, str]:
    lines = _read_tail(log_path)
    cut, root = _launcher_report(lines)
    if cut is not None:
        lines = lines[:cut]
    tail = "\n".join(lines[-tail_lines:] if tail_lines else [])
    how = f"exit code {returncode}"
    if returncode < 0:
        try:
            how += f" (killed by {signal.Signals(-returncode).name})"
        except ValueError:
            pass
    header = f"{module} failed with {how}" + (f"; first failure: {root}" if root else "")
    note = " (torchrun's own traceback and report are left out; they are in the log)" if cut is not None else ""
    message = (f"{header}\n  command: {shlex.join(command)}\n  log: {log_path}\n"
               f"--- last {min(tail_lines, len(lines))} lines of the output{note} ---\n{tail}")
    return message, tail
