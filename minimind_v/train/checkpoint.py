"""Checkpoints and resuming: what a run leaves in its folder, and how the next run starts from it.

* ``checkpoint.pt`` holds the weights, the optimizer, the step and the settings that decide the
  result (`write_checkpoint`, atomically). It holds only tensors and plain values and is read with
  ``torch.load(weights_only=True)`` (`read_checkpoint`): a checkpoint file can never run code.
* `start_state` decides how a run starts, before anything is written: a folder holding an earlier
  run is refused unless ``resume`` (continue it) or ``overwrite`` (start again) says what to do;
  ``resume`` continues only when the settings are the same (else `ResumeMismatchError` names every
  differing flag; ``allow_inexact_resume`` continues anyway, with a warning). `restore_run` loads
  the checkpoint into the model and the optimizer.
* ``metrics.jsonl``: `prepare_out_dir` starts it afresh or cuts it back to the step resumed at
  (`kept_metrics`); `append_metrics` adds a line (:mod:`.run_folder`).
* `StepGuard`: a step that raises (a bad image, anything) first saves the last completed step, so
  ``--resume`` continues from there once the cause is fixed; under DDP a rank that stops answering
  becomes an error naming it (:mod:`.step_guard`).
* `fault_point`: where the crash tests (tests/test_faults_training.py) kill a run (:mod:`.fault_injection`).
* The errors a run refuses to start with are in :mod:`.run_errors`.

All of these are importable from here.

The loop that uses all this is `trainer.fit` (and `clip._train`, the tiny CLIP's).
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..runfiles import atomic_torch_save
from .distributed import DistInfo, is_distributed, unwrap
# Re-exported: the entry points and tests import the whole run-folder story from here.
from .fault_injection import KILL_AT_ENV, KILL_SIGNAL_ENV, fault_point  # noqa: F401
from .run_errors import (START_AGAIN, CheckpointError, MetricsError, ResumeMismatchError,  # noqa: F401
                         RunFolderError, TrainSetupError)
from .run_folder import (CHECKPOINT, METRICS, append_metrics, earlier_run_files, kept_metrics,  # noqa: F401
                         prepare_out_dir, refuse_earlier_run)
from .step_guard import StepGuard  # noqa: F401

CHECKPOINT_FORMAT = 2  # 1: the pickled checkpoints before settings were stored (no "format" key)
CHECKPOINT_KEYS = ("format", "step", "model", "optimizer", "settings")


# ----------------------------------------------------------------------------- settings


def flag_name(field_name: str) -> str:
    """The command-line flag of a TrainArgs field (or stage setting): "batch_size" -> "--batch-size"."""
    if field_name == "out_dir":
        return "--out"
    if field_name == "world_size":
        return "number of processes (world size)"
    return "--" + field_name.replace("_", "-")


_NOT_RECORDED = "(not recorded)"


def settings_differences(saved: dict, current: dict) -> dict[str, tuple]:
    """{name: (saved value, current value)} for every setting that differs, in the current order."""
    names = list(current) + [k for k in saved if k not in current]
    return {k: (saved.get(k, _NOT_RECORDED), current.get(k, _NOT_RECORDED)) for k in names
            if saved.get(k, _NOT_RECORDED) != current.get(k, _NOT_RECORDED)}


def describe_differences(differences: dict[str, tuple]) -> str:
    return "\n".join(f"  {flag_name(k)}: saved {a!r}, now {b!r}" for k, (a, b) in differences.items())


# ----------------------------------------------------------------------------- checkpoints


def _refusal_reason(err: BaseException) -> str:
    """The line of torch's weights-only refusal that says what it met (e.g. a GLOBAL it blocks)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line or "WeightsUnpickler error" in line:
            return line
    return lines[-1] if lines else type(err).__name__


