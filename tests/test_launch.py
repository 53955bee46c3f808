"""Launching jobs: output, metrics and progress, failures, interrupts and leftovers, checked on
throwaway job modules written into a temporary folder (put on the child's PYTHONPATH)."""

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

import minimind_v.launch as launch
from minimind_v.launch import LaunchError, run_torchrun

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
# In a fresh process: the launcher without the package's __init__ (which loads transformers: seconds).
IMPORT_LAUNCH = (f"import sys, types; sys.modules['minimind_v'] = package = types.ModuleType('minimind_v'); "
                 f"package.__path__ = [{str(Path(launch.__file__).parent)!r}]; import minimind_v.launch as launch\n")

# Writes metrics like a training stage (a {"total_steps"} line, then one line per step), keeps its
# own copy of what it wrote, shows a tqdm bar on stderr and ends with a summary on stdout.
METRICS_JOB = '''
import argparse, json, os, time
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
    rec = {"step": i + 1, "loss": round(3.0 / (i + 1), 4)}
    records.append(rec)
    with open(metrics, "a") as f:
        f.write(json.dumps(rec) + "\\n")
(out / "written.json").write_text(json.dumps(records))
(out / "env.json").write_text(json.dumps({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}))
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

# Starts a child, writes both pids, then sleeps.
SLEEPING_JOB = '''
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
pids = os.environ["PIDS_FILE"]
with open(pids + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.replace(pids + ".tmp", pids)
time.sleep(300)
'''

# A torchrun worker (in a session of its own, as torchrun starts it) that starts a child, writes
# both pids and its session, then either ignores SIGINT and SIGTERM and sleeps, child too
# (--stubborn), or fails (--fail), leaving its sleeping child behind.
WORKER_JOB = '''
import os, signal, subprocess, sys, time
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

# Two ranks: each records what torchrun told it and the result of a gloo all_reduce.
DDP_JOB = '''
import json, os, sys
from pathlib import Path
import torch, torch.distributed as dist
out = Path(sys.argv[sys.argv.index("--out") + 1])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
(out / f"rank{rank}.json").write_text(json.dumps({
    "rank": rank, "world_size": world, "sum": t.item(), "omp": int(os.environ["OMP_NUM_THREADS"])}))
if rank == 0:
    with open(out / "metrics.jsonl", "a") as f:
        for step in (1, 2):
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\\n")
dist.barrier()
dist.destroy_process_group()
if rank == 0:
    print(f"ddp ok: world {world}, sum {t.item():g}", flush=True)
'''


@pytest.fixture
def jobs(tmp_path):
    """Job modules in tmp_path/jobs, and the environment that lets a child import them."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    for name, code in [("metrics_job", METRICS_JOB), ("failing_job", FAILING_JOB), ("sigkilled_job", SIGKILLED_JOB),
                       ("sleeping_job", SLEEPING_JOB), ("worker_job", WORKER_JOB), ("ddp_job", DDP_JOB)]:
        (folder / f"{name}.py").write_text(textwrap.dedent(code))
    return folder, {"PYTHONPATH": str(folder)}


def alive(pid: int) -> bool:
    """Running (a zombie nobody has reaped yet counts as gone)."""
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


def kill_leftovers(pids_file: Path) -> None:
    """Test cleanup: whatever the launcher left running, by pid."""
    if pids_file.exists():
        for pid in (int(p) for p in pids_file.read_text().split()):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc"), reason="the tests look for processes in /proc")


# ----------------------------------------------------------------------------- a job that works


@pytest.mark.parametrize("replace", [False, True], ids=["appends", "replaces-file"])
def test_job_output_metrics_and_progress(jobs, tmp_path, capsys, replace):
    folder, env = jobs
    out = tmp_path / "run"
    out.mkdir()
    # An earlier run's metrics: more bytes than this run writes, so a replaced file is noticed.
    stale = [{"step": 100 + i, "loss": 9.9} for i in range(40)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    args = ["--out", out, "--steps", 6] + (["--replace"] if replace else [])

    result = run_torchrun("metrics_job", args, use_torchrun=False, env=env)

    assert result.returncode == 0
    assert result.metrics == json.loads((out / "written.json").read_text())  # this run's records only
    assert result.seconds >= 6 * 0.05
    assert result.command == [sys.executable, "-m", "metrics_job", *map(str, args)]
    assert 1 <= int(json.loads((out / "env.json").read_text())["OMP_NUM_THREADS"]) <= CORES

    assert result.log_path == out / "launch.log"  # the output folder, from --out
    log = result.log_path.read_bytes().decode()  # as written: no newline translation
    assert log.splitlines()[0] == "$ " + shlex.join(result.command)
    assert "starting\n" in log and "done 6 steps\n" in log
    assert "\r" not in log and re.search(r"inner: 100%.*6/6", log)  # only the job's bar's last state

    captured = capsys.readouterr()
    assert "starting\n" in captured.out and "done 6 steps\n" in captured.out  # streamed
    assert re.search(r"metrics_job: 100%.*6/6.*loss=0\.5000", captured.err)  # our bar, from the metrics


@pytest.mark.slow
def test_torchrun_two_processes(jobs, tmp_path):
    folder, env = jobs
    out = tmp_path / "ddp"
    out.mkdir()
    result = run_torchrun("ddp_job", ["--out", out], nproc=2, env=env, plot=False, echo=False)
    for rank in range(2):
        info = json.loads((out / f"rank{rank}.json").read_text())
        assert (info["rank"], info["world_size"], info["sum"]) == (rank, 2, 1 + 2)
        assert 1 <= info["omp"] and info["omp"] * 2 <= max(CORES, 2)  # processes x threads <= cores
    assert "ddp ok: world 2, sum 3" in result.log_path.read_text()
    assert [(r["step"], r["loss"]) for r in result.metrics] == [(1, 1.0), (2, 0.5)]


# ----------------------------------------------------------------------------- failures


def test_failing_job_raises_with_the_end_of_its_output(jobs):
    folder, env = jobs
    with pytest.raises(LaunchError) as info:
        run_torchrun("failing_job", ["--flag", "value"], use_torchrun=False, env=env, tail_lines=12, echo=False)
    err, message = info.value, str(info.value)
    assert err.returncode == 1
    assert "failing_job failed with exit code 1" in message
    assert shlex.join([sys.executable, "-m", "failing_job", "--flag", "value"]) in message
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
        run_torchrun("sigkilled_job", use_torchrun=False, env=env, echo=False, log_path=tmp_path / "launch.log")


@needs_proc
@pytest.mark.slow
def test_failed_workers_child_is_gone_when_the_launcher_raises(jobs, tmp_path):
    """The worker fails; its child, in the worker's session, is no process of torchrun's that
    torchrun would stop, and holds the output pipe open. The launcher must stop it and raise."""
    folder, env = jobs
    pids_file = tmp_path / "pids"
    try:
        with pytest.raises(LaunchError) as info:
            run_torchrun("worker_job", ["--fail"], env={**env, "PIDS_FILE": str(pids_file)}, plot=False, echo=False,
                         log_path=tmp_path / "launch.log")
        worker, child, session = (int(p) for p in pids_file.read_text().split())
        assert session == worker and not alive(worker)
        assert not alive(child), f"the failed worker's child {child} outlived the job"
        # The worker's traceback shows; torchrun's own traceback and report are left in the log.
        assert "ValueError: worker-failed-5521" in str(info.value)
        assert "ChildFailedError" not in str(info.value)
        assert "ChildFailedError" in (tmp_path / "launch.log").read_text()
    finally:
        kill_leftovers(pids_file)


# ----------------------------------------------------------------------------- interrupts


@needs_proc
@pytest.mark.slow
def test_interrupt_stops_a_stubborn_worker_in_its_own_session(jobs, tmp_path):
    """The notebook's stop button: SIGINT reaches the launcher (not the job, which has a session of
    its own). torchrun starts the worker with setsid, outside the job's process group; worker and
    child ignore SIGINT and SIGTERM. Both must be gone, by pid, when the launcher says so."""
    folder, env = jobs
    pids_file = tmp_path / "pids"

    def press_stop():
        if wait_for_file(pids_file):
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)  # lands in the main thread, as in a kernel

    presser = threading.Thread(target=press_stop, daemon=True)
    presser.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_torchrun("worker_job", ["--stubborn"], env={**env, "PIDS_FILE": str(pids_file)}, plot=False,
                         echo=False, log_path=tmp_path / "launch.log", stop_timeouts=(0.5, 0.5))
        presser.join()
        worker, child, session = (int(p) for p in pids_file.read_text().split())
        assert session == worker  # the worker really led a session of its own, outside the job's group
        assert not alive(worker) and not alive(child), (worker, child)
        assert "interrupted; every process of the job has ended" in (tmp_path / "launch.log").read_text()
    finally:
        kill_leftovers(pids_file)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_job_ends_when_the_launching_process_dies(jobs, tmp_path):
    """A kernel restart kills the launcher outright; its job must not run on."""
    folder, env = jobs
    pids_file = tmp_path / "pids"
    code = IMPORT_LAUNCH + (f"launch.run_torchrun('sleeping_job', use_torchrun=False, echo=False, "
                            f"env={{**{env!r}, 'PIDS_FILE': {str(pids_file)!r}}}, log_path={str(tmp_path / 'log')!r})")
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_file(pids_file), "the job never started"
        job = int(pids_file.read_text().split()[0])
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 10
        while alive(job) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(job)
    finally:
        launcher.kill()
        kill_leftovers(pids_file)  # the job's child is the job's to stop; here it's ours


# ----------------------------------------------------------------------------- in a notebook


@pytest.mark.slow
def test_in_jupyter_one_figure_is_updated_in_place(jobs, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    folder, env = jobs
    out = tmp_path / "nb_run"
    out.mkdir()
    cell = IMPORT_LAUNCH + f"""
from IPython.display import DisplayHandle
updates = []
_update = DisplayHandle.update
DisplayHandle.update = lambda self, obj, **kw: (updates.append(1), _update(self, obj, **kw))[1]
import minimind_v.live_plot; minimind_v.live_plot.PLOT_EVERY_S = 0.5
result = launch.run_torchrun("metrics_job", ["--out", {str(out)!r}, "--steps", "30"], use_torchrun=False, env={env!r})
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
    assert 1 <= int(updates) <= float(seconds) / 0.5 + 1  # redrawn while running, at most every 0.5 s
