"""Training the tiny CLIP on the shapes world: the loop and the command line.

The model is `minimind_v.model.tiny_clip`, the examples `minimind_v.data.clip_examples`, the checks
`minimind_v.probes`. Each step draws fresh pictures (`training_batch`), and the InfoNCE loss pulls
each picture towards its own caption and away from the others.

What the VLM later reads are the *patch tokens*, not the CLS embedding, and a tiny CLIP can
match captions by colour and size while its patch tokens forget shape. Three things push shape
into the tokens:

- every caption names every object's size, colour, shape and position;
- each picture also meets *hard negatives*: its own caption with one thing changed (a shape,
  shapes swapped between two objects, a colour, a size, a position);
- an auxiliary objective: every patch token under an object must predict that object's shape,
  colour, size and grid position, and the CLS token must count the objects of each shape, colour
  and size (linear heads, used in training only). The VLM then finds the whole object in any one
  of its tokens, and the counts in one place. The shapes world knows the truth of every picture;
  using it lets a ViT trained from scratch for a few minutes learn what a real CLIP learns from
  400 million pairs.

`probes.linear_probe` checks the result: how well a linear classifier reads each object's
attributes from the frozen patch tokens, compared with a randomly initialised encoder of the same
size.

Run alone or under DDP (the embeddings of all ranks are gathered, so the loss sees the whole
global batch, exactly as one process would):

    python -m minimind_v.train.clip --data DIR --out DIR
    torchrun --standalone --nproc_per_node 2 -m minimind_v.train.clip --data DIR --out DIR

The schedule and the parameter groups are the shared trainer's (`trainer.lr_at`,
`trainer.param_groups`), and so are checkpoints and resuming (`checkpoint`). The loop is its own:
its batches are drawn, not read from a dataset, and its loss gathers the embeddings of every rank.
The output folder is a regular CLIPModel checkpoint with its tokenizer and image processor, so
`VisionEncoder.from_pretrained(out)` (and `CLIPModel.from_pretrained(out)`) open it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPModel

from ..data import shapes
from ..data.clip_examples import (object_labels, object_patches, patch_labels, scene_counts, scene_example,
                                  training_scene)
from ..defaults import TRAINING
from ..model.tiny_clip import (ContrastiveCLIP, TinyClipConfig, build_tokenizer, contrastive_loss, count_loss,
                               init_vision_embeddings, make_clip_config, make_image_processor, object_loss,
                               pixels_from_images, tokenize)
from ..model.folders import quiet_transformers
from ..probes import describe_shape_probe, load_held_out, probe_trained_vs_random, retrieval_accuracy
from ..precision import autocast, training_precision
from ..runfiles import atomic_write_text, mark_complete
from . import distributed as D
from .checkpoint import (CHECKPOINT, METRICS, StepGuard, fault_point, prepare_out_dir, restore_run, start_state,
                         write_checkpoint)
from .common import FLAG_HELP, checked, path_setting
from .trainer import LIMITS, lr_at, param_groups, value_problem

# ----------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    out: str = "runs/tiny_clip"
    data: str | None = None  # shapes-world folder: its eval split is the held-out set
    steps: int = TRAINING["clip"]["steps"]  # ~3.6 min on 2 CPU cores
    batch_size: int = TRAINING["clip"]["batch_size"]  # global, split evenly over ranks
    negatives: int = 3  # hard-negative captions per picture
    # Weight of the auxiliary loss (objects on the patch tokens, counts on CLS; 0: contrastive only).
    # At 1 the tokens kept too little shape (probe 0.47 after 500 steps); at 10, 0.96.
    aux_weight: float = 10.0
    lr: float = TRAINING["clip"]["lr"]
    min_lr_ratio: float = 0.1
    warmup_steps: int = TRAINING["clip"]["warmup_steps"]
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_pairs: int = 512  # held-out pairs (a multiple of 64)
    probe_train: int = 1000  # 0 skips the final probe
    probe_test: int = 500
    log_every: int = 10
    progress: bool = True
    model: TinyClipConfig = field(default_factory=TinyClipConfig)
    save_every: int = 0  # write the checkpoint every N steps (0: only at the end)
    resume: bool = False  # continue from out/checkpoint.pt (same settings), or start at step 0 without one
    overwrite: bool = False  # start at step 0 although out holds an earlier run
    allow_inexact_resume: bool = False  # with resume: continue although the settings differ
    stop_at: int | None = None  # end this run early at that step, as if killed (for resume tests)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the flag of the first value out of range."""
        for name, limits in CONFIG_LIMITS.items():
            value = getattr(self.model, name) if hasattr(self.model, name) else getattr(self, name)
            if name == "stop_at" and value is None:
                continue
            problem = value_problem(value, **limits)
            if problem:
                raise ValueError(f"--{name.replace('_', '-')} {problem}")
        if self.eval_pairs % 64:
            raise ValueError(f"--eval-pairs must be a positive multiple of 64, got {self.eval_pairs}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: --resume continues the run in the "
                             "folder, --overwrite starts it again")


