"""The shapes world: a synthetic, fully checkable stand-in for the MiniMind-V dataset.

Each picture is 224x224 RGB with 1 to 3 flat-coloured objects on a near-white background.
Objects sit in distinct cells of a 3x3 grid, so every object has a unique position name.
From each scene we write

- captions for stage-1 pretraining   (pretrain_data.json + pretrain_images/),
- question/answer turns for SFT      (sft_data.json + sft_images/),
- a held-out question set            (eval_data.json + eval_data_images/),
- a few named pictures for a chat demo (eval_images/),

in exactly the original v1 dataset layout (SFT pictures stored as
``sft_images/COCO_train2014_<image>``, the name v1's SFT loader opens), so the same training code
reads either; or, with ``--format parquet``, in the original's current layout: one parquet file
per split (pretrain_i2t.parquet, sft_i2t.parquet, eval_i2t.parquet) whose rows hold the
conversation (a JSON string of role/content turns) and the picture's bytes (PNG, the same bytes
as the files of the JSON layout). Every caption and every answer is derived from the scene, and
`answer` (`answer_two_pictures` for questions about two pictures) re-derives an answer by
parsing the question, so every answer can be checked.

Objects are sized so that even a small one spans more than one 32-pixel patch of CLIP ViT-B/32:
a shape narrower than a patch collapses into a single patch token and its outline is lost.
"""


from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import shutil
import time
from dataclasses import asdict
from pathlib import Path

# The world's public names, importable from here as well as from where they live.
from ..machine import usable_cores
from ..runfiles import atomic_write_text
from .shapes_answers import answer, answer_two_pictures, parse_question, question_form
from .shapes_questions import (CAPTION_REQUESTS, CAPTION_TEMPLATES, QUESTION_TEMPLATES, TWO_PICTURE_TEMPLATES,
                               RELATION_ANSWERS, absent_answer, caption, questions, region_phrase, related,
                               regions_relation_answer, single_picture_types, two_picture_question,
                               worked_relation_answer)
from .shapes_records import (MAX_SFT_TURNS, ShapesWorldConfig, demo_images, eval_records, has_held_out_pair,
                             names_held_out_pair, pretrain_records, record_images, record_scenes, sft_records)
from .shapes_scenes import (ANSWER_TYPES, BACKGROUND_RGB, COLOUR_RGB, COLOURS, EXTRA_ANSWER_TYPES, NUMBER_WORDS,
                            PLURAL_SHAPES, POSITIONS, REFERENCE_IMAGE_SIZE, RELATIONS, SHAPES, SINGULAR, SIZE_PIXELS,
                            SIZES, TWO_PICTURE_ANSWERS, TWO_PICTURES, describe_object, max_offset, object_box,
                            position_phrase, random_scene, render_scene, scene_key, validate_scene)

__all__ = [
    'ANSWER_TYPES', 'BACKGROUND_RGB', 'CAPTION_REQUESTS', 'CAPTION_TEMPLATES', 'COLOURS', 'COLOUR_RGB',
    'EXTRA_ANSWER_TYPES', 'FORMATS', 'MAX_SFT_TURNS', 'NUMBER_WORDS', 'ORIGINAL_SFT_PREFIX', 'OUTPUT_DIRS',
    'OUTPUT_FILES', 'PLURAL_SHAPES', 'POSITIONS', 'QUESTION_TEMPLATES', 'REFERENCE_IMAGE_SIZE', 'RELATIONS',
    'RELATION_ANSWERS',
    'SHAPES', 'SHAPES_WORLD_VERSION', 'SINGULAR', 'SIZES', 'SIZE_PIXELS', 'SPLITS', 'ShapesWorldConfig',
    'TWO_PICTURES', 'TWO_PICTURE_ANSWERS', 'TWO_PICTURE_TEMPLATES', 'absent_answer', 'answer',
    'answer_two_pictures', 'caption', 'describe_object', 'generate_world', 'has_held_out_pair', 'main',
    'max_offset', 'names_held_out_pair', 'object_box', 'parse_question', 'position_phrase', 'question_form',
    'questions', 'random_scene', 'record_images', 'record_scenes', 'region_phrase', 'regions_relation_answer', 'related',
    'render_scene', 'scene_key',
    'single_picture_types', 'stored_image_name', 'two_picture_question', 'validate_scene', 'worked_relation_answer',
]

SHAPES_WORLD_VERSION = 1
# The name v1's SFT loader opens for a record's image (sft_images/COCO_train2014_<image>).
ORIGINAL_SFT_PREFIX = "COCO_train2014_"
FORMATS = ("json", "parquet")

# ----------------------------------------------------------------------------- writing the world


def _render_job(job: tuple[str, list[dict], int, int]) -> None:
    path, scene, image_size, level = job
    render_scene(scene, image_size).save(path, format="PNG", compress_level=level)


