"""The training loop every stage shares: data order, optimisation, DDP, checkpoints, metrics.

* Data order depends only on (seed, global step): the global batch of micro-step m is a slice of
  a seeded permutation, and each rank takes its own part of it. So one process with batch 2B and
  two processes with batch B see the same samples, and a resumed run continues exactly.
* The loss is the mean over all answer tokens of the global batch (across ranks and
  accumulation steps), not a mean of per-rank means: ranks with fewer answer tokens weigh less.
* AdamW (no decay on norms, biases and 1-D gains), linear warm-up then cosine decay, gradient
  clipping and accumulation, bf16 autocast on GPU.
* A checkpoint (weights, optimizer, step) is written atomically every ``save_every`` steps and
  at the end; ``resume=True`` continues from it. Metrics go to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .distributed import DistInfo, is_distributed, unwrap, wrap_ddp

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


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
    grad_clip: float = 1.0
    save_every: int = 0  # 0: only at the end
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    num_workers: int = 0
    stop_at: int | None = None  # end this run early at that step, as if killed (for resume tests)


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


def atomic_torch_save(obj, path: Path) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_metrics(out_dir: Path, record: dict) -> None:
    with open(out_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def forget_metrics_after(out_dir: Path, step: int) -> None:
    """Drop metrics logged after ``step``: a resumed run does those steps again."""
    path = out_dir / METRICS
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


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
) -> dict:
    """Train ``model`` (already on ``info.device``) and save it with ``save_final(model, out_dir)``.

    ``step_loss(model, batch) -> (mean loss over the batch's target tokens, extra loss, n_targets)``
    runs one micro-batch; the extra loss (e.g. MoE balance) is added as is.
    Returns a summary dict (final loss, steps, seconds, samples/s, tokens/s).
    """
    out_dir = Path(args.out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ddp_model = wrap_ddp(model, info, find_unused_parameters=getattr(model.config, "use_moe", False))
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.95))
    start_step = 0
    ckpt_path = out_dir / CHECKPOINT
    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=info.device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        if info.is_main:
            forget_metrics_after(out_dir, start_step)
    elif args.resume and info.is_main:
        print(f"no checkpoint in {out_dir}; starting from step 0")

    trainable, total = count_trainable(model)
    if info.is_main and start_step == 0:
        (out_dir / METRICS).unlink(missing_ok=True)
        append_metrics(out_dir, {"total_steps": args.steps, "trainable_params": trainable,
                                 "total_params": total, "world_size": info.world_size,
                                 "args": asdict(args)})
    end_step = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
    sampler = StepBatches(len(dataset), args.batch_size, info.rank, info.world_size, args.seed,
                          start_step * args.grad_accum, (end_step - start_step) * args.grad_accum)
    loader = iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                             num_workers=args.num_workers, persistent_workers=False))
    use_amp = info.device.type == "cuda" and torch.cuda.is_bf16_supported()

    def save_checkpoint(step: int) -> None:
        if info.is_main:
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "step": step, "args": asdict(args)}, ckpt_path)

    bar = tqdm(total=args.steps, initial=start_step, disable=not info.is_main, desc=out_dir.name,
               dynamic_ncols=True)
    t0, samples, tokens, loss_value = time.perf_counter(), 0, 0, float("nan")
    # What the next metrics line averages over: losses since the last line, and throughput.
    window = {"loss": 0.0, "steps": 0, "samples": 0, "tokens": 0, "t": t0}
    model.train()
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
            batch = batch.to(info.device)
            sync = i == len(micro) - 1
            ctx = ddp_model.no_sync() if (info.world_size > 1 and not sync) else nullcontext()
            with ctx, torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                mean_loss, extra, n = step_loss(ddp_model, batch)
                # DDP averages gradients over ranks; multiply by world_size to undo that.
                objective = mean_loss * n * info.world_size / global_targets + extra / len(micro)
                objective.backward()
            step_loss_sum += float(mean_loss.detach()) * n
            samples += len(batch.ids)
            tokens += int(batch.attention_mask.sum())
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
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
            if info.is_main:
                append_metrics(out_dir, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                samples_s=f"{record['samples_per_s']:.0f}")
            window = {"loss": 0.0, "steps": 0, "samples": samples, "tokens": tokens, "t": now}
        if args.save_every and done % args.save_every == 0 and done < end_step:
            save_checkpoint(done)
    bar.close()
    seconds = time.perf_counter() - t0
    save_checkpoint(end_step)
    finished = end_step == args.steps
    if info.is_main and finished:
        save_final(unwrap(model), out_dir)
    summary = {"stage": out_dir.name, "steps": end_step, "final_loss": round(loss_value, 4),
               "seconds": round(seconds, 1),
               "samples_per_s": round(samples * info.world_size / max(seconds, 1e-9), 1),
               "tokens_per_s": round(tokens * info.world_size / max(seconds, 1e-9), 1),
               "trainable_params": trainable, "finished": finished}
    if info.is_main:
        append_metrics(out_dir, {"summary": summary})
    return summary
