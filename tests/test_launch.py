"""Launching jobs: output, metrics, progress, failures and interrupts, checked on throwaway job
modules written into a temporary folder (put on the child's PYTHONPATH)."""

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from minimind_v.launch import (
    LaunchError, _MetricsFollower, _OutputReader, args_to_flags, module_command, run_module, run_torchrun,
    torchrun_command,
)

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

# Writes metrics like a training stage (a {"total_steps"} line, then one line per step), keeps its
# own copy of what it wrote, shows a tqdm bar on stderr and ends with a summary on stdout.
METRICS_JOB = '''
import argparse, json, os, sys, time
from pathlib import Path
from tqdm import tqdm
p = argparse.ArgumentParser()
p.add_argument("--out"); p.add_argument("--steps", type=int); p.add_argument("--replace", action="store_true")
a = p.parse_args()
out = Path(a.out)
metrics = out / "metrics.jsonl"
print("starting", flush=True)
records = [{"total_steps": a.steps}]
if a.replace:  # like a stage starting afresh: the old file goes (its inode number may be reused)
    metrics.unlink(missing_ok=True)
with open(metrics, "a") as f:
    f.write(json.dumps(records[0]) + "\\n")
for i in tqdm(range(a.steps), desc="inner"):
    time.sleep(0.05)
    rec = {"step": i + 1, "loss": round(3.0 / (i + 1), 4), "lr": 1e-3, "samples_per_s": 100.0}
    records.append(rec)
    with open(metrics, "a") as f:
        f.write(json.dumps(rec) + "\\n")
(out / "written.json").write_text(json.dumps(records))
(out / "env.json").write_text(json.dumps({k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "LAUNCH_TEST_DROP")}))
print(f"done {a.steps} steps", flush=True)
'''

FAILING_JOB = '''
for i in range(100):
    print(f"noise line {i}", flush=True)
def deep_inside():
    raise RuntimeError("unique-failure-marker-4711")
deep_inside()
'''

SIGKILLED_JOB = '''
import os, signal
print("about to die", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
'''

# Starts a grandchild, writes both pids, then sleeps; with --stubborn both ignore SIGINT and SIGTERM.
SLEEPING_JOB = '''
import os, signal, subprocess, sys, time
stubborn = "--stubborn" in sys.argv
ignore = "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
if stubborn:
    exec(ignore)
child = subprocess.Popen([sys.executable, "-c", (ignore if stubborn else "") + "import time; time.sleep(300)"])
pids = os.environ["PIDS_FILE"]
with open(pids + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.replace(pids + ".tmp", pids)
print("sleeping", flush=True)
time.sleep(300)
'''

# Two ranks: each records what torchrun told it and the result of a gloo all_reduce.
DDP_JOB = '''
import json, os, sys, time
from pathlib import Path
import torch, torch.distributed as dist
out = Path(sys.argv[sys.argv.index("--out") + 1])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
(out / f"rank{rank}.json").write_text(json.dumps({
    "rank": rank, "world_size": world, "env_rank": int(os.environ["RANK"]),
    "env_world_size": int(os.environ["WORLD_SIZE"]), "sum": t.item(),
    "omp": int(os.environ["OMP_NUM_THREADS"]), "threads": torch.get_num_threads()}))
if rank == 0:
    with open(out / "metrics.jsonl", "a") as f:
        for step in (1, 2):
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\\n")
dist.barrier()
dist.destroy_process_group()
if rank == 0:
    print(f"ddp ok: world {world}, sum {t.item():g}", flush=True)
'''

# Exits at once, leaving a process in a session of its own that still holds the output pipe.
DETACHING_JOB = '''
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
with open(os.environ["PIDS_FILE"], "w") as f:
    f.write(str(child.pid))
print("left a detached child", flush=True)
'''