def _render_bytes(job: tuple[list[dict], int, int]) -> bytes:
    """The PNG bytes _render_job writes to a file, in memory (for the parquet layout)."""
    import io

    scene, image_size, level = job
    buffer = io.BytesIO()
    render_scene(scene, image_size).save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def stored_image_name(folder: str, name: str) -> str:
    """The file name a record's picture has in the JSON layout: SFT pictures carry v1's
    COCO_train2014_ prefix (v1's SFT loader opens sft_images/COCO_train2014_<image>)."""
    return ORIGINAL_SFT_PREFIX + name if folder == "sft_images" else name


def _write_json_atomic(path: Path, obj) -> None:
    """One record per line (readable, diff-able); temp file + rename so a crash never leaves half a file."""
    if isinstance(obj, list):
        text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in obj) + "\n]\n"
    else:
        text = json.dumps(obj, ensure_ascii=False, indent=2) + "\n"
    atomic_write_text(path, text)


SPLITS = (("pretrain_data.json", "pretrain_images", "pretrain_i2t.parquet"),
          ("sft_data.json", "sft_images", "sft_i2t.parquet"),
          ("eval_data.json", "eval_data_images", "eval_i2t.parquet"))
OUTPUT_FILES = ("pretrain_data.json", "sft_data.json", "eval_data.json", "world.json",
                "pretrain_i2t.parquet", "sft_i2t.parquet", "eval_i2t.parquet")
OUTPUT_DIRS = ("pretrain_images", "sft_images", "eval_data_images", "eval_images")


def _parquet_rows(records: list[dict], pictures):
    """Records -> rows of the original's parquet layout: role/content conversations, the pictures'
    bytes (in tag order), and the other fields of the record as columns (JSON strings)."""
    from .records import check_turns

    for record in records:
        messages = check_turns(record["conversations"], f"record {record['id']!r}", record["id"], image_tags="any")
        images = [next(pictures) for _ in record_images(record)]
        row = {"conversations": messages, "image_bytes": images if isinstance(record["image"], list) else images[0]}
        row.update({k: v for k, v in record.items() if k not in ("conversations", "image")})
        yield row


def _write_parquet_split(path: Path, records: list[dict], cfg: ShapesWorldConfig, pool, bar) -> None:
    from .parquet import write_chat_parquet

    jobs = [(scene, cfg.image_size, cfg.png_compress_level) for r in records for scene in record_scenes(r)]
    rendered = pool.imap(_render_bytes, jobs, chunksize=64) if pool is not None else map(_render_bytes, jobs)

    def counted():
        for picture in rendered:
            bar.update()
            yield picture

    several = any(isinstance(r["image"], list) for r in records)
    extra = sorted({k for r in records for k in r} - {"conversations", "image"}, key=lambda k: (k != "id", k))
    write_chat_parquet(path, _parquet_rows(records, counted()), several_pictures=several, extra_columns=extra)


