"""Stages 1 and 2: teach the decoder to read pictures (caption pretraining), then to answer (SFT).

Both stages are the same loop over different data and defaults; ``pretrain_vlm`` and
``sft_vlm`` are their entry points. The vision encoder is always frozen, so with
``--feature-cache`` every image is encoded once and training reads its patch tokens from disk.
"""

from __future__ import annotations

import argparse
import functools
import random
from pathlib import Path

from torch.utils.data import ConcatDataset

from ..data.datasets import DataError, collate, open_chat_dataset, read_records, resolve_data, skip_summary
from ..data.parquet import ParquetIndex, dataset_picture_names, parquet_files
from ..data.shapes_records import count_shared, objects_per_record, repeat_by_objects, repeat_found_relations
from ..defaults import FREEZE, TRAINING
from ..model.projector import PROJECTORS
from ..model.vision import DEFAULT_CLIP, VisionEncoder
from ..model.vlm import VISION_TOKENS, VLMConfig, is_vlm_folder, load_start_model, resolve_vision_model
from ..tokenizer import load_tokenizer
from .checkpoint import TrainSetupError
from .common import (FREEZE_STRATEGIES, add_train_flags, checked, lm_step_loss, path_setting,
                     save_with_tokenizer, set_trainable, start_run)
from .distributed import cleanup_distributed, print0, run_on_main
from .trainer import fit

STAGES = {
    "pretrain": dict(json="pretrain_data.json", images="pretrain_images", freeze=FREEZE["pretrain"],
                     train=TRAINING["pretrain"]),
    "sft": dict(json="sft_data.json", images="sft_images", freeze=FREEZE["sft"], train=TRAINING["sft"]),
}


MIN_TEXT_TOKENS = 2  # --max-length must leave room for this much text besides the image tokens


def build_parser(stage: str) -> argparse.ArgumentParser:
    spec = STAGES[stage]
    p = argparse.ArgumentParser(description=f"MiniMind-V {stage} stage")
    p.add_argument("--data", required=True,
                   help="the dataset: a folder in the v1 JSON layout (--json + --images inside), a folder holding "
                        "the original's parquet files (pretrain_i2t.parquet, sft_i2t.parquet), a .parquet file, "
                        "or a folder of parquet shards")
    p.add_argument("--init", required=True,
                   help="model to start from: a text LM folder (pretrain) or a VLM folder")
    p.add_argument("--vision", default=None,
                   help=f"vision encoder: hub id or folder (default: the --init VLM's, else {DEFAULT_CLIP})")
    p.add_argument("--json", default=spec["json"], help="records file inside --data")
    p.add_argument("--images", default=spec["images"], help="image folder inside --data")
    p.add_argument("--freeze", default=spec["freeze"], choices=sorted(FREEZE_STRATEGIES),
                   help="what trains: " + "; ".join(f"{k}: {v}" for k, v in FREEZE_STRATEGIES.items()))
    p.add_argument("--projector", default="linear", choices=PROJECTORS)
    p.add_argument("--vision-tokens", default="all", choices=VISION_TOKENS,
                   help="what fills a picture's placeholders: all its patch tokens, or its CLS token in "
                        "every place (a new model only; a VLM --init keeps its own)")
    p.add_argument("--feature-cache", action="store_true",
                   help="read frozen patch tokens from a cache (built on first use) instead of encoding")
    p.add_argument("--cache-dir", default=None, help="where caches live (default: <data>/feature_cache)")
    p.add_argument("--mix-captions", type=checked(float, low=0, high=1), default=0.0,
                   help="add this fraction (0..1, of the records) of caption samples from pretrain_data.json")
    p.add_argument("--max-length", type=checked(int, low=MIN_TEXT_TOKENS), default=256,
                   help="tokens per sample, image tokens included (more than the encoder's tokens)")
    p.add_argument("--image-dropout", type=checked(float, low=0, high=0.9), default=0.0,
                   help="dropout on each picture's encoder tokens while training (0..0.9; 0: none)")
    p.add_argument("--object-repeats", type=object_repeats, default=None, metavar="N1,N2,...",
                   help="shapes world: each record with k objects taken N_k times an epoch (e.g. 1,2,3: "
                        "three-object pictures three times as often as one-object ones)")
    p.add_argument("--relation-repeats", type=checked(int, low=1), default=1, metavar="N",
                   help="shapes world: each record with a relation answered by an object or \"yes\" taken N times "
                        "an epoch (most relations asked find nothing)")
    p.add_argument("--object-curriculum", action="store_true",
                   help="shapes world: the first epoch takes pictures from fewer objects to more (in random "
                        "order within each count); later epochs in random order")
    p.add_argument("--count-shared", action="store_true",
                   help="shapes world: count questions answered \"one\" asked instead, where the picture "
                        "allows, about a shape or colour that several of its objects share")
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="skip malformed records and unreadable images, and report how many")
    add_train_flags(p, **spec["train"])
    return p


