"""The training loop every stage shares: data order, optimisation, DDP, metrics; `fit` is the loop.

* Data order depends only on (seed, global step): the global batch of micro-step m is a slice of
  a seeded permutation, and each rank takes its own part of it. So one process with batch 2B and
  two processes with batch B see the same samples, and a resumed run continues exactly.
* The loss is the mean over all answer tokens of the global batch (across ranks and
  accumulation steps), not a mean of per-rank means: ranks with fewer answer tokens weigh less.
* AdamW (no decay on norms, biases and 1-D gains), linear warm-up then cosine decay, gradient
  clipping and accumulation; bfloat16 products where the hardware has them (`precision`).
* Checkpoints and resuming live in `checkpoint`: a checkpoint (weights, optimizer, step, and the
  settings that decide the result) is written atomically every ``save_every`` steps and at the
  end, and read as data only; ``resume=True`` continues from it only when the settings are the
  same; a folder holding an earlier run is refused unless ``resume`` or ``overwrite`` says what
  to do with it; a step that raises first saves the last completed step. Metrics go to
  ``metrics.jsonl``.
* A finished run writes ``complete.json`` (`runfiles.mark_complete`) last, after the final
  checkpoint and model; every run withdraws it first. A folder without it is not finished.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ..precision import autocast, training_precision
from ..runfiles import mark_complete
from .checkpoint import (CHECKPOINT, StepGuard, append_metrics, fault_point, flag_name, prepare_out_dir,
                         restore_run, start_state, write_checkpoint)
from .distributed import DistInfo, is_distributed, unwrap, use_step_timeout, wrap_ddp


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


# TrainArgs fields that do not change the weights a run ends with: not compared on resume.
NOT_SETTINGS = ("out_dir", "resume", "overwrite", "allow_inexact_resume", "save_every", "log_every",
                "num_workers", "stop_at")


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


# ----------------------------------------------------------------------------- optimisation


def lr_at(step: int, args: TrainArgs, *, floor_as_ratio: bool = False) -> float:
    """Linear warm-up to ``lr``, then a cosine down to ``lr * min_lr_ratio``.

    ``args``: anything with ``lr``, ``min_lr_ratio``, ``warmup_steps`` and ``steps`` (TrainArgs, the
    tiny CLIP's TrainConfig). ``floor_as_ratio`` computes the cosine part as ``lr * (min_lr_ratio +
    (1 - min_lr_ratio) * c)`` rather than ``floor + (lr - floor) * c``: the same curve, rounded
    differently (the last bit differs at about a third of the steps). The tiny CLIP was trained with
    that form and its weights depend on it bit for bit; the other stages, with this one.
    """
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    wave = 1 + math.cos(math.pi * min(1.0, progress))
    if floor_as_ratio:
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * wave)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * wave


def param_groups(model: torch.nn.Module, weight_decay: float, *, no_decay_names: tuple[str, ...] = (),
                 lr_multipliers: dict[str, float] | None = None) -> list[dict]:
    """Decay matrices only; norms' gains, biases and scalars (like CLIP's logit scale) are not decayed.

    ``no_decay_names``: parameters whose name contains one of these are not decayed either (the
    tiny CLIP's embeddings). ``lr_multipliers`` ({name ending: multiplier}): such a parameter gets a
    group of its own, without decay, after the two others; then every group has an ``lr_multiplier``
    (1.0 for the two), which the loop applies to the scheduled learning rate.
    """
    special = dict(lr_multipliers or {})
    decay, no_decay, own = [], [], {ending: [] for ending in special}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ending = next((e for e in special if name.endswith(e)), None)
        if ending is not None:
            own[ending].append(p)
        elif p.dim() >= 2 and not any(part in name for part in no_decay_names):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if special:
        groups = [{**group, "lr_multiplier": 1.0} for group in groups]
        groups += [{"params": own[e], "weight_decay": 0.0, "lr_multiplier": m} for e, m in special.items()]
    return groups


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- data order


class StepBatches(Sampler):
    """Index lists for this rank, one per micro-step, starting at ``start_micro_step``.

    Micro-step m's global batch is slice m of a permutation of the dataset seeded by
    (seed, epoch); rank r takes rows [r*B, (r+1)*B) of it. Last partial batches are dropped so
    every rank takes the same number of steps. ``first_epoch_levels`` (one number per sample)
    makes the first epoch a curriculum: its permutation sorted by level, stably, so samples of
    one level stay in random order; later epochs are random throughout.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start_micro_step: int, n_micro_steps: int, first_epoch_levels=None):
        self.n, self.B, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.start, self.count = seed, start_micro_step, n_micro_steps
        self.levels = None if first_epoch_levels is None else torch.as_tensor(first_epoch_levels)
        if self.levels is not None and self.levels.shape != (n,):
            raise ValueError(f"first_epoch_levels holds {tuple(self.levels.shape)} values for a dataset "
                             f"of {n} samples: one level per sample")
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
                if epoch == 0 and self.levels is not None:
                    perm = perm[torch.argsort(self.levels[perm], stable=True)]
            lo = within * G + self.rank * self.B
            yield perm[lo : lo + self.B].tolist()


# ----------------------------------------------------------------------------- the loop


