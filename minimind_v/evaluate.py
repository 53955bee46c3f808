"""How much did the model learn? Exact-match accuracy on held-out questions, per answer type.

    python -m minimind_v.evaluate --model runs/default/sft --data runs/default/world

prints a table (with the text-only baseline: the same model, the same prompts, no picture)
and writes the figures as JSON. Works for any generated world, not only the training one.

Every record is checked as training checks it (data/records.py): a bad record or an unreadable
image stops the evaluation with an error naming the record and the file, or, with
--skip-bad-samples, is left out of the accuracy, counted and listed.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data.images import ImageError, load_image
from .data.records import (TOO_LONG, UNENCODABLE, UNREADABLE_IMAGE, DataError, Skipped, check_record,
                           read_records, skip_summary)
from .inference import DEFAULT_MAX_NEW_TOKENS, LoadedVLM, answer, load_vlm
from .runfiles import atomic_write_json, atomic_write_text
from .tokenizer import IMAGE_TAG

EVAL_JSON, EVAL_IMAGES = "eval_data.json", "eval_data_images"
DEMO_IMAGES = "eval_images"
CAPTION_PROMPT = "Describe this picture briefly."
DEMO_QUESTIONS = ("How many objects are there?", "What shape is in the center?")


def normalise(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation: 'Top left.' == 'top left'."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(" .!")


def evaluate_vqa(
    vlm: LoadedVLM,
    data_dir: str | Path,
    json_name: str = EVAL_JSON,
    image_dir: str = EVAL_IMAGES,
    batch_size: int = 64,
    limit: int | None = None,
    with_image: bool = True,
    progress: bool = True,
    skip_bad_samples: bool = False,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    shuffle_pictures: int | None = None,
    picture_first: bool = True,
) -> dict:
    """Greedy answers of ``vlm`` (``load_vlm``: the model and its processor) to every held-out
    question; accuracy overall and per ``answer_type``.

    ``with_image=False`` is the text-only baseline: the same prompts, placeholders left empty
    (the pictures are still opened, so that both runs leave out the same bad ones).
    A bad record or image raises DataError naming it and the file; ``skip_bad_samples=True``
    leaves it out of the accuracy instead: "skipped" counts them, "skipped_records" lists every
    one ({"id", "kind", "message"}), "skipped_by_kind" counts them per reason.
    ``shuffle_pictures=seed`` is the shuffled-picture baseline: every question is asked about
    another question's picture (a seeded shuffle that leaves no picture in place).
    A question written before its picture is asked with the picture moved in front, as ``answer``
    asks it; ``picture_first=False`` asks every question as written.
    """
    from .data.datasets import resolve_data
    from .data.images import decode_picture
    from .data.parquet import is_placeholder_picture, iter_rows, parse_conversations
    from .data.records import NO_IMAGE_NAME, check_turns, find_image

    # The JSON layout (eval_data.json + eval_data_images/) or the parquet one (eval_i2t.parquet, or
    # --data naming a .parquet file or a folder of shards): pictures as file names or as bytes.
    json_path, folder = resolve_data(data_dir, json_name, image_dir)
    parquet = folder is None
    skipped: list[Skipped] = []

    def refuse(error: DataError) -> None:
        if not skip_bad_samples:
            raise error from None
        skipped.append(Skipped.from_error(error))

    def first_question(messages: list[dict]) -> tuple[str, str]:
        user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        return messages[user]["content"], messages[user + 1]["content"]

    # (id, pictures: a name / bytes, or a list of them, question, answer, answer type) of the usable records
    questions = []
    if parquet:
        for _, row_number, where, rid, row in iter_rows(json_path, limit=limit):
            try:
                turns = parse_conversations(row.get("conversations"), where, rid)
                pictures = row.get("image_bytes")
                several = isinstance(pictures, list)
                listed = pictures if several else [] if pictures is None else [pictures]
                if not listed or (len(listed) == 1 and is_placeholder_picture(listed[0])):
                    raise DataError(f"{where}: no picture to ask about (a text-only row)", NO_IMAGE_NAME, rid)
                messages = check_turns(turns, where, rid, n_images=len(listed), image_tags="at_most_one")
                question, truth = first_question(messages)
                check_prompt_fits(vlm, question, max_new_tokens, where, rid)
            except DataError as err:
                refuse(err)
                continue
            kind = row.get("answer_type") or "all"
            questions.append((rid, pictures, question, truth, kind if isinstance(kind, str) else str(kind)))
    else:
        records = read_records(json_path)[:limit]
        for index, record in enumerate(records):
            try:
                checked = check_record(record, index, json_path, need_image=True, image_dir=folder,
                                       image_tags="at_most_one")
                question, truth = first_question(checked.messages)
                check_prompt_fits(vlm, question, max_new_tokens, f"record {checked.id!r} in {json_path}",
                                  checked.id)
            except DataError as err:
                refuse(err)
                continue
            kind = record.get("answer_type", "all")
            questions.append((checked.id, checked.image, question, truth, kind if isinstance(kind, str) else str(kind)))

    def open_pictures(rid: str, item):
        """A question's picture (PIL), or its list of pictures, from file names or bytes."""
        where = f"record {rid!r} in {json_path}"
        listed = item if isinstance(item, list) else [item]
        opened = []
        for k, one in enumerate(listed):
            try:
                if parquet:
                    opened.append(decode_picture(one, f"picture {k} of {len(listed)}"))
                else:  # found (and confined) again at the read: the folder may have changed since the check
                    opened.append(load_image(find_image(folder, one, where, rid)))
            except ImageError as err:
                label = f"picture {k}" if parquet else f"image {one!r}"
                raise DataError(f"{where}: {label}: {err}", UNREADABLE_IMAGE, rid) from None
        return opened if isinstance(item, list) else opened[0]

    if shuffle_pictures is not None and len(questions) > 1:
        questions = _swap_pictures(questions, shuffle_pictures)
    hits, counts, rows = defaultdict(int), defaultdict(int), []
    start = time.perf_counter()
    for lo in tqdm(range(0, len(questions), batch_size), desc="evaluating" + ("" if with_image else " (no image)"),
                   disable=not progress):
        chunk, pictures = [], []
        for item in questions[lo : lo + batch_size]:
            try:
                pictures.append(open_pictures(item[0], item[1]))
                chunk.append(item)
            except DataError as err:
                refuse(err)
        if not chunk:
            continue
        predictions = answer(vlm, pictures if with_image else None, [item[2] for item in chunk],
                             max_new_tokens=max_new_tokens, picture_first=picture_first)
        for (rid, _, q, truth, kind), pred in zip(chunk, predictions):
            ok = normalise(pred) == normalise(truth)
            hits[kind] += ok
            counts[kind] += 1
            rows.append({"id": rid, "type": kind, "question": q.replace("<image>", "").strip(),
                         "answer": truth, "prediction": pred, "correct": ok})
    seconds = time.perf_counter() - start
    if skipped and not rows:
        raise DataError(f"{json_path}: no question left to evaluate; {skip_summary(skipped, 'question(s)')}")
    return {
        "overall": sum(hits.values()) / max(1, sum(counts.values())),
        "per_type": {k: hits[k] / counts[k] for k in sorted(counts)},
        "n": sum(counts.values()),
        "answers_per_s": round(len(rows) / max(seconds, 1e-9), 1),
        "rows": rows,
        "skipped": len(skipped),
        "skipped_by_kind": dict(Counter(s.kind for s in skipped)),
        "skipped_records": [{"id": s.id, "kind": s.kind, "message": s.message} for s in skipped],
    }


