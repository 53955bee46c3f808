"""The training loop every stage shares: data order, optimisation, DDP, checkpoints, metrics.

* Data order depends only on (seed, global step): the global batch of micro-step m is a slice of
  a seeded permutation, and each rank takes its own part of it. So one process with batch 2B and
  two processes with batch B see the same samples, and a resumed run continues exactly.
* The loss is the mean over all answer tokens of the global batch (across ranks and
  accumulation steps), not a mean of per-rank means: ranks with fewer answer tokens weigh less.
* AdamW (no decay on norms, biases and 1-D gains), linear warm-up then cosine decay, gradient
  clipping and accumulation, bf16 autocast on GPU.
* A checkpoint (weights, optimizer, step, and the settings that decide the result) is written
  atomically every ``save_every`` steps and at the end. It holds only tensors and plain values
  and is read with ``torch.load(weights_only=True)`` (`read_checkpoint`): a checkpoint file can
  never run code. ``resume=True`` continues from it only when the settings are the same (else
  `ResumeMismatchError` names every differing flag; ``allow_inexact_resume`` continues anyway,
  with a warning). Metrics go to ``metrics.jsonl``.
* A folder holding an earlier run is refused unless ``resume`` (continue it) or ``overwrite``
  (start again) says what to do with it.
* A finished run writes ``complete.json`` (`runfiles.mark_complete`) last, after the final
  checkpoint and model; every run withdraws it first. A folder without it is not finished.
* A step that raises (a bad image, anything) first saves the last completed step, so ``--resume``
  continues from there once the cause is fixed. Under DDP a rank that stops answering ends the job
  with an error naming it (see `distributed`: ``MINIMIND_V_DDP_TIMEOUT_S``).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ..runfiles import COMPLETE, atomic_torch_save, atomic_write_text, clear_complete, mark_complete
from .distributed import (DistInfo, check_in_wait_s, explain_communication_failure, is_communication_error,
                          is_distributed, ranks_not_answering, unwrap, use_step_timeout, wrap_ddp)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CHECKPOINT_FORMAT = 2  # 1: the pickled checkpoints before settings were stored (no "format" key)
CHECKPOINT_KEYS = ("format", "step", "model", "optimizer", "settings")
# TrainArgs fields that do not change the weights a run ends with: not compared on resume.
NOT_SETTINGS = ("out_dir", "resume", "overwrite", "allow_inexact_resume", "save_every", "log_every",
                "num_workers", "stop_at")
START_AGAIN = "start again with --overwrite"


# ----------------------------------------------------------------------------- fault injection

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


# ----------------------------------------------------------------------------- errors


class TrainSetupError(ValueError):
    """A run refused before its first step; the message says what is wrong and what to do."""


class CheckpointError(TrainSetupError):
    """A checkpoint file that cannot be used (unreadable, refused, incomplete, or not this model's)."""


class ResumeMismatchError(TrainSetupError):
    """``--resume`` with settings other than the checkpoint's: it would no longer be the same run."""


class RunFolderError(TrainSetupError):
    """The output folder holds an earlier run and neither --resume nor --overwrite was given."""


class MetricsError(TrainSetupError):
    """``metrics.jsonl`` is damaged before its last line."""


# ----------------------------------------------------------------------------- arguments


def value_problem(value, *, integer: bool, low=None, high=None, low_open: bool = False) -> str | None:
    """What is wrong with ``value`` (e.g. "must be >= 1, got -3"), or None when it is fine."""
    if integer:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be a whole number, got {value!r}"
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
    if low is not None and (value <= low if low_open else value < low):
        return f"must be {'>' if low_open else '>='} {low}, got {value}"
    if high is not None and value > high:
        return f"must be <= {high}, got {value}"
    return None


# The valid range of each TrainArgs value (stop_at may also be None).
LIMITS = {
    "steps": dict(integer=True, low=1), "batch_size": dict(integer=True, low=1),
    "grad_accum": dict(integer=True, low=1), "lr": dict(integer=False, low=0, low_open=True),
    "min_lr_ratio": dict(integer=False, low=0, high=1), "warmup_steps": dict(integer=True, low=0),
    "weight_decay": dict(integer=False, low=0), "grad_clip": dict(integer=False, low=0),
    "save_every": dict(integer=True, low=0), "log_every": dict(integer=True, low=1),
    "seed": dict(integer=True, low=0), "num_workers": dict(integer=True, low=0),
    "stop_at": dict(integer=True, low=1),
}


def flag_name(field_name: str) -> str:
    """The command-line flag of a TrainArgs field (or stage setting): "batch_size" -> "--batch-size"."""
    if field_name == "out_dir":
        return "--out"
    if field_name == "world_size":
        return "number of processes (world size)"
    return "--" + field_name.replace("_", "-")


@dataclass
class TrainArgs:
    out_dir: str
    steps: int = 500  # optimizer steps
    batch_size: int = 16  # samples per process per micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # 0: no clipping
    save_every: int = 0  # 0: only at the end
    log_every: int = 10
    seed: int = 0
    resume: bool = False  # continue from out_dir's checkpoint (same settings), or start at step 0 without one
    num_workers: int = 0
    stop_at: int | None = None  # end this run early at that step, as if killed (for resume tests)
    overwrite: bool = False  # start at step 0 although out_dir holds an earlier run
    allow_inexact_resume: bool = False  # with resume: continue although the settings differ

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the flag of the first value out of range."""
        if not isinstance(self.out_dir, (str, os.PathLike)) or not str(self.out_dir):
            raise ValueError(f"--out must name a folder, got {self.out_dir!r}")
        for name, limits in LIMITS.items():
            value = getattr(self, name)
            if name == "stop_at" and value is None:
                continue
            problem = value_problem(value, **limits)
            if problem:
                raise ValueError(f"{flag_name(name)} {problem}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: --resume continues the run in the "
                             "folder, --overwrite starts it again")


def run_settings(args: TrainArgs, world_size: int, stage: dict | None = None) -> dict:
    """What decides the weights a run ends with: its TrainArgs values (not out_dir, resume, overwrite,
    save_every, log_every, num_workers, stop_at), the number of processes, and the stage's own settings
    (data, model, freezing, ...). Plain values only, so a checkpoint holding them loads weights_only."""
    settings = {f.name: getattr(args, f.name) for f in fields(args) if f.name not in NOT_SETTINGS}
    settings["world_size"] = world_size
    for key, value in (stage or {}).items():
        if key in settings:
            raise ValueError(f"stage setting {key!r} clashes with a training argument")
        settings[key] = value
    return settings


_NOT_RECORDED = "(not recorded)"


def settings_differences(saved: dict, current: dict) -> dict[str, tuple]:
    """{name: (saved value, current value)} for every setting that differs, in the current order."""
    names = list(current) + [k for k in saved if k not in current]
    return {k: (saved.get(k, _NOT_RECORDED), current.get(k, _NOT_RECORDED)) for k in names
            if saved.get(k, _NOT_RECORDED) != current.get(k, _NOT_RECORDED)}


def describe_differences(differences: dict[str, tuple]) -> str:
    return "\n".join(f"  {flag_name(k)}: saved {a!r}, now {b!r}" for k, (a, b) in differences.items())


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warm-up to ``lr``, then a cosine down to ``lr * min_lr_ratio``."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class StepBatches(Sampler):
    """Index lists for this rank, one per micro-step, starting at ``start_micro_step``.

    Micro-step m's global batch is slice m of a permutation of the dataset seeded by
    (seed, epoch); rank r takes rows [r*B, (r+1)*B) of it. Last partial batches are dropped so
    every rank takes the same number of steps.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start_micro_step: int, n_micro_steps: int):
        self.n, self.B, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.start, self.count = seed, start_micro_step, n_micro_steps
        self.per_epoch = n // (batch_size * world_size)
        if self.per_epoch == 0:
            raise ValueError(f"dataset of {n} samples is smaller than one global batch "
                             f"({batch_size} x {world_size} processes)")

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        G, perm, perm_epoch = self.B * self.world, None, None
        for m in range(self.start, self.start + self.count):
            epoch, within = divmod(m, self.per_epoch)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                perm, perm_epoch = torch.randperm(self.n, generator=g), epoch
            lo = within * G + self.rank * self.B
            yield perm[lo : lo + self.B].tolist()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms' gains, biases and scalars (like CLIP's logit scale) are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


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