# Run as is, it plays torchrun: starts itself with --worker in a session of its own (as torchrun
# starts each worker) and waits. The worker starts a child, writes both pids, then either ignores
# SIGINT and SIGTERM and sleeps (--stubborn), or fails (--fail) leaving its sleeping child behind.
WORKER_JOB = '''
import os, signal, subprocess, sys, time
if "--worker" not in sys.argv:
    worker = subprocess.Popen([sys.executable, "-m", "worker_job", "--worker", *sys.argv[1:]], start_new_session=True)
    sys.exit(worker.wait())
ignore = "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
stubborn = "--stubborn" in sys.argv
if stubborn:
    exec(ignore)
child = subprocess.Popen([sys.executable, "-c", (ignore if stubborn else "") + "import time; time.sleep(300)"])
pids = os.environ["PIDS_FILE"]
with open(pids + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {child.pid} {os.getsid(0)}")
os.replace(pids + ".tmp", pids)
print("worker up", flush=True)
if "--fail" in sys.argv:
    raise ValueError("worker-failed-5521")
time.sleep(300)
'''

DDP_FAILING_JOB = '''
import os, time
rank = int(os.environ["RANK"])
print(f"rank {rank} up", flush=True)
if rank == 1:
    raise ValueError("rank-one-broke-9137")
time.sleep(30)
'''


