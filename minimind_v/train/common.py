"""What the training entry points share: flags, the loss step, saving, freezing."""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import fields
from pathlib import Path

from ..data.datasets import Batch
from ..model.processing import save_processor
from .checkpoint import TrainSetupError, fault_point, refuse_earlier_run
from .distributed import seed_everything, setup_distributed
from .trainer import LIMITS, TrainArgs, value_problem

FREEZE_STRATEGIES = {
    "proj": "the projection only (the decoder stays as it is)",
    "ends": "the projection + the first and last decoder layers",
    "all": "the projection + the whole decoder (embeddings included)",
}


FLAG_HELP = {
    "resume": "continue from <out>/checkpoint.pt; refused when a flag that decides the result differs from "
              "the checkpoint's (see --allow-inexact-resume); without a checkpoint: start at step 0",
    "overwrite": "start at step 0 even though <out> holds an earlier run (its checkpoint, metrics and "
                 "completion mark are replaced)",
    "allow_inexact_resume": "with --resume, continue even where flags differ from the checkpoint's "
                            "(a warning lists them: the run no longer repeats an uninterrupted one)",
    "save_every": "write the checkpoint every N steps (0: only at the end)",
    "grad_clip": "clip the gradient norm to this (0: no clipping)",
    "min_lr_ratio": "the cosine schedule ends at lr * this (0..1)",
}


def checked(kind, **limits):
    """An argparse ``type`` that converts with ``kind`` and refuses values out of ``limits``
    (see :func:`trainer.value_problem`): the error names the flag."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        problem = value_problem(value, integer=kind is int, **limits)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    convert.__name__ = kind.__name__  # argparse names the type in some messages
    return convert


def add_train_flags(parser: argparse.ArgumentParser, **defaults) -> None:
    """One ``--flag`` per :class:`TrainArgs` field, with stage-specific defaults and range checks."""
    for f in fields(TrainArgs):
        name = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        if f.name == "out_dir":
            parser.add_argument("--out", dest="out_dir", required="out_dir" not in defaults,
                                default=default, help="folder for the checkpoint, metrics and model")
        elif f.type in (bool, "bool"):
            parser.add_argument(name, action="store_true", default=default, help=FLAG_HELP.get(f.name))
        elif f.name == "stop_at":
            parser.add_argument(name, type=checked(int, **_limits("stop_at")), default=None,
                                help=argparse.SUPPRESS)
        else:
            kind = float if isinstance(f.default, float) else int
            parser.add_argument(name, type=checked(kind, **_limits(f.name)), default=default,
                                help=FLAG_HELP.get(f.name))


def _limits(name: str) -> dict:
    return {k: v for k, v in LIMITS[name].items() if k != "integer"}


def train_args_from(ns: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> TrainArgs:
    """The TrainArgs of parsed flags; a combination they refuse becomes ``parser.error``."""
    try:
        return TrainArgs(**{f.name: getattr(ns, f.name) for f in fields(TrainArgs)})
    except ValueError as err:
        if parser is None:
            raise
        parser.error(str(err))


def start_run(parser: argparse.ArgumentParser, argv=None):
    """Every training entry point's opening: parse and check the flags, refuse an out folder that
    holds an earlier run unless --resume or --overwrite says which is meant (before anything slow
    loads), join the process group, seed. Returns (namespace, TrainArgs, DistInfo)."""
    ns = parser.parse_args(argv)
    args = train_args_from(ns, parser)
    try:
        refuse_earlier_run(args.out_dir, args.resume, args.overwrite)
    except TrainSetupError as err:
        parser.error(str(err))
    info = setup_distributed()
    seed_everything(args.seed)
    return ns, args, info


def path_setting(path, out_dir) -> str | None:
    """A path as a run setting: relative to the run's output folder, so that it compares equal from
    any working directory and after the run folder (with its inputs beside it) is moved."""
    if path is None:
        return None
    target, base = Path(path).resolve(), Path(out_dir).resolve()
    try:
        return os.path.relpath(target, base)
    except ValueError:  # another drive (Windows): no relative path
        return str(target)


def lm_step_loss(model, batch: Batch):
    """One micro-batch through the (VL)M: (mean answer-token loss, MoE balance loss, n targets)."""
    kwargs = {}
    if batch.images is not None:
        # (B, 3, S, S) are pixels for the attached encoder; (B, N, width) are cached patch tokens.
        kwargs["pixel_values" if batch.images.dim() == 4 else "image_tokens"] = batch.images
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                labels=batch.labels, use_cache=False, **kwargs)
    return out.loss - out.aux_loss, out.aux_loss, batch.n_targets


def set_trainable(model, strategy: str) -> tuple[int, int]:
    """Freeze the VLM's decoder as ``strategy`` says; returns (trainable, total) parameter counts."""
    if strategy not in FREEZE_STRATEGIES:
        raise ValueError(f"unknown freeze strategy {strategy!r}; choose one of {sorted(FREEZE_STRATEGIES)}")
    model.requires_grad_(strategy == "all")
    model.vision_proj.requires_grad_(True)
    if strategy == "ends":
        model.layers[0].requires_grad_(True)
        model.layers[-1].requires_grad_(True)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_with_tokenizer(model, tokenizer, out_dir: Path, vision_source: str | None = None) -> None:
    """``save_pretrained`` the model and tokenizer together (and a VLM's processor). A local vision
    encoder folder is copied inside (``vision_encoder/``), so the saved model is complete and can
    be moved."""
    out_dir = Path(out_dir)
    if vision_source is not None:
        if Path(vision_source).is_dir():
            target = out_dir / "vision_encoder"
            if Path(vision_source).resolve() != target.resolve():
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(vision_source, target)
            model.config.vision_model = "vision_encoder"
        else:
            model.config.vision_model = vision_source
    model.save_pretrained(out_dir)
    fault_point("final-save")  # the crash tests kill here: weights written, tokenizer not yet
    tokenizer.save_pretrained(out_dir)
    if vision_source is not None:  # a VLM: its processor (image processor + tokenizer + chat template)
        save_processor(out_dir, tokenizer, model)