def _swap_pictures(questions: list[tuple], seed: int) -> list[tuple]:
    """Give each question the picture(s) of the next question with as many pictures, in a seeded
    random cycle per picture count: no picture stays (unless a question is the only one with its
    count), and a one-picture question never gets two."""
    order = torch.randperm(len(questions), generator=torch.Generator().manual_seed(seed)).tolist()
    cycles = defaultdict(list)  # picture count -> question indices, in the shuffled order
    for i in order:
        item = questions[i][1]
        cycles[len(item) if isinstance(item, list) else 1].append(i)
    swapped = list(questions)
    for cycle in cycles.values():
        for here, there in zip(cycle, cycle[1:] + cycle[:1]):
            swapped[here] = (*questions[here][:1], questions[there][1], *questions[here][2:])
    return swapped


def check_prompt_fits(vlm: LoadedVLM, question: str, max_new_tokens: int, where: str, rid=None) -> None:
    """DataError unless the question encodes to a prompt that, with its answer, fits the model."""
    model, processor = vlm
    config = model.config
    try:
        ids = processor.question_ids(question)
    except ValueError as err:
        raise DataError(f"{where}: the question cannot be encoded ({err})", UNENCODABLE, rid) from None
    limit = config.max_position_embeddings
    if len(ids) + max_new_tokens > limit:
        raise DataError(f"{where}: the question makes a prompt of {len(ids)} tokens; with up to {max_new_tokens} "
                        f"answer tokens that exceeds the model's max_position_embeddings={limit}", TOO_LONG, rid)