# The valid range of each TrainConfig / TinyClipConfig value (flags of the same name).
CONFIG_LIMITS = {
    **{k: v for k, v in LIMITS.items() if k in ("steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps",
                                                 "weight_decay", "grad_clip", "seed", "log_every", "save_every",
                                                 "stop_at")},
    "negatives": dict(integer=True, low=0), "aux_weight": dict(integer=False, low=0),
    "eval_every": dict(integer=True, low=0), "eval_pairs": dict(integer=True, low=64),
    "probe_train": dict(integer=True, low=0), "probe_test": dict(integer=True, low=1),
    **{k: dict(integer=True, low=1) for k in ("vision_width", "vision_layers", "vision_heads", "text_width",
                                             "text_layers", "text_heads", "projection_dim")},
}
# TrainConfig fields that do not change the trained weights: not compared on resume.
NOT_SETTINGS = ("out", "progress", "eval_every", "probe_train", "probe_test", "log_every", "save_every", "resume",
                "overwrite", "allow_inexact_resume", "stop_at", "model")


def run_settings(cfg: TrainConfig, world_size: int) -> dict:
    """What decides the weights a run ends with (compared on resume): the training values, the
    model's sizes, the held-out set (its pictures are never trained on) and the number of processes."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_SETTINGS}
    settings["data"] = path_setting(cfg.data, cfg.out)
    settings.update(asdict(cfg.model))
    settings["world_size"] = world_size
    return settings


# ----------------------------------------------------------------------------- a step's batch


def training_batch(tokenizer, seed: int, indices: Sequence[int], n_negatives: int, held_out: frozenset = frozenset()) -> dict:
    """Examples `indices` -> pixel_values (b, 3, 224, 224), input_ids/attention_mask (b*(1+K), T),
    patch_labels (b, 4, 49) (each patch's object's attributes, -1 off the objects) and counts
    (b, len(COUNTED)) (`scene_counts`), the targets of the auxiliary objective.

    Text rows: the b captions first, then the b*K hard negatives (example-major).
    """
    images, texts, negatives, labels, counts = [], [], [], [], []
    for index in indices:
        scene, rng = training_scene(seed, int(index), held_out)
        text, negs = scene_example(scene, rng, n_negatives)
        images.append(shapes.render_scene(scene))
        texts.append(text)
        negatives += negs
        labels.append(patch_labels(object_patches(scene), object_labels(scene)))
        counts.append(scene_counts(scene))
    batch = tokenize(tokenizer, texts + negatives)
    batch["pixel_values"] = pixels_from_images(images)
    batch["patch_labels"] = torch.stack(labels)  # (b, 4, 49)
    batch["counts"] = torch.stack(counts)  # (b, len(COUNTED))
    return batch


# ----------------------------------------------------------------------------- optimisation

LOGIT_SCALE_LR_MULTIPLIER = 10.0


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The shared AdamW groups (`trainer.param_groups`), with two rules of CLIP's own.

    Decay the weight matrices only: no decay for biases, LayerNorms, embeddings (tokens, positions,
    CLS) and above all the logit scale, which weight decay would drag towards exp(0) = 1, a
    temperature far too soft. Adam moves a parameter by about lr per step, so at lr 2e-3 the
    log-scale would need ~800 steps to go from CLIP's start (1/0.07) to its cap (100); its group
    gets `lr_multiplier` = LOGIT_SCALE_LR_MULTIPLIER (applied by the training loop's schedule).
    """
    return param_groups(model, weight_decay, no_decay_names=("embedding",),
                        lr_multipliers={"logit_scale": LOGIT_SCALE_LR_MULTIPLIER})


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """The shared schedule (`trainer.lr_at`: linear warmup, then cosine decay to min_lr_ratio * lr),
    rounded as this stage has always been trained (``floor_as_ratio``, see `trainer.lr_at`)."""
    return lr_at(step, cfg, floor_as_ratio=True)