@pytest.fixture
def jobs(tmp_path):
    """Job modules in tmp_path/jobs, and the environment that lets a child import them."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    for name, code in [("metrics_job", METRICS_JOB), ("failing_job", FAILING_JOB),
                       ("sigkilled_job", SIGKILLED_JOB), ("sleeping_job", SLEEPING_JOB),
                       ("ddp_job", DDP_JOB), ("ddp_failing_job", DDP_FAILING_JOB),
                       ("detaching_job", DETACHING_JOB), ("worker_job", WORKER_JOB)]:
        (folder / f"{name}.py").write_text(textwrap.dedent(code))
    return folder, {"PYTHONPATH": str(folder)}


def alive(pid: int) -> bool:
    """Running (a zombie nobody has reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def wait_for_file(path: Path, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ----------------------------------------------------------------------------- commands


def test_dict_args_become_flags():
    flags = args_to_flags({"out": Path("runs/a"), "batch_size": 8, "lr": 0.001, "resume": True,
                           "fast": False, "seed": None, "sizes": [1, 2], "--raw_name": "x"})
    assert flags == ["--out", "runs/a", "--batch-size", "8", "--lr", "0.001", "--resume",
                     "--sizes", "1", "2", "--raw_name", "x"]


def test_bad_args_are_named():
    with pytest.raises(TypeError, match=r"args\['extra'\].*dict"):
        args_to_flags({"extra": {"a": 1}})
    with pytest.raises(TypeError, match=r"args\[1\].*NoneType"):
        module_command("pkg.mod", ["--out", None])
    with pytest.raises(ValueError, match="nproc"):
        torchrun_command("pkg.mod", [], nproc=0)
    with pytest.raises(ValueError, match="module"):
        module_command("pkg/mod.py", [])


def test_torchrun_command_uses_this_python_and_standalone():
    assert torchrun_command("pkg.mod", {"steps": 3}, nproc=2) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "pkg.mod", "--steps", "3"]


def test_metrics_follower_reads_whole_lines_incrementally(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0, "loss": 9.0}\n')  # an earlier run's record
    follower = _MetricsFollower(path)
    with open(path, "a") as f:
        f.write('{"step": 1, "lo')
    assert follower.poll() == []  # half a line waits for its end
    with open(path, "a") as f:
        f.write('ss": 2.5}\nnot json\n{"step": 2, "loss": 2.0}\n')
    # 'not json' starts after two 25-byte lines.
    with pytest.warns(UserWarning, match=r"m\.jsonl: the line at byte 50 is not a JSON object"):
        new = follower.poll()
    assert new == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    assert follower.records == new


def read_through_pipe(chunks: list[bytes]):
    """Feed `chunks` (with pauses, so they arrive apart) to an _OutputReader; return (log, redraws)."""
    read_fd, write_fd = os.pipe()
    events = []

    class Events:  # a queue stand-in that keeps everything
        put = events.append

    log = io.StringIO()
    reader = _OutputReader(os.fdopen(read_fd, "rb", buffering=0), Events, log, threading.Lock())
    for chunk in chunks:
        os.write(write_fd, chunk)
        time.sleep(0.05)
    os.close(write_fd)
    reader.join(timeout=10)
    return log.getvalue(), [text for kind, text in events if kind == "partial"], reader.last_line


def test_output_reader_keeps_what_a_terminal_shows():
    bar = "\u2588".encode()  # a tqdm block, 3 bytes in UTF-8
    log, redraws, last = read_through_pipe([
        b"\r 10%", b"\r 50% " + bar[:2], bar[2:], b"\r100%\n",  # redraws; a character split in two
        b"windows line\r", b"\nab\rcd\n",  # "\r\n" split across reads; "ab" drawn over by "cd"
        b"summary line\n", b"no newline at the end"])
    assert log == "100%\nwindows line\ncd\nsummary line\nno newline at the end\n"
    # Half a character waits for its other half; finished lines are never redraws.
    assert redraws == [" 10%", " 50% ", " 50% \u2588", "windows line", "no newline at the end"]
    assert last == "no newline at the end"


# ----------------------------------------------------------------------------- a job that works


@pytest.mark.parametrize("replace", [False, True], ids=["appends", "replaces-file"])
def test_job_metrics_output_and_headless_progress(jobs, tmp_path, capsys, monkeypatch, replace):
    folder, env = jobs
    out = tmp_path / "run"
    out.mkdir()
    # An earlier run's metrics: more bytes than this run writes, so a replaced file is noticed.
    stale = [{"step": 100 + i, "loss": 9.9} for i in range(40)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    monkeypatch.setenv("LAUNCH_TEST_DROP", "inherited")
    plot_path = tmp_path / "loss.png"

    result = run_module("metrics_job", {"out": out, "steps": 6, "replace": replace},
                        env={**env, "LAUNCH_TEST_DROP": None}, plot_path=plot_path)

    written = json.loads((out / "written.json").read_text())
    assert result.returncode == 0
    assert result.metrics == written  # this run's records only, none of the stale ones
    assert result.metrics_path == out / "metrics.jsonl"
    assert result.losses() == ([1, 2, 3, 4, 5, 6], [r["loss"] for r in written[1:]])
    assert result.summary == "done 6 steps"
    assert result.seconds >= 6 * 0.05
    assert result.command == module_command("metrics_job", {"out": out, "steps": 6, "replace": replace})

    child_env = json.loads((out / "env.json").read_text())
    assert child_env["LAUNCH_TEST_DROP"] is None  # env=None removes a variable
    assert 1 <= int(child_env["OMP_NUM_THREADS"]) <= CORES

    assert result.log_path == out / "launch.log"  # the output folder, from --out
    log = result.log_path.read_text()
    assert log.splitlines()[0] == "$ " + shlex.join(result.command)
    assert "starting\n" in log and "done 6 steps\n" in log
    assert "\r" not in log  # only the last state of the job's progress bar
    assert re.search(r"inner: 100%.*6/6", log)

    captured = capsys.readouterr()
    assert "starting\n" in captured.out and "done 6 steps\n" in captured.out  # streamed
    assert re.search(r"metrics_job: 100%.*6/6.*loss=0\.5000", captured.err)  # our bar, from metrics
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_output_held_open_outside_the_job_does_not_hang_the_launcher(jobs, tmp_path):
    folder, env = jobs
    pids_file = tmp_path / "pids"
    started = time.monotonic()
    try:
        result = run_module("detaching_job", [], env={**env, "PIDS_FILE": str(pids_file)}, echo=False,
                            log_path=tmp_path / "launch.log")
        assert result.summary == "left a detached child"
        assert time.monotonic() - started < 30
        assert not alive(int(pids_file.read_text()))  # the job's leftover went with it
    finally:
        if pids_file.exists() and alive(int(pids_file.read_text())):
            os.kill(int(pids_file.read_text()), signal.SIGKILL)


# ----------------------------------------------------------------------------- failures


def test_failing_job_raises_with_its_traceback(jobs):
    folder, env = jobs
    with pytest.raises(LaunchError) as info:
        run_module("failing_job", ["--flag", "value"], env=env, tail_lines=12, echo=False)
    err = info.value
    message = str(err)
    assert err.returncode == 1
    assert "failing_job failed with exit code 1" in message
    assert shlex.join([sys.executable, "-m", "failing_job", "--flag", "value"]) in message
    assert "Traceback (most recent call last):" in message
    assert f'File "{folder / "failing_job.py"}", line 5, in deep_inside' in message
    assert "RuntimeError: unique-failure-marker-4711" in message
    assert "noise line 99" in message and "noise line 80" not in message  # only the last 12 lines
    assert len(err.tail.splitlines()) == 12
    log = err.log_path.read_text()  # the whole output is kept (a temporary file: no --out here)
    err.log_path.unlink()
    assert all(f"noise line {i}\n" in log for i in range(100))


def test_killed_job_names_the_signal(jobs, tmp_path):
    folder, env = jobs
    with pytest.raises(LaunchError, match=r"exit code -9 \(killed by SIGKILL\)[\s\S]*about to die"):
        run_module("sigkilled_job", [], env=env, echo=False, log_path=tmp_path / "launch.log")


# ----------------------------------------------------------------------------- interrupts


@pytest.mark.parametrize("stubborn", [False, True], ids=["cooperative", "ignores-signals"])
def test_interrupt_stops_every_process_of_the_job(jobs, tmp_path, stubborn):
    """The notebook's stop button: SIGINT reaches the launcher (not the job, which has its own
    session); the launcher must stop the job and its grandchild, then raise KeyboardInterrupt."""
    folder, env = jobs
    pids_file = tmp_path / "pids"

    def press_stop():
        if wait_for_file(pids_file):
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)  # lands in the main thread, as in a kernel

    presser = threading.Thread(target=press_stop, daemon=True)
    presser.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_module("sleeping_job", ["--stubborn"] if stubborn else [], env={**env, "PIDS_FILE": str(pids_file)},
                   echo=False, stop_timeouts=(0.5, 0.5), log_path=tmp_path / "launch.log")
    presser.join()
    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(pids) == 2
    assert not any(alive(pid) for pid in pids), pids
    if stubborn:  # SIGINT and SIGTERM were ignored, so each had its full wait before SIGKILL
        assert time.monotonic() - started >= 1.0


def kill_leftovers(pids_file: Path) -> None:
    """Test cleanup: whatever the launcher left running, by pid."""
    if pids_file.exists():
        for pid in (int(p) for p in pids_file.read_text().split()):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def launch_worker_job(torchrun: bool, flags: list[str], env: dict, tmp_path: Path, **options):
    """torchrun itself (nproc 1, the worker run directly), or the job that plays torchrun."""
    if torchrun:
        return run_torchrun("worker_job", ["--worker", *flags], nproc=1, env=env, plot=False, echo=False,
                            log_path=tmp_path / "launch.log", **options)
    return run_module("worker_job", flags, env=env, echo=False, log_path=tmp_path / "launch.log", **options)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finding processes that left the group reads /proc")
@pytest.mark.parametrize("torchrun", [False, True], ids=["own-session", "torchrun"])
def test_interrupt_stops_a_stubborn_worker_in_its_own_session(jobs, tmp_path, torchrun):
    """torchrun starts each worker with setsid: outside the job's process group. A worker (and its
    child) ignoring SIGINT and SIGTERM must still be gone, by pid, when the launcher says so."""
    folder, env = jobs
    pids_file = tmp_path / "pids"

    def press_stop():
        if wait_for_file(pids_file):
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_stop, daemon=True)
    presser.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            launch_worker_job(torchrun, ["--stubborn"], {**env, "PIDS_FILE": str(pids_file)}, tmp_path,
                              stop_timeouts=(0.5, 0.5))
        presser.join()
        worker, child, session = (int(p) for p in pids_file.read_text().split())
        assert session == worker  # the worker really led a session of its own, outside the job's group
        assert not alive(worker) and not alive(child), (worker, child)
        assert "every process of the job has ended" in (tmp_path / "launch.log").read_text()
    finally:
        kill_leftovers(pids_file)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finding processes that left the group reads /proc")