def format_table(result: dict, baseline: dict | None = None) -> str:
    """A Markdown table: answer type, questions, accuracy (and the text-only baseline); a footer
    line says how many questions were skipped as bad, for what, and names the first few."""
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
    if result.get("skipped"):
        skipped = [Skipped(**s) for s in result["skipped_records"]]
        lines += ["", skip_summary(skipped, "question(s), not in the accuracy")]
    return "\n".join(lines)


def accuracy_by(rows: list[dict], records: list[dict], group, what: str = "a group") -> dict[str, dict]:
    """{answer type or "overall": {group: accuracy}} for answer rows (``evaluate_vqa``'s "rows"),
    grouping each row by ``group(record)`` of its record (None: the record has no such group)."""
    groups = {r["id"]: group(r) for r in records if isinstance(r, dict) and group(r) is not None}
    missing = [row["id"] for row in rows if row["id"] not in groups]
    if missing:
        raise ValueError(f"{len(missing)} answer rows have no record with {what}, e.g. {missing[0]!r}")
    hits, counts = defaultdict(int), defaultdict(int)
    for row in rows:
        for kind in (row["type"], "overall"):
            hits[kind, groups[row["id"]]] += row["correct"]
            counts[kind, groups[row["id"]]] += 1
    table: dict[str, dict] = defaultdict(dict)
    for kind, g in sorted(counts, key=lambda k: (k[0] == "overall", k)):
        table[kind][g] = hits[kind, g] / counts[kind, g]
    return dict(table)


def accuracy_by_objects(rows: list[dict], records: list[dict]) -> dict[str, dict[int, float]]:
    """``accuracy_by`` the number of objects in the picture, for shapes-world records (which know
    their scene). Telling one object from two or three is where a VLM has to find the object a
    question is about."""
    try:
        return accuracy_by(rows, records, lambda r: len(r["scene"]) if "scene" in r else None, "a scene")
    except ValueError as err:
        raise ValueError(f"accuracy_by_objects: {err}") from None


def accuracy_by_combination(rows: list[dict], records: list[dict]) -> dict[str, dict[str, float]]:
    """``accuracy_by`` "seen" / "unseen": pictures with or without a colour-shape pair that no
    training picture showed (a world made with held-out pairs)."""
    return accuracy_by(rows, records, lambda r: r.get("combination"), "a seen/unseen combination")


def picture_layout(record: dict) -> str | None:
    """"picture first" when the record's first turn opens with its picture ("<image>\nWhat colour
    ..."), "question first" when the picture follows the question; None without a picture there."""
    turns = record.get("conversations") or [{}]
    text = turns[0].get("value") if isinstance(turns[0], dict) else None
    if not isinstance(text, str) or IMAGE_TAG not in text:
        return None
    return "picture first" if text.lstrip().startswith(IMAGE_TAG) else "question first"


def accuracy_by_layout(rows: list[dict], records: list[dict]) -> dict[str, dict[str, float]]:
    """``accuracy_by`` ``picture_layout``. Under the causal mask the two are different inputs: with
    the picture first no patch sees the question; with the question first every patch does, and the
    answer must reach back past the 50 patches for the question."""
    return accuracy_by(rows, records, picture_layout, "a picture in its first turn")


