"""Where SFT's questions put the picture, and what the model then answers in each layout.

    python -m minimind_v.picture_layout --run runs/world2_seed2 --layout picture-first --out runs/layout_picture
    python -m minimind_v.picture_layout --run runs/world2_seed2 --layout question-first --out runs/layout_question
    python -m minimind_v.picture_layout --run runs/world2_seed2 --layout picture-first --ask-only --out runs/asked_picture

The shapes world asks half of its questions with the picture first (``<image>\\nWhat colour is the
circle?``) and half with the question first (``What colour is the circle?\\n<image>``); only an SFT
record's first turn holds the picture, so later turns always come after it. This takes a finished
run (``--run``), links its world, tiny CLIP, text LM and pretraining into ``--out``, rewrites the
first turn of every SFT record into one layout, trains SFT again with the run's own recipe command
and evaluates it on the run's held-out questions, which keep both layouts. The table gives
accuracy per answer type and layout, beside the run's own model (SFT on both layouts). Here every
question is asked as written (``picture_first=False``), since the layout is what is measured.

``--ask-only`` trains nothing: the run's own model is asked every held-out question in the layout.
Asked picture first, this is what the evaluation now does by default
(``model.chat_inputs.picture_in_front``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .data.records import read_records
from .evaluate import EVAL_IMAGES, EVAL_JSON, accuracy_by_layout, evaluate_vqa
from .inference import load_vlm
from .model.chat_inputs import picture_in_front
from .recipe import Recipe, stage_commands, stage_dir
from .runfiles import atomic_write_json
from .tokenizer import IMAGE_TAG

LAYOUTS = ("picture-first", "question-first")
LINKED = ("world", "clip", "tokenizer", "llm", "pretrain")  # what SFT is built from, as it is


def in_layout(text: str, layout: str) -> str:
    """A one-picture question turn with its picture moved before ("picture-first") or after the question."""
    if text.count(IMAGE_TAG) != 1:
        raise ValueError(f"a turn with one {IMAGE_TAG!r} tag is needed, got {text!r}")
    in_front = picture_in_front(text)  # "<image>\n" and the question's words: the processor's own move
    if layout == "picture-first":
        return in_front
    return in_front.removeprefix(IMAGE_TAG + "\n") + "\n" + IMAGE_TAG


def relaid_records(records: list[dict], layout: str) -> list[dict]:
    """SFT records with each one-picture record's first turn in ``layout``; the rest as they were."""
    out = []
    for r in records:
        turns = r["conversations"]
        if isinstance(r.get("image"), str) and IMAGE_TAG in turns[0]["value"]:
            r = {**r, "conversations": [{**turns[0], "value": in_layout(turns[0]["value"], layout)}, *turns[1:]]}
        out.append(r)
    return out


def recorded_recipe(run: Path) -> Recipe:
    """The recipe a run folder was trained with (its recipe.json), JSON lists back to tuples."""
    record = json.loads((run / "recipe.json").read_text(encoding="utf-8"))["recipe"]
    as_tuple = lambda v: tuple(as_tuple(x) for x in v) if isinstance(v, list) else v  # noqa: E731
    return Recipe(**{k: v if k == "extra" else as_tuple(v) for k, v in record.items()})


def link_tree(source: Path, target: Path) -> None:
    """``target`` as a tree of hard links to ``source``'s files (nothing is copied or written to)."""
    shutil.copytree(source, target, copy_function=os.link)


def _check(layout: str, out: Path) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if out.exists():
        raise FileExistsError(f"{out} exists: give a new folder")


def _asked_as_written(run: Path, held_out: list[dict]) -> dict:
    """The run's own model on its held-out questions, each asked with the picture where it is
    written: ``evaluate_run``'s "as_written" split, or, from an evaluation made before questions were
    asked picture first, its answers."""
    evaluation = stage_dir(run, "eval")
    results = json.loads((evaluation / "results.json").read_text(encoding="utf-8"))
    if "as_written" in results:
        return results["as_written"]["by_layout"]
    return accuracy_by_layout(json.loads((evaluation / "answers.json").read_text(encoding="utf-8")), held_out)


def _figures(label: str, layout: str, run: Path, result: dict, held_out: list[dict], out: Path) -> dict:
    figures = {"label": label, "layout": layout, "run": str(run), "overall": result["overall"],
               "per_type": result["per_type"], "by_layout": accuracy_by_layout(result["rows"], held_out),
               "run_by_layout": _asked_as_written(run, held_out)}
    atomic_write_json(out / "picture_layout.json", figures)
    return figures


def run_layout(run: Path, layout: str, out: Path, sft_steps: int | None = None) -> dict:
    _check(layout, out)
    recipe = recorded_recipe(run)
    for stage in LINKED:
        link_tree(stage_dir(run, stage), stage_dir(out, stage))
    world = stage_dir(out, "world")
    records = read_records(world / "sft_data.json")
    (world / "sft_data.json").unlink()  # a link to the run's own file: replaced, never written through
    atomic_write_json(world / "sft_data.json", relaid_records(records, layout))
    module, argv = stage_commands(out, recipe)["sft"]
    argv = argv + recipe.extra.get("sft", []) + (["--steps", str(sft_steps)] if sft_steps else [])
    subprocess.run([sys.executable, "-m", module, *argv], check=True)
    held_out = read_records(world / EVAL_JSON)
    result = evaluate_vqa(load_vlm(stage_dir(out, "sft")), world, picture_first=False)
    return _figures(f"SFT {layout}", layout, run, result, held_out, out)


def ask_in_layout(run: Path, layout: str, out: Path) -> dict:
    """No training: the run's own model asked every held-out question in ``layout`` (``out`` gets
    the relaid questions and links to their pictures). Accuracy is split by each question's layout
    as the held-out set asks it."""
    _check(layout, out)
    world = stage_dir(run, "world")
    held_out = read_records(world / EVAL_JSON)
    link_tree(world / EVAL_IMAGES, out / EVAL_IMAGES)
    atomic_write_json(out / EVAL_JSON, relaid_records(held_out, layout))
    result = evaluate_vqa(load_vlm(stage_dir(run, "sft")), out, picture_first=False)
    return _figures(f"asked {layout}", layout, run, result, held_out, out)


def table_markdown(figures: dict) -> str:
    groups = ("picture first", "question first")
    heads = [f"{figures['label']}: held-out {g}" for g in groups] + [f"as recorded: {g}" for g in groups]
    lines = ["| answer type | " + " | ".join(heads) + " |", "|---|" + "---:|" * 4]
    for kind, split in figures["by_layout"].items():
        cells = [split.get(g) for g in groups] + [figures["run_by_layout"].get(kind, {}).get(g) for g in groups]
        lines.append(f"| {kind} | " + " | ".join("–" if c is None else f"{100 * c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="a finished recipe run folder")
    p.add_argument("--layout", required=True, choices=LAYOUTS)
    p.add_argument("--out", required=True, type=Path, help="a new folder for the relaid run")
    p.add_argument("--sft-steps", type=int, default=None, help="fewer SFT steps than the recipe's (a quick look)")
    p.add_argument("--ask-only", action="store_true",
                   help="no training: ask the run's own model every held-out question in --layout")
    args = p.parse_args(argv)
    figures = (ask_in_layout(args.run, args.layout, args.out) if args.ask_only
               else run_layout(args.run, args.layout, args.out, args.sft_steps))
    print(table_markdown(figures))
    return figures


if __name__ == "__main__":
    main()