def earlier_run_files(out_dir: Path) -> list[str]:
    return [name for name in (CHECKPOINT, METRICS, COMPLETE) if (out_dir / name).exists()]


def refuse_earlier_run(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Raise :class:`RunFolderError` when ``out_dir`` holds an earlier run and neither ``resume`` nor
    ``overwrite`` says what to do with it (entry points call it first, before any slow loading)."""
    if not resume and not overwrite:
        found = earlier_run_files(Path(out_dir))
        if found:
            raise RunFolderError(f"{out_dir} already holds {', '.join(found)} from an earlier run: pass --resume "
                                 "to continue or --overwrite to start again")


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


def kept_metrics(path: Path, step: int) -> list[str]:
    """The lines of ``metrics.jsonl`` a run resumed at ``step`` keeps: records of steps up to
    ``step`` and records without a step (the header), not the summaries of earlier runs.

    A torn last line (a write cut short by a kill) is dropped; damage before it raises
    :class:`MetricsError` naming the file and line.
    """
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    body, last = lines[:-1], lines[-1]  # last is "" when the file ends with a newline, as it should
    kept = []
    for number, line in enumerate(body + ([last] if last else []), 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as err:
            if number == len(body) + 1:  # the unterminated last line: torn by a kill
                print(f"note: dropped the torn last line of {path} (line {number})", file=sys.stderr, flush=True)
                break
            raise MetricsError(f"{path} line {number} is not a JSON record ({err}): {line[:80]!r}; the file is "
                               f"damaged before its end: repair or delete that line, or {START_AGAIN}") from None
        if "summary" in record or record.get("step", 0) > step:
            continue
        kept.append(line)
    return kept


def prepare_out_dir(out_dir: Path, start_step: int, header: dict) -> None:
    """Before a run writes anything (rank 0): withdraw the completion mark, drop temporary files of
    killed writes, and start ``metrics.jsonl`` afresh (step 0, with the old checkpoint deleted, so
    the folder holds this run only) or cut it back to ``start_step``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_complete(out_dir)
    for stale in out_dir.glob(f"{CHECKPOINT}.*.tmp"):
        stale.unlink(missing_ok=True)
    metrics = out_dir / METRICS
    if start_step == 0:
        (out_dir / CHECKPOINT).unlink(missing_ok=True)
        atomic_write_text(metrics, json.dumps(header) + "\n")
    else:
        lines = kept_metrics(metrics, start_step) + [json.dumps({"resumed_at_step": start_step, **header})]
        atomic_write_text(metrics, "".join(line + "\n" for line in lines))


def append_metrics(out_dir: Path, record: dict) -> None:
    with open(out_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _sum_all_ranks(value: float, device) -> float:
    t = torch.tensor(float(value), device=device, dtype=torch.float64)
    if is_distributed():
        dist.all_reduce(t)
    return float(t)


def same_on_every_rank(value: int, what: str, device) -> None:
    """Check that every rank found the same ``value`` (e.g. the step it resumes at)."""
    if not is_distributed():
        return
    t = torch.tensor([value, -value], device=device, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise TrainSetupError(f"the ranks disagree on {what} ({-int(t[1])} to {int(t[0])}): the output folder "
                              "must be one folder every rank sees (a shared filesystem)")


class StepGuard:
    """Tracks the last completed optimizer step, and on a failed step saves it before the error goes on.

    ``save(step)`` writes the checkpoint. A failed collective (a rank gone or frozen) becomes a
    `RankTimeoutError` naming the ranks that stopped answering; then only rank 0 saves (the ranks
    hold the same weights). Any other error saves on the rank that raised it.
    """

    def __init__(self, save: Callable[[int], None], start_step: int, info: DistInfo, checkpoint: Path):
        self.save, self.start, self.info, self.checkpoint = save, start_step, info, checkpoint
        self.done, self.saved, self.updating = start_step, None, False

    def completed(self, step: int) -> None:
        self.done, self.updating = step, False

    def fail(self, err: Exception, step: int) -> BaseException:
        """The exception to raise for ``err`` raised in ``step`` (1-based), after saving what can be saved."""
        communication = is_distributed() and is_communication_error(err)
        if self.done >= step:  # it failed after the update (logging, saving): that step is complete
            step_words = f"after step {step} (in its {'collective' if communication else 'logging or saving'})"
        else:
            step_words = f"in step {step}"
        missing, saves = None, True
        if communication and not self.info.is_main:
            # Rank 0 saves (first thing, before torchrun may stop the job); if rank 0 is the one
            # gone, the first rank still answering does (the ranks hold the same weights).
            missing = ranks_not_answering(check_in_wait_s())
            live = [r for r in range(self.info.world_size) if r not in missing]
            saves = 0 in missing and self.info.rank == min(live)
        if self.done == self.start:
            note = (f"training stopped {step_words} ({type(err).__name__}) before any step of this run "
                    f"completed: no new checkpoint was written")
            if self.checkpoint.exists():
                note += f"; {self.checkpoint} holds the earlier one: --resume continues from it"
        elif self.updating:
            note = (f"training stopped {step_words} during the optimizer update: the weights are half "
                    f"updated, so no checkpoint was written")
        elif not saves:
            saver = "rank 0" if 0 not in missing else "another rank"
            note = f"training stopped {step_words}; {saver} saves the checkpoint"
        else:
            try:
                if self.saved != self.done:
                    self.save(self.done)
                note = (f"training stopped {step_words} ({type(err).__name__}); the last completed step, "
                        f"{self.done}, is saved in {self.checkpoint}: once the cause is fixed (e.g. the data), "
                        f"--resume continues from it")
            except Exception as save_err:
                note = f"training stopped {step_words}, and saving step {self.done} failed too: {save_err}"
        if communication:
            return explain_communication_failure(err, step_words, note, missing)
        if hasattr(err, "add_note"):
            err.add_note(note)
        else:  # Python 3.10
            print(note, file=sys.stderr, flush=True)
        return err


def fit(
    model: torch.nn.Module,
    dataset: Dataset,
    collate_fn: Callable,
    args: TrainArgs,
    info: DistInfo,
    step_loss: Callable,
    save_final: Callable[[torch.nn.Module, Path], None],
    settings: dict | None = None,
) -> dict:
    """Train ``model`` (already on ``info.device``) and save it with ``save_final(model, out_dir)``.

    ``step_loss(model, batch) -> (mean loss over the batch's target tokens, extra loss, n_targets)``
    runs one micro-batch; the extra loss (e.g. MoE balance) is added as is. ``settings``: the
    stage's own settings that decide the result (data, model, freezing, ...; plain values), stored
    in the checkpoint and compared on resume with the training arguments (see :func:`run_settings`).
    Returns a summary dict (final loss, steps, seconds, samples/s, tokens/s).
    """
    args.validate()
    out_dir = Path(args.out_dir)
    ckpt_path = out_dir / CHECKPOINT
    run = run_settings(args, info.world_size, settings)
    # Every rank decides from the same files, before rank 0 writes anything (the collective in
    # same_on_every_rank below keeps rank 0 from writing before all have looked).
    state, differences = start_state(out_dir, run, info, resume=args.resume, overwrite=args.overwrite,
                                     allow_inexact_resume=args.allow_inexact_resume, steps=args.steps)
    ddp_model = wrap_ddp(model, info, find_unused_parameters=getattr(model.config, "use_moe", False))
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.95))
    start_step, loss_value, inexact = 0, float("nan"), []
    if state is not None:
        load_model_state(model, state["model"], ckpt_path)
        load_optimizer_state(optimizer, state["optimizer"], ckpt_path)
        start_step, loss_value = state["step"], float(state.get("loss", float("nan")))
        inexact = list(state.get("inexact_resumes", []))
        if differences:
            inexact.append({"step": start_step, "changed": {k: list(v) for k, v in differences.items()}})
        del state
    elif args.resume and info.is_main:
        print(f"--resume: no {CHECKPOINT} in {out_dir}; starting from step 0")
    same_on_every_rank(start_step, "the step to start from", info.device)

    # A checkpoint past stop_at is never relabelled: stop_at only ends a run early.
    end_step = max(start_step, args.steps if args.stop_at is None else min(args.steps, args.stop_at))
    sampler = StepBatches(len(dataset), args.batch_size, info.rank, info.world_size, args.seed,
                          start_step * args.grad_accum, (end_step - start_step) * args.grad_accum)
    trainable, total = count_trainable(model)
    if info.is_main:
        prepare_out_dir(out_dir, start_step, {"total_steps": args.steps, "trainable_params": trainable,
                                              "total_params": total, "world_size": info.world_size,
                                              "args": asdict(args), "settings": run,
                                              **({"inexact_resumes": inexact} if inexact else {})})
    loader = iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                             num_workers=args.num_workers, persistent_workers=False))
    use_amp = info.device.type == "cuda" and torch.cuda.is_bf16_supported()

    def save_checkpoint(step: int) -> None:
        write_checkpoint(ckpt_path, model, optimizer, step, run, loss=loss_value, inexact_resumes=inexact)
        guard.saved = step

    guard = StepGuard(save_checkpoint, start_step, info, ckpt_path)
    bar = tqdm(total=args.steps, initial=start_step, disable=not info.is_main, desc=out_dir.name,
               dynamic_ncols=True)
    t0, samples, tokens, dropped, fallback = time.perf_counter(), 0, 0, 0, None
    # What the next metrics line averages over: losses since the last line, and throughput.
    window = {"loss": 0.0, "steps": 0, "samples": 0, "tokens": 0, "dropped": 0, "t": t0}
    model.train()
    use_step_timeout()
    step = start_step
    try:
        for step in range(start_step, end_step):
            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [next(loader) for _ in range(args.grad_accum)]
            # Normalise by the answer tokens of the whole global batch, so every token weighs the
            # same whatever the number of processes or accumulation steps.
            global_targets = _sum_all_ranks(sum(b.n_targets for b in micro), info.device)
            step_loss_sum = 0.0
            for i, batch in enumerate(micro):
                dropped += len(getattr(batch, "dropped", ()))
                sync = i == len(micro) - 1
                weight = 1
                if len(batch.ids) == 0:  # every picture in it failed when drawn (skip_bad_samples)
                    if not (sync and info.world_size > 1):
                        continue  # it adds nothing
                    if fallback is None:
                        raise RuntimeError(f"step {step + 1}: every sample of rank {info.rank}'s batch was "
                                           "dropped and it has no earlier batch to stand in")
                    # DDP needs this rank's backward to average gradients: earlier rows, weighing nothing.
                    batch, weight = fallback, 0
                fallback = batch
                batch = batch.to(info.device)
                ctx = ddp_model.no_sync() if (info.world_size > 1 and not sync) else nullcontext()
                with ctx, torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    mean_loss, extra, n = step_loss(ddp_model, batch)
                    n = n * weight
                    # DDP averages gradients over ranks; multiply by world_size to undo that.
                    objective = (mean_loss * n * info.world_size / max(global_targets, 1)
                                 + weight * extra / len(micro))
                    objective.backward()
                step_loss_sum += float(mean_loss.detach()) * n
                samples += len(batch.ids) * weight
                tokens += int(batch.attention_mask.sum()) * weight
            fault_point(f"step-{step + 1}")
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            guard.updating = True
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            guard.completed(step + 1)
            loss_value = _sum_all_ranks(step_loss_sum, info.device) / max(global_targets, 1)
            window["loss"] += loss_value
            window["steps"] += 1
            bar.update(1)
            done = step + 1
            if done % args.log_every == 0 or done == end_step:
                now = time.perf_counter()
                dt = max(now - window["t"], 1e-9)
                record = {"step": done, "loss": round(window["loss"] / window["steps"], 5), "lr": lr,
                          "samples_per_s": round((samples - window["samples"]) * info.world_size / dt, 2),
                          "tokens_per_s": round((tokens - window["tokens"]) * info.world_size / dt, 1),
                          "elapsed_s": round(now - t0, 2)}
                all_dropped = int(_sum_all_ranks(dropped, info.device))  # every rank logs at the same steps
                if all_dropped > window["dropped"]:  # samples whose picture failed when drawn (skip_bad_samples)
                    record["dropped"] = all_dropped - window["dropped"]
                if info.is_main:
                    append_metrics(out_dir, record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                    samples_s=f"{record['samples_per_s']:.0f}")
                window = {"loss": 0.0, "steps": 0, "samples": samples, "tokens": tokens,
                          "dropped": all_dropped, "t": now}
            if info.is_main and args.save_every and done % args.save_every == 0 and done < end_step:
                save_checkpoint(done)
    except Exception as err:
        bar.close()
        failure = guard.fail(err, step + 1)
        if failure is err:
            raise
        raise failure from err
    bar.close()
    seconds = time.perf_counter() - t0
    finished = end_step == args.steps
    summary = {"stage": out_dir.name, "steps": end_step,
               "final_loss": round(loss_value, 4) if math.isfinite(loss_value) else None,
               "seconds": round(seconds, 1),
               "samples_per_s": round(samples * info.world_size / max(seconds, 1e-9), 1),
               "tokens_per_s": round(tokens * info.world_size / max(seconds, 1e-9), 1),
               "trainable_params": trainable, "finished": finished,
               **({"dropped_samples": window["dropped"]} if window["dropped"] else {})}
    if info.is_main:
        # The order is what makes a kill at any point safe: checkpoint, model, then the mark.
        save_checkpoint(end_step)
        if finished:
            save_final(unwrap(model), out_dir)
        append_metrics(out_dir, {"summary": summary})
        if finished:
            mark_complete(out_dir, {"stage": out_dir.name, "summary": summary, "settings": run,
                                    "inexact_resumes": inexact})
    return summary