# The layout table's columns: (figures key, picture_layout group) of each.
LAYOUT_COLUMNS = {"picture before the question": ("by_layout", "picture first"),
                  "question before the picture, as written": ("as_written", "question first"),
                  "the same, picture moved in front": ("by_layout", "question first")}


def layout_split(figures: dict) -> dict[str, dict[str, float]]:
    """{answer type: {LAYOUT_COLUMNS column: accuracy}} from an evaluation's figures
    (``evaluate_run``'s results): what moving the picture in front gives the questions written
    before it. Questions written picture-first are the same input either way."""
    split = {"by_layout": figures["by_layout"], "as_written": figures["as_written"]["by_layout"]}
    return {kind: {column: split[key][kind][group] for column, (key, group) in LAYOUT_COLUMNS.items()
                   if group in split[key].get(kind, {})}
            for kind in figures["by_layout"]}


def format_objects_table(by_objects: dict[str, dict], label=None) -> str:
    """``accuracy_by_objects`` (or any ``accuracy_by``) as a Markdown table, one column per group."""
    label = label or (lambda n: f"{n} object{'s' if n > 1 else ''}")
    ns = sorted({n for per_n in by_objects.values() for n in per_n})
    lines = ["| answer type | " + " | ".join(label(n) for n in ns) + " |", "|---|" + "---:|" * len(ns)]
    for kind, per_n in by_objects.items():
        cells = [f"{per_n[n]:.1%}" if n in per_n else "–" for n in ns]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_baselines_table(result: dict, baselines: dict[str, dict]) -> str:
    """Accuracy per answer type next to each baseline ({name: {"overall", "per_type"}})."""
    n_per = Counter(row["type"] for row in result["rows"])
    lines = ["| answer type | questions | accuracy | " + " | ".join(baselines) + " |",
             "|---|---:|---:|" + "---:|" * len(baselines)]
    for kind, acc in result["per_type"].items():
        cells = [f"{b['per_type'].get(kind, float('nan')):.1%}" for b in baselines.values()]
        lines.append(f"| {kind} | {n_per[kind]} | {acc:.1%} | " + " | ".join(cells) + " |")
    cells = [f"**{b['overall']:.1%}**" for b in baselines.values()]
    lines.append(f"| **overall** | {result['n']} | **{result['overall']:.1%}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def demo_table(models: dict[str, LoadedVLM], image_dir: str | Path,
               prompts: dict[str, list[str]] | None = None) -> list[dict]:
    """The original project's table: each demo image with each model's answers.

    ``prompts`` maps a model's name to its questions (default: a caption request for every
    model, plus the demo questions for those whose name contains "sft").
    """
    paths = sorted(Path(image_dir).glob("*.png"))
    images = [load_image(p) for p in paths]
    table = [{"image": p.name} for p in paths]
    for name, vlm in models.items():
        questions = (prompts or {}).get(name) or (
            [CAPTION_PROMPT] + (list(DEMO_QUESTIONS) if "sft" in name else []))
        for q in questions:
            for row, a in zip(table, answer(vlm, images, [q] * len(images))):
                row[f"{name}: {q}"] = a
    return table