@pytest.mark.parametrize("torchrun", [False, True], ids=["own-session", "torchrun"])
def test_failed_workers_child_is_gone_when_the_launcher_raises(jobs, tmp_path, torchrun):
    folder, env = jobs
    pids_file = tmp_path / "pids"
    try:
        with pytest.raises(LaunchError, match="worker-failed-5521"):
            launch_worker_job(torchrun, ["--fail"], {**env, "PIDS_FILE": str(pids_file)}, tmp_path)
        worker, child, session = (int(p) for p in pids_file.read_text().split())
        assert session == worker and not alive(worker)
        assert not alive(child), f"the failed worker's child {child} outlived the job"
    finally:
        kill_leftovers(pids_file)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_job_ends_when_the_launching_process_dies(jobs, tmp_path):
    """A kernel restart kills the launcher outright; its job must not run on."""
    folder, env = jobs
    pids_file = tmp_path / "pids"
    code = (f"from minimind_v.launch import run_module\n"
            f"run_module('sleeping_job', [], env={{**{env!r}, 'PIDS_FILE': {str(pids_file)!r}}}, echo=False, "
            f"log_path={str(tmp_path / 'launch.log')!r})")
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job = grandchild = None
    try:
        assert wait_for_file(pids_file), "the job never started"
        job, grandchild = (int(p) for p in pids_file.read_text().split())
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 10
        while alive(job) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(job)
    finally:
        launcher.kill()
        for pid in (job, grandchild):  # the grandchild is the job's to stop; here it's ours
            if pid is not None and alive(pid):
                os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_torchrun_two_cpu_processes_all_reduce(jobs, tmp_path):
    folder, env = jobs
    out = tmp_path / "ddp"
    out.mkdir()
    result = run_torchrun("ddp_job", {"out": out}, nproc=2, env=env, plot=False, echo=False)
    assert result.returncode == 0
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r, info in enumerate(ranks):
        assert (info["rank"], info["world_size"], info["env_rank"], info["env_world_size"]) == (r, 2, r, 2)
        assert info["sum"] == 1 + 2  # every rank contributed rank + 1
        assert 1 <= info["omp"] and info["omp"] * 2 <= max(CORES, 2)  # processes x threads <= cores
    assert result.summary == "ddp ok: world 2, sum 3"
    assert result.losses() == ([1, 2], [1.0, 0.5])