# ----------------------------------------------------------------------------- the loop

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP caps the inverse temperature at 100


def train(cfg: TrainConfig) -> dict:
    """Train (alone or as one rank of a torchrun job), save to cfg.out on rank 0, return a summary."""
    info = D.setup_distributed()
    try:
        result = _train(cfg, info)
    except D.RankTimeoutError:
        raise  # leave the broken process group alone: tearing it down may wait on the rank that is gone
    except BaseException:
        D.cleanup_distributed()
        raise
    D.cleanup_distributed()
    return result


def _train(cfg: TrainConfig, info: D.DistInfo) -> dict:
    cfg.validate()
    if cfg.batch_size % info.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({info.world_size})")
    out = Path(cfg.out)
    local_batch = cfg.batch_size // info.world_size
    settings = run_settings(cfg, info.world_size)
    precision = training_precision(info.device)
    if precision != "fp32":  # only bf16 is written down: float32 runs keep the settings they were saved with
        settings["precision"] = precision
    checkpoint = out / CHECKPOINT
    # Every rank decides from the same files before rank 0 writes anything (the collective of
    # wrap_ddp / restore_run below comes first).
    state, differences = start_state(out, settings, info, resume=cfg.resume, overwrite=cfg.overwrite,
                                     allow_inexact_resume=cfg.allow_inexact_resume, steps=cfg.steps)

    D.seed_everything(cfg.seed)  # identical initial weights on every rank
    tokenizer = build_tokenizer()
    clip = CLIPModel(make_clip_config(cfg.model, vocab_size=len(tokenizer)))
    init_vision_embeddings(clip)
    clip = clip.to(info.device)
    saved_attention = clip.config._attn_implementation
    if precision == "bf16" and info.device.type == "cpu":
        # The fused attention's bfloat16 backward is slow on a CPU; written out, attention is two
        # more bfloat16 products (the step runs ~1.9x float32's speed, against ~1.35x with the fused one).
        clip.set_attn_implementation("eager")
    contrastive = ContrastiveCLIP(clip)
    model = D.wrap_ddp(contrastive, info)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    # The heads are saved too: they shape the gradients, so an exact resume needs them.
    start_step, last_loss, inexact = restore_run(state, differences, contrastive, optimizer, checkpoint, info,
                                                 resume=cfg.resume)
    del state
    end_step = max(start_step, cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at))

    held = load_held_out(cfg.data, n=cfg.eval_pairs, seed=cfg.seed) if info.is_main else None
    # Every rank skips the same held-out pictures (rank 0 knows them; share the keys).
    held_keys = [held.scene_keys if held else None]
    if D.is_distributed():
        torch.distributed.broadcast_object_list(held_keys, src=0)
    held_keys = held_keys[0]

    metrics_file = None
    if info.is_main:
        prepare_out_dir(out, start_step, {"total_steps": cfg.steps, "world_size": info.world_size,
                                          "settings": settings, **({"inexact_resumes": inexact} if inexact else {})})
        metrics_file = open(out / METRICS, "a", encoding="utf-8")

    def log(record: dict) -> None:
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def evaluate(step: int, elapsed: float) -> float:
        acc = retrieval_accuracy(clip, tokenizer, held, n=64)
        clip.train()
        log({"step": step, "elapsed_s": round(elapsed, 2), "retrieval_top1": acc})
        return acc

    def save_checkpoint(step: int) -> None:
        write_checkpoint(checkpoint, contrastive, optimizer, step, settings, loss=last_loss, inexact_resumes=inexact)
        guard.saved = step

    guard = StepGuard(save_checkpoint, start_step, info, checkpoint)
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=cfg.steps, initial=start_step, desc="tiny CLIP", unit="step",
               disable=not (info.is_main and cfg.progress))
    acc = float("nan")
    images_seen, window_start, window_images = 0, time.perf_counter(), 0
    D.use_step_timeout()
    step = start_step
    try:
        for step in range(start_step, end_step):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg) * group["lr_multiplier"]
            # This rank's slice of global batch `step`: examples [step*B + rank*b, step*B + (rank+1)*b).
            first = step * cfg.batch_size + info.rank * local_batch
            batch = training_batch(tokenizer, cfg.seed, range(first, first + local_batch), cfg.negatives, held_keys)
            batch = {k: v.to(info.device) for k, v in batch.items()}
            with autocast(info.device, precision):  # the products in bfloat16 where native; losses in float32
                outputs = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
            image, text, scale, object_logits, count_logits = (t.float() for t in outputs)
            # Gather every rank's embeddings (with gradient): the loss below is the global-batch loss.
            positives, negatives = text[:local_batch], text[local_batch:]
            clip_loss = contrastive_loss(
                D.all_gather_with_grad(image), D.all_gather_with_grad(positives), scale,
                D.all_gather_with_grad(negatives) if cfg.negatives else None,
            )
            # Per rank, normalised by the mean labelled-patch count per rank, so that DDP's gradient
            # average is the gradient of the global-batch mean. (A zero weight keeps the head in the
            # graph: DDP expects every parameter to get a gradient.)
            patches_per_rank = D.all_reduce_mean((batch["patch_labels"][:, 0] >= 0).sum().float())
            # Every rank holds the same number of pictures, so the count loss's per-rank mean averages right.
            aux_loss = object_loss(object_logits, batch["patch_labels"], patches_per_rank) + count_loss(count_logits, batch["counts"])
            loss = clip_loss + cfg.aux_weight * aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            fault_point(f"step-{step + 1}")
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            guard.updating = True
            optimizer.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            guard.completed(step + 1)
            last_loss = clip_loss.item()  # identical on every rank (the global-batch loss)

            images_seen += cfg.batch_size
            window_images += cfg.batch_size
            bar.update()
            if (step + 1) % cfg.log_every == 0 or step + 1 == end_step:
                now = time.perf_counter()
                speed = window_images / (now - window_start)
                window_start, window_images = now, 0
                aux_value = D.all_reduce_mean(aux_loss).item()  # the global-batch mean (collective: every rank)
                log({"step": step + 1, "elapsed_s": round(now - start, 2), "loss": round(last_loss, 4),
                     "aux_loss": round(aux_value, 4), "lr": learning_rate(step, cfg),
                     "logit_scale": round(clip.logit_scale.exp().item(), 2), "images_per_s": round(speed, 1)})
                bar.set_postfix(loss=f"{last_loss:.3f}", aux=f"{aux_value:.3f}", img_s=f"{speed:.0f}", top1=f"{acc:.2f}")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                # Rank 0 evaluates; the others wait for it outside any collective.
                result = D.run_on_main(lambda: evaluate(step + 1, time.perf_counter() - start), "the held-out evaluation")
                acc = result if info.is_main else acc
            if info.is_main and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < end_step:
                save_checkpoint(step + 1)
    except Exception as err:
        bar.close()
        if metrics_file:
            metrics_file.close()
        failure = guard.fail(err, step + 1)
        if failure is err:
            raise
        raise failure from err
    bar.close()
    train_seconds = time.perf_counter() - start
    finished = end_step == cfg.steps

    def finish() -> dict:
        """Rank 0: the final checkpoint, then the model folder, then the completion mark, last."""
        save_checkpoint(end_step)
        if not finished:
            metrics_file.close()
            return {"steps": end_step, "finished": False, "final_loss": last_loss, "out": str(out)}
        acc = evaluate(cfg.steps, train_seconds)
        clip.set_attn_implementation(saved_attention)  # saved as it was made
        with quiet_transformers():
            clip.save_pretrained(out)
            fault_point("final-save")  # the crash tests kill here: weights written, the rest not yet
            tokenizer.save_pretrained(out)
            make_image_processor(cfg.model.image_size).save_pretrained(out)
        atomic_write_text(out / "train_config.json", json.dumps(asdict(cfg), indent=2) + "\n")
        summary = {"steps": cfg.steps, "precision": precision, "images": images_seen, "minutes": round(train_seconds / 60, 2),
                   "world_size": info.world_size, "final_loss": round(last_loss, 4), "retrieval_top1": acc,
                   "held_out": held.source, "out": str(out), "finished": True}
        if cfg.probe_train:
            probe = probe_trained_vs_random(out, cfg.probe_train, cfg.probe_test, cfg.seed)
            summary["probe"] = probe
            log({"step": cfg.steps, "probe": probe})
        metrics_file.close()
        shape = f", {describe_shape_probe(summary['probe'])}" if "probe" in summary else ""
        print(f"tiny CLIP: {cfg.steps} steps x {cfg.batch_size} in {train_seconds / 60:.1f} min on {info.world_size} "
              f"process(es), contrastive loss {last_loss:.3f}, held-out top-1 retrieval {acc:.3f} (batches of 64){shape} -> {out}")
        mark_complete(out, {"stage": "clip", "summary": summary, "settings": settings, "inexact_resumes": inexact})
        return summary

    # The others wait for rank 0's saving and probe outside any collective (the probe takes a while).
    summary = D.run_on_main(finish, "saving the model and probing it")
    return summary if info.is_main else {}