def format_demo_table(table: list[dict]) -> str:
    columns = list(table[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in table]
    return "\n".join(lines)


def evaluate_run(run: Path, r) -> dict:
    """Held-out accuracy per answer type next to its baselines (no picture, another question's
    picture, the training set's majority answer, chance), the seen/unseen split when the world
    holds pairs out, and the demo table: the recipe's evaluation stage for ``run`` and recipe
    ``r``, written to its eval/ folder."""
    from . import baselines
    from .recipe import stage_dir  # (the recipe imports this module: import here, not at the top)

    world = stage_dir(run, "world")
    sft = load_vlm(stage_dir(run, "sft"))
    result = evaluate_vqa(sft, world, limit=r.eval_limit)
    text_only = evaluate_vqa(sft, world, limit=r.eval_limit, with_image=False)
    shuffled = evaluate_vqa(sft, world, limit=r.eval_limit, shuffle_pictures=r.seed)
    held_out = read_records(world / EVAL_JSON)[:r.eval_limit]
    training = read_records(world / "sft_data.json")
    summary = lambda res: {"overall": res["overall"], "per_type": res["per_type"]}  # noqa: E731
    compared = {"text only": summary(text_only), "shuffled picture": summary(shuffled),
                "majority answer": baselines.majority(training, held_out), "chance": baselines.chance(held_out)}
    pretrain = load_vlm(stage_dir(run, "pretrain"))
    demo = demo_table({"pretrain": pretrain, "sft": sft}, world / DEMO_IMAGES)
    out = stage_dir(run, "eval")
    out.mkdir(parents=True, exist_ok=True)
    table = format_baselines_table(result, compared)
    figures = {"overall": result["overall"], "per_type": result["per_type"], "n": result["n"],
               "text_only_baseline": compared["text only"], "baselines": compared,
               "answers_per_s": result["answers_per_s"], "demo": demo}
    if all(picture_layout(rec) for rec in held_out):  # and again as written: what moving the picture gives
        as_written = evaluate_vqa(sft, world, limit=r.eval_limit, picture_first=False)
        figures["by_layout"] = accuracy_by_layout(result["rows"], held_out)
        figures["as_written"] = {"overall": as_written["overall"], "per_type": as_written["per_type"],
                                 "by_layout": accuracy_by_layout(as_written["rows"], held_out)}
    sections = [table]
    if any("combination" in rec for rec in held_out):
        figures["by_combination"] = accuracy_by_combination(result["rows"], held_out)
        sections.append(format_objects_table(figures["by_combination"], label=lambda g: f"{g} combinations"))
    if "by_layout" in figures:
        sections.append(format_objects_table(layout_split(figures), label=lambda column: column))
    sections.append(format_demo_table(demo))
    atomic_write_text(out / "table.md", "\n\n".join(sections) + "\n")
    atomic_write_json(out / "answers.json", result["rows"], indent=1)
    atomic_write_json(out / "results.json", figures)
    print(table)
    return figures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a saved MiniMind-V folder")
    p.add_argument("--data", required=True, help="a dataset folder with eval_data.json + eval_data_images/")
    p.add_argument("--json", default=EVAL_JSON)
    p.add_argument("--images", default=EVAL_IMAGES)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-baseline", action="store_true", help="skip the text-only baseline")
    p.add_argument("--as-written", action="store_true",
                   help="ask each question with its picture where it is written (default: moved in front)")
    p.add_argument("--out", default=None, help="JSON file for the figures (default: <model>/eval.json)")
    p.add_argument("--device", default=None)
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="leave bad records and unreadable images out of the accuracy, count and list them")
    ns = p.parse_args(argv)
    torch.manual_seed(0)
    vlm = load_vlm(ns.model, device=ns.device)
    kw = dict(json_name=ns.json, image_dir=ns.images, batch_size=ns.batch_size, limit=ns.limit,
              skip_bad_samples=ns.skip_bad_samples, picture_first=not ns.as_written)
    result = evaluate_vqa(vlm, ns.data, **kw)
    baseline = None if ns.no_baseline else evaluate_vqa(vlm, ns.data, with_image=False, **kw)
    print(format_table(result, baseline))
    out = Path(ns.out) if ns.out else Path(ns.model) / "eval.json"
    figures = {"model": str(ns.model), "data": str(ns.data), "overall": result["overall"],
               "per_type": result["per_type"], "n": result["n"], "answers_per_s": result["answers_per_s"],
               "skipped": result["skipped"], "skipped_by_kind": result["skipped_by_kind"]}
    if baseline:
        figures["text_only_baseline"] = {"overall": baseline["overall"], "per_type": baseline["per_type"]}
    payload = {**figures, "skipped_records": result["skipped_records"], "rows": result["rows"]}
    atomic_write_text(out, json.dumps(payload, indent=2))
    print(f"figures written to {out}" + (" (every skipped record listed under 'skipped_records')"
                                         if result["skipped"] else ""))
    return figures


if __name__ == "__main__":
    main()