def backward_micro_batch(model, batch, step_loss: Callable, global_targets: float, world_size: int = 1,
                         n_micro: int = 1, *, sync: bool = True, weight: int = 1,
                         precision: str = "fp32") -> tuple[float, int]:
    """Forward and backward of one micro-batch (already on the device), its gradient scaled so that
    the optimizer step follows the mean loss over every answer token of the global batch
    (``global_targets``, summed over ranks and accumulation steps). ``model`` may be DDP-wrapped;
    ``sync=False`` keeps DDP from averaging yet (an accumulation step before the last); ``weight=0``
    lets a stand-in batch take part without counting; ``precision`` "bf16" runs the forward's
    products in bfloat16 (precision.py). Returns (the batch's mean loss, its targets)."""
    ctx = model.no_sync() if (world_size > 1 and not sync) else nullcontext()
    with ctx, (autocast(batch.input_ids.device, precision) if precision != "fp32" else nullcontext()):
        mean_loss, extra, n = step_loss(model, batch)
        n = n * weight
        # DDP averages gradients over ranks; multiply by world_size to undo that.
        objective = mean_loss * n * world_size / max(global_targets, 1) + weight * extra / n_micro
        objective.backward()
    return float(mean_loss.detach()), n


def update_weights(model, optimizer, grad_clip: float, before_update: Callable = lambda: None) -> None:
    """Clip the gradient norm (0: no clipping), then one AdamW step and clear the gradients.
    ``before_update`` runs just before the weights change (the step guard notes it)."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    before_update()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def make_optimizer(model, weight_decay: float, lr: float) -> torch.optim.AdamW:
    """The AdamW every language-model stage trains with (decay on matrices only, betas 0.9/0.95)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))


def _sum_all_ranks(value: float, device) -> float:
    t = torch.tensor(float(value), device=device, dtype=torch.float64)
    if is_distributed():
        dist.all_reduce(t)
    return float(t)


def fit(
    model: torch.nn.Module,
    dataset: Dataset,
    collate_fn: Callable,
    args: TrainArgs,
    info: DistInfo,
    step_loss: Callable,
    save_final: Callable[[torch.nn.Module, Path], None],
    settings: dict | None = None,
    first_epoch_levels=None,
) -> dict:
    """Train ``model`` (already on ``info.device``) and save it with ``save_final(model, out_dir)``.

    ``step_loss(model, batch) -> (mean loss over the batch's target tokens, extra loss, n_targets)``
    runs one micro-batch; the extra loss (e.g. MoE balance) is added as is. ``settings``: the
    stage's own settings that decide the result (data, model, freezing, ...; plain values), stored
    in the checkpoint and compared on resume with the training arguments (see :func:`run_settings`).
    ``first_epoch_levels``: a curriculum for the first epoch, one level per sample (StepBatches).
    Returns a summary dict (final loss, steps, seconds, samples/s, tokens/s).
    """
    args.validate()
    out_dir = Path(args.out_dir)
    ckpt_path = out_dir / CHECKPOINT
    precision = training_precision(info.device)
    # Only bf16 is written down, so runs trained in float32 keep the settings they were saved with.
    run = run_settings(args, info.world_size, {**(settings or {}), **({"precision": precision}
                                                                      if precision != "fp32" else {})})
    # Every rank decides from the same files, before rank 0 writes anything (the collective in
    # restore_run below keeps rank 0 from writing before all have looked).
    state, differences = start_state(out_dir, run, info, resume=args.resume, overwrite=args.overwrite,
                                     allow_inexact_resume=args.allow_inexact_resume, steps=args.steps)
    ddp_model = wrap_ddp(model, info, find_unused_parameters=getattr(model.config, "use_moe", False))
    optimizer = make_optimizer(model, args.weight_decay, args.lr)
    start_step, loss_value, inexact = restore_run(state, differences, model, optimizer, ckpt_path, info,
                                                  resume=args.resume)
    del state

    # A checkpoint past stop_at is never relabelled: stop_at only ends a run early.
    end_step = max(start_step, args.steps if args.stop_at is None else min(args.steps, args.stop_at))
    sampler = StepBatches(len(dataset), args.batch_size, info.rank, info.world_size, args.seed,
                          start_step * args.grad_accum, (end_step - start_step) * args.grad_accum,
                          first_epoch_levels)
    trainable, total = count_trainable(model)
    if info.is_main:
        prepare_out_dir(out_dir, start_step, {"total_steps": args.steps, "trainable_params": trainable,
                                              "total_params": total, "world_size": info.world_size,
                                              "args": asdict(args), "settings": run,
                                              **({"inexact_resumes": inexact} if inexact else {})})
    loader = iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                             num_workers=args.num_workers, persistent_workers=False))

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
                mean_loss, n = backward_micro_batch(ddp_model, batch, step_loss, global_targets, info.world_size,
                                                    len(micro), sync=sync, weight=weight, precision=precision)
                step_loss_sum += mean_loss * n
                samples += len(batch.ids) * weight
                tokens += int(batch.attention_mask.sum()) * weight
            fault_point(f"step-{step + 1}")
            update_weights(model, optimizer, args.grad_clip, before_update=lambda: setattr(guard, "updating", True))
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
    summary = {"stage": out_dir.name, "steps": end_step, "precision": precision,
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
