"""What the training entry points share: flags, the loss step, saving, freezing."""

from __future__ import annotations

import argparse
import shutil
from dataclasses import fields
from pathlib import Path

from ..data.datasets import Batch
from .trainer import TrainArgs

FREEZE_STRATEGIES = {
    "proj": "the projection only (the decoder stays as it is)",
    "ends": "the projection + the first and last decoder layers",
    "all": "the projection + the whole decoder (embeddings included)",
}


def add_train_flags(parser: argparse.ArgumentParser, **defaults) -> None:
    """One ``--flag`` per :class:`TrainArgs` field, with stage-specific defaults."""
    for f in fields(TrainArgs):
        name = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        if f.name == "out_dir":
            parser.add_argument("--out", dest="out_dir", required="out_dir" not in defaults,
                                default=default, help="folder for the checkpoint, metrics and model")
        elif f.type in (bool, "bool"):
            parser.add_argument(name, action="store_true", default=default)
        elif f.name == "stop_at":
            parser.add_argument(name, type=int, default=None, help=argparse.SUPPRESS)
        else:
            kind = float if isinstance(f.default, float) else int
            parser.add_argument(name, type=kind, default=default)


def train_args_from(ns: argparse.Namespace) -> TrainArgs:
    return TrainArgs(**{f.name: getattr(ns, f.name) for f in fields(TrainArgs)})


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
    """``save_pretrained`` the model and tokenizer together. A local vision encoder folder is
    copied inside (``vision_encoder/``), so the saved model is complete and can be moved."""
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
    tokenizer.save_pretrained(out_dir)
