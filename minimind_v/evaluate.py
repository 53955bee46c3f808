"""How much did the model learn? Exact-match accuracy on held-out questions, per answer type.

    python -m minimind_v.evaluate --model runs/default/sft --data runs/default/world

prints a table (with the text-only baseline: the same model, the same prompts, no picture)
and writes the figures as JSON. Works for any generated world, not only the training one.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data.datasets import read_records
from .data.images import load_image
from .inference import VLMBundle, answer, load_vlm

EVAL_JSON, EVAL_IMAGES = "eval_data.json", "eval_data_images"
DEMO_IMAGES = "eval_images"
CAPTION_PROMPT = "Describe this picture briefly."
DEMO_QUESTIONS = ("How many objects are there?", "What shape is in the center?")


def normalise(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation: 'Top left.' == 'top left'."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(" .!")


def evaluate_vqa(
    bundle: VLMBundle,
    data_dir: str | Path,
    json_name: str = EVAL_JSON,
    image_dir: str = EVAL_IMAGES,
    batch_size: int = 64,
    limit: int | None = None,
    with_image: bool = True,
    progress: bool = True,
) -> dict:
    """Greedy answers to every held-out question; accuracy overall and per ``answer_type``.

    ``with_image=False`` is the text-only baseline: the same prompts, placeholders left empty.
    """
    data_dir = Path(data_dir)
    records = read_records(data_dir / json_name)[:limit]
    hits, counts, rows = defaultdict(int), defaultdict(int), []
    start = time.perf_counter()
    for lo in tqdm(range(0, len(records), batch_size), desc="evaluating" + ("" if with_image else " (no image)"),
                   disable=not progress):
        chunk = records[lo : lo + batch_size]
        questions = [r["conversations"][0]["value"] for r in chunk]
        images = [load_image(data_dir / image_dir / r["image"]) for r in chunk] if with_image else None
        predictions = answer(bundle, images, questions)
        for r, q, pred in zip(chunk, questions, predictions):
            truth = r["conversations"][1]["value"]
            kind = r.get("answer_type", "all")
            ok = normalise(pred) == normalise(truth)
            hits[kind] += ok
            counts[kind] += 1
            rows.append({"id": r["id"], "type": kind, "question": q.replace("<image>", "").strip(),
                         "answer": truth, "prediction": pred, "correct": ok})
    seconds = time.perf_counter() - start
    return {
        "overall": sum(hits.values()) / max(1, sum(counts.values())),
        "per_type": {k: hits[k] / counts[k] for k in sorted(counts)},
        "n": sum(counts.values()),
        "answers_per_s": round(len(records) / max(seconds, 1e-9), 1),
        "rows": rows,
    }


def format_table(result: dict, baseline: dict | None = None) -> str:
    """A Markdown table: answer type, questions, accuracy (and the text-only baseline)."""
    head = "| answer type | questions | accuracy |" + (" text-only baseline |" if baseline else "")
    rule = "|---|---:|---:|" + ("---:|" if baseline else "")
    n_per = defaultdict(int)
    for row in result["rows"]:
        n_per[row["type"]] += 1
    lines = [head, rule]
    for kind, acc in result["per_type"].items():
        extra = f" {baseline['per_type'].get(kind, float('nan')):.1%} |" if baseline else ""
        lines.append(f"| {kind} | {n_per[kind]} | {acc:.1%} |{extra}")
    extra = f" **{baseline['overall']:.1%}** |" if baseline else ""
    lines.append(f"| **overall** | {result['n']} | **{result['overall']:.1%}** |{extra}")
    return "\n".join(lines)


def accuracy_by_objects(rows: list[dict], records: list[dict]) -> dict[str, dict[int, float]]:
    """{answer type or "overall": {number of objects in the picture: accuracy}} for answer rows
    (``evaluate_vqa``'s "rows") of shapes-world records, which know their scene. Telling one
    object from two or three is where a VLM has to find the object a question is about."""
    objects = {r["id"]: len(r["scene"]) for r in records if "scene" in r}
    missing = [row["id"] for row in rows if row["id"] not in objects]
    if missing:
        raise ValueError(f"accuracy_by_objects: {len(missing)} answer rows have no record with a scene, e.g. {missing[0]!r}")
    hits, counts = defaultdict(int), defaultdict(int)
    for row in rows:
        for kind in (row["type"], "overall"):
            hits[kind, objects[row["id"]]] += row["correct"]
            counts[kind, objects[row["id"]]] += 1
    table: dict[str, dict[int, float]] = defaultdict(dict)
    for kind, n in sorted(counts, key=lambda k: (k[0] == "overall", k)):
        table[kind][n] = hits[kind, n] / counts[kind, n]
    return dict(table)


def format_objects_table(by_objects: dict[str, dict[int, float]]) -> str:
    """``accuracy_by_objects`` as a Markdown table, one column per number of objects."""
    ns = sorted({n for per_n in by_objects.values() for n in per_n})
    lines = ["| answer type | " + " | ".join(f"{n} object{'s' if n > 1 else ''}" for n in ns) + " |",
             "|---|" + "---:|" * len(ns)]
    for kind, per_n in by_objects.items():
        cells = [f"{per_n[n]:.1%}" if n in per_n else "–" for n in ns]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def demo_table(bundles: dict[str, VLMBundle], image_dir: str | Path,
               prompts: dict[str, list[str]] | None = None) -> list[dict]:
    """The original project's table: each demo image with each model's answers.

    ``prompts`` maps a model's name to its questions (default: a caption request for every
    model, plus the demo questions for those whose name contains "sft").
    """
    paths = sorted(Path(image_dir).glob("*.png"))
    images = [load_image(p) for p in paths]
    table = [{"image": p.name} for p in paths]
    for name, bundle in bundles.items():
        questions = (prompts or {}).get(name) or (
            [CAPTION_PROMPT] + (list(DEMO_QUESTIONS) if "sft" in name else []))
        for q in questions:
            for row, a in zip(table, answer(bundle, images, [q] * len(images))):
                row[f"{name}: {q}"] = a
    return table


def format_demo_table(table: list[dict]) -> str:
    columns = list(table[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in table]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a saved MiniMind-V folder")
    p.add_argument("--data", required=True, help="a dataset folder with eval_data.json + eval_data_images/")
    p.add_argument("--json", default=EVAL_JSON)
    p.add_argument("--images", default=EVAL_IMAGES)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-baseline", action="store_true", help="skip the text-only baseline")
    p.add_argument("--out", default=None, help="JSON file for the figures (default: <model>/eval.json)")
    p.add_argument("--device", default=None)
    ns = p.parse_args(argv)
    torch.manual_seed(0)
    bundle = load_vlm(ns.model, device=ns.device)
    kw = dict(json_name=ns.json, image_dir=ns.images, batch_size=ns.batch_size, limit=ns.limit)
    result = evaluate_vqa(bundle, ns.data, **kw)
    baseline = None if ns.no_baseline else evaluate_vqa(bundle, ns.data, with_image=False, **kw)
    print(format_table(result, baseline))
    out = Path(ns.out) if ns.out else Path(ns.model) / "eval.json"
    figures = {"model": str(ns.model), "data": str(ns.data), "overall": result["overall"],
               "per_type": result["per_type"], "n": result["n"], "answers_per_s": result["answers_per_s"]}
    if baseline:
        figures["text_only_baseline"] = {"overall": baseline["overall"], "per_type": baseline["per_type"]}
    out.write_text(json.dumps({**figures, "rows": result["rows"]}, indent=2), encoding="utf-8")
    print(f"figures written to {out}")
    return figures


if __name__ == "__main__":
    main()