def object_repeats(text: str) -> tuple[int, ...]:
    """"1,2,3" -> (1, 2, 3): how many times a record is taken, by its number of objects."""
    try:
        repeats = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if any(n < 1 for n in repeats):
        raise argparse.ArgumentTypeError(f"every repeat must be >= 1, got {text!r}")
    return repeats


def parse_args(stage: str, argv=None):
    return build_parser(stage).parse_args(argv)


def open_features(encoder, image_dir: Path, cache_dir: Path, info, names=None):
    """Rank 0 builds (or validates) the cache; the others wait, then open it.

    Building may take hours (every image through the encoder), longer than any collective should
    wait: the others wait through `run_on_main` (polling rank 0's heartbeat), not in a barrier.
    names: the pictures to cache (default: every image file in image_dir; a parquet dataset
    passes its pictures' names "<file>#<row>/<k>").
    """
    from ..data.features import ensure_cache

    run_on_main(lambda: ensure_cache(encoder, image_dir, cache_dir, names=names, progress=True),
                f"building the feature cache {cache_dir}")
    return ensure_cache(encoder, image_dir, cache_dir, names=names, progress=False)


def build_dataset(ns, stage_dir: Path, tokenizer, encoder, info):
    data = Path(ns.data)
    n_tokens = encoder.num_tokens
    cache_root = Path(ns.cache_dir) if ns.cache_dir else (data if data.is_dir() else data.parent) / "feature_cache"

    def part(json_name, image_dir_name, records=None, rows=None):
        # The JSON layout (records file + image folder) or the parquet one (pictures in the rows).
        path, image_dir = resolve_data(data, json_name, image_dir_name)
        cache = None
        if ns.feature_cache and image_dir is None:
            root, _ = parquet_files(path)
            cache = open_features(encoder, root, cache_root / path.stem, info,
                                  names=dataset_picture_names(path, rows))
        elif ns.feature_cache:
            cache = open_features(encoder, image_dir, cache_root / image_dir.name, info)
        return open_chat_dataset(path, tokenizer, n_tokens, image_dir=image_dir, preprocess=encoder.preprocess,
                                 feature_cache=cache, max_length=ns.max_length,
                                 skip_bad_samples=ns.skip_bad_samples, records=records, rows=rows)

    records, levels = None, None
    by_scene = [flag for flag, on in (("--object-repeats", ns.object_repeats),
                                        ("--object-curriculum", ns.object_curriculum),
                                        ("--count-shared", ns.count_shared),
                                        ("--relation-repeats", ns.relation_repeats > 1)) if on]
    if by_scene:
        path, image_dir = resolve_data(data, ns.json, ns.images)
        if image_dir is None:
            raise DataError(f"{' and '.join(by_scene)}: {path} holds parquet rows, which describe no scenes; "
                            f"it takes the shapes world's JSON records")
        records = read_records(path)
        if ns.count_shared:
            records = count_shared(records, ns.seed, where=str(path))
        if ns.object_repeats:
            records = repeat_by_objects(records, ns.object_repeats, where=str(path))
        if ns.relation_repeats > 1:
            records = repeat_found_relations(records, ns.relation_repeats, where=str(path))
        if ns.object_curriculum:
            levels = objects_per_record(records, str(path), "a curriculum")
    parts = [part(ns.json, ns.images, records)]
    if ns.mix_captions > 0:
        pretrain = STAGES["pretrain"]
        path, image_dir = resolve_data(data, pretrain["json"], pretrain["images"])
        if image_dir is None:  # parquet: a seeded choice of rows
            n_rows = ParquetIndex(path).num_rows
            k = min(n_rows, int(ns.mix_captions * len(parts[0])))
            parts.append(part(pretrain["json"], pretrain["images"],
                              rows=sorted(random.Random(ns.seed).sample(range(n_rows), k))))
        else:
            captions = read_records(path)
            k = min(len(captions), int(ns.mix_captions * len(parts[0])))
            chosen = random.Random(ns.seed).sample(captions, k)
            parts.append(part(pretrain["json"], pretrain["images"], chosen))
            if levels is not None:  # a caption comes when pictures as full as its own do
                levels += objects_per_record(chosen, str(path), "a curriculum")
    skipped = [s for p in parts for s in p.skipped]
    if skipped:  # how many, for what, and the first few by name
        print0(skip_summary(skipped))
    return (ConcatDataset(parts) if len(parts) > 1 else parts[0]), levels