def generate_world(out_dir, config: ShapesWorldConfig | None = None, progress: bool = True,
                   overwrite: bool = False, format: str = "json") -> dict:
    """Write a whole shapes world into out_dir and return a summary.

    format: "json" (the v1 layout: JSON records + image folders, SFT pictures named
    COCO_train2014_<image>) or "parquet" (the original's current layout: one parquet file per
    split, the pictures' PNG bytes in the rows; the same records). eval_images/ and world.json
    are written either way. Refuses a non-empty out_dir unless overwrite=True; even then only the
    files and folders this function writes are replaced, anything else there is left alone.
    """
    from tqdm.auto import tqdm

    cfg = config if config is not None else ShapesWorldConfig()
    cfg.validate()
    if format not in FORMATS:
        raise ValueError(f"generate_world: format must be one of {FORMATS}, got {format!r}")
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"generate_world: out_dir {str(out)!r} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"generate_world: out_dir {str(out)!r} is not empty; pass overwrite=True (--overwrite) to replace "
                "the shapes-world files in it"
            )
        for name in OUTPUT_DIRS:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    # Held-out pictures first, so training scenes can avoid them pixel for pixel.
    evaluation = eval_records(cfg)
    held_out = {scene_key(scene, cfg.image_size) for r in evaluation for scene in record_scenes(r)}
    demos = demo_images(cfg, held_out)
    pretraining = pretrain_records(cfg, held_out)
    finetuning = sft_records(cfg, held_out)
    by_split = {"pretrain_data.json": pretraining, "sft_data.json": finetuning, "eval_data.json": evaluation}

    jobs = []
    if format == "json":
        for json_name, folder, _ in SPLITS:
            (out / folder).mkdir()
            jobs += [(str(out / folder / stored_image_name(folder, name)), scene, cfg.image_size,
                      cfg.png_compress_level)
                     for r in by_split[json_name] for name, scene in zip(record_images(r), record_scenes(r))]
    (out / "eval_images").mkdir()
    jobs += [(str(out / "eval_images" / d["file"]), d["scene"], cfg.image_size, cfg.png_compress_level) for d in demos]
    n_pictures = len(jobs) + (0 if format == "json" else sum(
        len(record_scenes(r)) for records in by_split.values() for r in records))

    workers = cfg.workers or usable_cores()
    bar = tqdm(total=n_pictures, desc="shapes world: rendering", unit="img", disable=not progress)
    serial = workers == 1 or n_pictures < 256
    with (contextlib.nullcontext() if serial else multiprocessing.get_context().Pool(workers)) as pool:
        if serial:
            for job in jobs:
                _render_job(job)
                bar.update()
        else:
            for _ in pool.imap_unordered(_render_job, jobs, chunksize=64):
                bar.update()
        if format == "parquet":
            for json_name, _, parquet_name in SPLITS:
                _write_parquet_split(out / parquet_name, by_split[json_name], cfg, pool, bar)
    bar.close()

    if format == "json":
        _write_json_atomic(out / "pretrain_data.json", pretraining)
        _write_json_atomic(out / "sft_data.json", finetuning)
        _write_json_atomic(out / "eval_data.json", evaluation)
    settings = asdict(cfg)
    settings.pop("workers")  # how fast it was made is not part of what was made
    if settings["relation_answers"] == "verdict":  # worlds written before the setting existed read the same
        del settings["relation_answers"]
    world = {
        "version": SHAPES_WORLD_VERSION,
        "config": settings,
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "sizes": list(SIZES),
        "positions": list(POSITIONS),
        "answer_types": list(cfg.question_types),
        "colour_rgb": {k: list(v) for k, v in COLOUR_RGB.items()},
        "background_rgb": list(BACKGROUND_RGB),
        "size_pixels_at_224": SIZE_PIXELS,
        "eval_images": demos,
    }
    if format != "json":  # (the JSON layout's world.json stays as it always was)
        world["format"] = format
    _write_json_atomic(out / "world.json", world)  # written last: its presence means the world is complete

    eval_counts = {k: sum(r["answer_type"] == k for r in evaluation) for k in cfg.question_types}
    return {
        "out_dir": str(out),
        "seed": cfg.seed,
        "n_pretrain": len(pretraining),
        "n_sft": len(finetuning),
        "n_sft_turns": sum(len(r["answer_types"]) for r in finetuning),
        "n_eval": len(evaluation),
        "n_eval_images": len(demos),
        "eval_answer_types": eval_counts,
        "n_images": n_pictures,
        "format": format,
        "seconds": round(time.perf_counter() - start, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    defaults = ShapesWorldConfig()
    p = argparse.ArgumentParser(prog="python -m minimind_v.data.shapes",
                                description="Generate a synthetic shapes-world dataset in the MiniMind-V layout.")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent unless --overwrite)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--n-pretrain", type=int, default=defaults.n_pretrain)
    p.add_argument("--n-sft", type=int, default=defaults.n_sft)
    p.add_argument("--n-eval", type=int, default=defaults.n_eval)
    p.add_argument("--n-eval-images", type=int, default=defaults.n_eval_images)
    p.add_argument("--image-size", type=int, default=defaults.image_size)
    p.add_argument("--workers", type=int, default=defaults.workers, help="render processes (0 = one per core)")
    p.add_argument("--format", choices=FORMATS, default="json",
                   help="json: the v1 layout (JSON records + image folders); parquet: the original's current "
                        "layout (pretrain_i2t.parquet, sft_i2t.parquet, eval_i2t.parquet)")
    p.add_argument("--question-types", default=None,
                   help=f"comma-separated kinds of question (default: {','.join(defaults.question_types)}); "
                        f"any of {', '.join(ANSWER_TYPES + EXTRA_ANSWER_TYPES + (TWO_PICTURES,))}")
    p.add_argument("--relation-answers", choices=RELATION_ANSWERS, default=defaults.relation_answers,
                   help="relation questions answered by the verdict alone; worked, ordered: where the named "
                        "objects are, then the verdict; regions: the anchor's place, the rows or columns the "
                        "relation points to, then the verdict")
    p.add_argument("--overwrite", action="store_true", help="replace the shapes-world files in a non-empty --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = ShapesWorldConfig(seed=args.seed, n_pretrain=args.n_pretrain, n_sft=args.n_sft, n_eval=args.n_eval,
                            n_eval_images=args.n_eval_images, image_size=args.image_size, workers=args.workers,
                            relation_answers=args.relation_answers)
    if args.question_types:
        cfg.question_types = tuple(k.strip() for k in args.question_types.split(",") if k.strip())
    try:
        s = generate_world(args.out, cfg, progress=not args.no_progress, overwrite=args.overwrite,
                           format=args.format)
    except (FileExistsError, NotADirectoryError, ValueError) as e:
        p.error(str(e))  # a one-line message and exit status 2, not a traceback
    print(f"shapes world (seed {s['seed']}): {s['n_pretrain']} pretrain, {s['n_sft']} sft ({s['n_sft_turns']} turns), "
          f"{s['n_eval']} eval, {s['n_eval_images']} eval images -> {s['out_dir']} in {s['seconds']:.1f} s")
    return s


if __name__ == "__main__":
    main()