@pytest.mark.slow
def test_torchrun_failure_shows_the_failing_ranks_traceback(jobs, tmp_path):
    folder, env = jobs
    out = tmp_path / "ddp_fail"
    with pytest.raises(LaunchError) as info:
        run_torchrun("ddp_failing_job", {"out": out}, nproc=2, env=env, echo=False)
    message = str(info.value)
    assert info.value.returncode != 0
    assert "first failure: rank 1" in message  # torchrun's root cause, in the first line
    assert f'File "{folder / "ddp_failing_job.py"}"' in message
    assert "ValueError: rank-one-broke-9137" in message
    assert "ChildFailedError" not in message  # torchrun's own traceback is cut from the message...
    assert "ChildFailedError" in (out / "launch.log").read_text()  # ...but kept in the log


# ----------------------------------------------------------------------------- in a notebook


@pytest.mark.slow
def test_in_jupyter_one_figure_is_updated_in_place(jobs, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    folder, env = jobs
    out = tmp_path / "nb_run"
    out.mkdir()
    cell = f"""
from IPython.display import DisplayHandle
from minimind_v.launch import run_module
updates = []
_update = DisplayHandle.update
DisplayHandle.update = lambda self, obj, **kw: (updates.append(1), _update(self, obj, **kw))[1]
result = run_module("metrics_job", {{"out": {str(out)!r}, "steps": 30}}, env={env!r})
print("UPDATES", len(updates), "SECONDS", result.seconds)
"""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
    nbclient.NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = nb.cells[0].outputs
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    stdout = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert len(images) == 1  # one figure, replaced in place
    assert len(widgets) == 1  # the step bar is a notebook widget
    assert "starting\n" in stdout and "done 30 steps\n" in stdout
    updates, seconds = re.search(r"UPDATES (\d+) SECONDS ([\d.]+)", stdout).groups()
    assert 1 <= int(updates) <= 2 * float(seconds) + 1  # redrawn while running, at most ~2 per second
    assert not any("<Figure" in o.get("data", {}).get("text/plain", "") for o in outputs)