def read_checkpoint(path: str | os.PathLike, map_location="cpu", required=CHECKPOINT_KEYS) -> dict:
    """A training checkpoint, loaded as data only (``torch.load(weights_only=True)``).

    Every way it can fail raises :class:`CheckpointError` naming the file: empty, truncated or
    not a checkpoint; a pickle that holds Python objects (refused: unpickling them could run code,
    and nothing of it runs); not a dict, or without the ``required`` keys (another program's file,
    or an older trainer's).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a copy or write that never finished; "
                              f"restore it, or {START_AGAIN}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {path} was refused: it is not a plain-tensor checkpoint but a pickle of Python "
            f"objects ({_refusal_reason(err)}); unpickling it could run code, so it was not loaded and "
            f"nothing in it ran. This trainer writes only tensors and plain values; {START_AGAIN}"
        ) from None
    except Exception as err:  # torch reports damage as RuntimeError, EOFError, KeyError, OSError, ...
        detail = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes) cannot be read: it is truncated, damaged or not a PyTorch "
            f"checkpoint ({type(err).__name__}: {detail}); restore it, or {START_AGAIN}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a training checkpoint "
                              f"(a dict with {list(required)}); {START_AGAIN}")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: it was written by another program or an "
                              f"older version of this trainer, which did not record its settings; {START_AGAIN}")
    if "format" in required and state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {state['format']!r}, this trainer reads "
                              f"{CHECKPOINT_FORMAT}; {START_AGAIN}")
    step = state.get("step")
    if "step" in required and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise CheckpointError(f"checkpoint {path} has step {step!r}, not a step number; {START_AGAIN}")
    for key in ("model", "optimizer", "settings"):
        if key in required and not isinstance(state[key], dict):
            raise CheckpointError(f"checkpoint {path}: {key!r} is a {type(state[key]).__name__}, not a dict; "
                                  f"{START_AGAIN}")
    return state


def write_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                     settings: dict, **extra) -> None:
    """Atomically: the weights, the optimizer, the step, the settings (and plain ``extra`` values)."""
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "step": step, "model": unwrap(model).state_dict(),
                       "optimizer": optimizer.state_dict(), "settings": settings, **extra}, path)


def load_model_state(model: torch.nn.Module, saved: dict, path: Path) -> None:
    """Load ``saved`` into ``model``, or say (naming the file) which keys and shapes do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [f"{k} saved {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in saved.items()
              if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("other shapes", shapes)):
            if items:
                parts.append(f"{len(items)} {label} ({', '.join(items[:4])}{', ...' if len(items) > 4 else ''})")
        raise CheckpointError(f"the weights in {path} do not fit this {type(model).__name__}: {'; '.join(parts)}. "
                              "Was it written with another preset, projector or model size? Pass the flags it "
                              f"was trained with, or {START_AGAIN}")
    model.load_state_dict(saved)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, path: Path) -> None:
    """Load ``saved`` into ``optimizer``, or say which trained parameters differ."""
    saved_groups = [len(g.get("params", [])) for g in saved.get("param_groups", [])]
    own_groups = [len(g["params"]) for g in optimizer.param_groups]
    problem = None
    if saved_groups != own_groups:
        problem = f"it holds parameter groups of {saved_groups} tensors, this run trains {own_groups}"
    else:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for index, state in saved.get("state", {}).items():
            if not isinstance(index, int) or not 0 <= index < len(params):
                problem = f"it has state for parameter {index!r}, this run trains {len(params)}"
                break
            for name, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != params[index].shape:
                    problem = (f"its {name} of trained tensor {index} has shape {tuple(value.shape)}, "
                               f"the parameter {tuple(params[index].shape)}")
                    break
            if problem:
                break
    if problem:
        raise CheckpointError(f"the optimizer state in {path} does not fit this run: {problem}. The set of "
                              f"trained parameters changed (--freeze?); pass the flags it was trained with, or "
                              f"{START_AGAIN}")
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"the optimizer state in {path} does not fit this run ({err}); {START_AGAIN}") from err



def start_state(out_dir: Path, settings: dict, info: DistInfo, *, resume: bool, overwrite: bool,
                allow_inexact_resume: bool, steps: int) -> tuple[dict | None, dict]:
    """Decide how a run starts in ``out_dir``, before anything in it is written.

    Returns (checkpoint or None, {setting: (saved, current)} differences accepted by
    ``allow_inexact_resume``). Raises :class:`RunFolderError` for a folder holding an earlier run
    without resume/overwrite, :class:`CheckpointError` for an unusable checkpoint, and
    :class:`ResumeMismatchError` for a checkpoint beyond ``steps`` or with other settings.
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise TrainSetupError("--resume and --overwrite exclude each other")
    refuse_earlier_run(out_dir, resume, overwrite)
    path = out_dir / CHECKPOINT
    if not resume or not path.exists():
        return None, {}
    state = read_checkpoint(path, map_location=info.device)
    saved = state["settings"]
    if state["step"] > steps:
        raise ResumeMismatchError(
            f"checkpoint {path} is at step {state['step']}, beyond --steps {steps}: resuming would relabel it. "
            f"Pass --steps {saved.get('steps', state['step'])} (the saved run's), or --overwrite to start again")
    differences = settings_differences(saved, settings)
    if differences and not allow_inexact_resume:
        raise ResumeMismatchError(
            f"cannot resume from {path}: these settings differ from the checkpoint's\n"
            f"{describe_differences(differences)}\nwith them the run would no longer repeat the uninterrupted "
            "one. Pass the saved values, or --allow-inexact-resume to continue anyway, or --overwrite to "
            "start again")
    if differences and info.is_main:
        print(f"warning: resuming {path} at step {state['step']} with other settings than it was trained with; "
              f"the run is no longer exact:\n{describe_differences(differences)}", file=sys.stderr, flush=True)
    return state, differences


def restore_run(state: dict | None, differences: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                path: Path, info: DistInfo, *, resume: bool) -> tuple[int, float, list]:
    """Load `start_state`'s checkpoint (if any) into ``model`` (unwrapped) and ``optimizer``.

    Returns (the step to start from, the loss of the last step, the inexact resumes so far,
    this one included when ``differences``). Every rank must find the same step.
    """
    start_step, loss, inexact = 0, float("nan"), []
    if state is not None:
        load_model_state(model, state["model"], path)
        load_optimizer_state(optimizer, state["optimizer"], path)
        start_step, loss = state["step"], float(state.get("loss", float("nan")))
        inexact = list(state.get("inexact_resumes", []))
        if differences:
            inexact.append({"step": start_step, "changed": {k: list(v) for k, v in differences.items()}})
    elif resume and info.is_main:
        print(f"--resume: no {CHECKPOINT} in {path.parent}; starting from step 0")
    same_on_every_rank(start_step, "the step to start from", info.device)
    return start_step, loss, inexact


def same_on_every_rank(value: int, what: str, device) -> None:
    """Check that every rank found the same ``value`` (e.g. the step it resumes at)."""
    if not is_distributed():
        return
    t = torch.tensor([value, -value], device=device, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise TrainSetupError(f"the ranks disagree on {what} ({-int(t[1])} to {int(t[0])}): the output folder "
                              "must be one folder every rank sees (a shared filesystem)")