def main(argv: list[str] | None = None) -> dict:
    d = TrainConfig()
    m = TinyClipConfig()
    p = argparse.ArgumentParser(prog="python -m minimind_v.train.clip",
                                description="Train the tiny CLIP on the shapes world (alone or under torchrun).")

    def number(name: str, kind=int, **kwargs):
        """A flag whose value is checked against CONFIG_LIMITS (the error names the flag)."""
        limits = {k: v for k, v in CONFIG_LIMITS[name].items() if k != "integer"}
        p.add_argument("--" + name.replace("_", "-"), type=checked(kind, **limits), **kwargs)

    p.add_argument("--data", default=d.data, help="shapes-world folder; its eval split is the held-out set "
                   "(default: freshly generated held-out scenes)")
    p.add_argument("--out", default=d.out, help="output folder: CLIPModel, tokenizer, image processor, "
                   "train_config.json, checkpoint.pt and metrics.jsonl (one JSON line per log step)")
    number("steps", default=d.steps)
    number("batch_size", default=d.batch_size, help="global batch (split over processes)")
    number("negatives", default=d.negatives, help="hard-negative captions per picture")
    number("aux_weight", float, default=d.aux_weight,
           help="weight of the auxiliary loss: objects on the patch tokens, counts on CLS (0: contrastive only)")
    number("lr", float, default=d.lr)
    number("warmup_steps", default=d.warmup_steps)
    number("weight_decay", float, default=d.weight_decay)
    number("seed", default=d.seed)
    number("eval_every", default=d.eval_every, help="steps between held-out evaluations (0: only at the end)")
    number("eval_pairs", default=d.eval_pairs, help="held-out pairs (a multiple of 64)")
    number("probe_train", default=d.probe_train, help="linear-probe training objects (0: no probe)")
    number("probe_test", default=d.probe_test)
    number("log_every", default=d.log_every)
    number("save_every", default=d.save_every, help=FLAG_HELP["save_every"])
    p.add_argument("--resume", action="store_true", help=FLAG_HELP["resume"])
    p.add_argument("--overwrite", action="store_true", help=FLAG_HELP["overwrite"])
    p.add_argument("--allow-inexact-resume", action="store_true", help=FLAG_HELP["allow_inexact_resume"])
    number("stop_at", default=None, help=argparse.SUPPRESS)
    for name in ("vision_width", "vision_layers", "vision_heads", "text_width", "text_layers", "text_heads",
                 "projection_dim"):
        number(name, default=getattr(m, name))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        flags = vars(a)  # every flag is the TrainConfig or TinyClipConfig field of its name, but --no-progress
        model = TinyClipConfig(**{f.name: flags[f.name] for f in fields(TinyClipConfig) if f.name in flags})
        return train(TrainConfig(**{f.name: flags[f.name] for f in fields(TrainConfig) if f.name in flags},
                                 progress=not a.no_progress, model=model))
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))


if __name__ == "__main__":
    main()