def prepare_stage(stage: str, argv=None) -> dict:
    """Everything a stage trains with, built exactly as ``run_stage`` builds it: the parsed flags
    (ns, args), the process (info), the model (frozen as --freeze says), the dataset and its
    collate, and the settings a checkpoint records. (``benchmarks/profile_stages.py`` times it.)"""
    parser = build_parser(stage)
    ns, args, info = start_run(parser, argv)
    init = Path(ns.init)
    tokenizer = load_tokenizer(init)
    vision_source = ns.vision
    if vision_source is None:
        vision_source = (resolve_vision_model(init, VLMConfig.from_pretrained(init).vision_model)
                         if is_vlm_folder(init) else DEFAULT_CLIP)
    # A VLM keeps how its encoder prepared pictures (v1: "resize"); a local encoder folder records it too.
    preprocessing = (getattr(VLMConfig.from_pretrained(init), "vision_preprocessing", None)
                     if ns.vision is None and is_vlm_folder(init) else None)
    encoder = VisionEncoder.from_pretrained(vision_source, device=info.device, preprocessing=preprocessing)
    if ns.max_length < encoder.num_tokens + MIN_TEXT_TOKENS:
        parser.error(f"argument --max-length: must be >= {encoder.num_tokens + MIN_TEXT_TOKENS} "
                     f"({encoder.num_tokens} image tokens + {MIN_TEXT_TOKENS} of text), got {ns.max_length}")
    model = load_start_model(str(init), tokenizer, encoder, ns.projector, ns.vision_tokens).to(info.device)
    model.attach_vision_encoder(encoder)
    model.config.vision_preprocessing = encoder.preprocessing  # saved with the model (config.json)
    model.image_dropout = ns.image_dropout
    trainable, total = set_trainable(model, ns.freeze)
    dataset, levels = build_dataset(ns, Path(args.out_dir), tokenizer, encoder, info)
    print0(f"{stage}: {len(dataset)} samples; training {trainable / 1e6:.3f}M of {total / 1e6:.3f}M "
           f"parameters (freeze={ns.freeze}: {FREEZE_STRATEGIES[ns.freeze]}); "
           f"images from {'the feature cache' if ns.feature_cache else 'files'}")
    # What decides the result besides the training flags (compared when resuming). The cache
    # folder does not (its content is fingerprinted); using the cache does (float16 tokens).
    vision = path_setting(vision_source, ns.out_dir) if Path(vision_source).is_dir() else vision_source
    settings = {"stage": stage, "data": path_setting(ns.data, ns.out_dir), "init": path_setting(ns.init, ns.out_dir),
                "vision": vision, "json": ns.json, "images": ns.images, "freeze": ns.freeze, "projector": ns.projector,
                "feature_cache": ns.feature_cache, "mix_captions": ns.mix_captions, "max_length": ns.max_length,
                "skip_bad_samples": ns.skip_bad_samples}
    if ns.vision_tokens != "all":  # (absent at the default: checkpoints from before the flag still resume)
        settings["vision_tokens"] = ns.vision_tokens
    if ns.image_dropout:  # (the same)
        settings["image_dropout"] = ns.image_dropout
    if ns.object_repeats:  # (the same)
        settings["object_repeats"] = list(ns.object_repeats)
    if ns.relation_repeats > 1:  # (the same)
        settings["relation_repeats"] = ns.relation_repeats
    if ns.object_curriculum:  # (the same)
        settings["object_curriculum"] = True
    if ns.count_shared:  # (the same)
        settings["count_shared"] = True
    return dict(parser=parser, ns=ns, args=args, info=info, model=model, dataset=dataset, settings=settings,
                first_epoch_levels=levels,
                collate=functools.partial(collate, pad_id=tokenizer.pad_token_id or 0),
                save=lambda m, out: save_with_tokenizer(m, tokenizer, out, vision_source))


def run_stage(stage: str, argv=None) -> dict:
    s = prepare_stage(stage, argv)
    try:
        summary = fit(s["model"], s["dataset"], s["collate"], s["args"], s["info"], lm_step_loss, s["save"],
                      s["settings"], s["first_epoch_levels"])
    except TrainSetupError as err:
        s["parser"].error(str(err))
    print0(f"done: {summary}")
    cleanup_distributed()
    return summary
