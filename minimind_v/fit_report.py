"""Not fitted, or not generalised? The SFT model's answers to its own training turns beside its
answers to the held-out questions.

A type answered worse on held-out questions than on the turns SFT trained on is a gap of
generalisation: the model fitted its data and does not carry it over. A type answered as badly on
its own training turns is not fitted at all: the model never learned it, even for the pictures
and questions it met. Each training turn (one-picture records; ``--per-type`` of each answer type,
a seeded draw) is asked alone, with its picture in front, as the held-out questions are asked.
Relation answers are also split by what the truth says: "nothing", "no", "yes", or an object.

    python -m minimind_v.fit_report runs/world2_seed4 [more run folders ...] [--record FILE]

It reads a run's world (sft_data.json, its pictures), its SFT model (sft/) and its held-out
answers (eval/answers.json).
"""

from __future__ import annotations

import argparse
import random
import tempfile
from collections import Counter
from pathlib import Path

from .data.records import read_records
from .data.shapes_records import RELATION_TRUTHS, relation_truth
from .evaluate import evaluate_vqa
from .relation_report import read_run_answers
from .runfiles import atomic_write_json

def training_turns(records: list[dict], per_type: int | None, seed: int = 0) -> list[dict]:
    """One single-turn record per question of the one-picture ``records`` (its answer type from
    ``answer_types``, the picture's tag put after a question that has none, as held-out questions
    carry it), at most ``per_type`` of each type, drawn with ``seed`` (None: all, in order); in
    type order."""
    by_type: dict[str, list[dict]] = {}
    for i, record in enumerate(records):
        try:
            image, turns, kinds = record.get("image"), record["conversations"], record.get("answer_types") or []
            values = [turn["value"] for turn in turns[:2 * len(kinds)]]
        except (AttributeError, KeyError, TypeError):
            raise ValueError(f"SFT record {i}: not a shapes-world record (conversations of "
                             "{'from', 'value'} turns, answer_types)") from None
        if len(values) < 2 * len(kinds):
            raise ValueError(f"SFT record {i} ({record.get('id', '?')}): {len(kinds)} answer types for "
                             f"{len(turns) // 2} question(s)")
        if not isinstance(image, str):
            continue  # two pictures: a question of another kind
        for k, kind in enumerate(kinds):
            question, truth = values[2 * k], values[2 * k + 1]
            if "<image>" not in question:
                question += "\n<image>"
            by_type.setdefault(kind, []).append({
                "id": f"{record['id']}#{k}", "image": record["image"], "answer_type": kind,
                "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": truth}]})
    rng = random.Random(seed)
    return [turn for kind in sorted(by_type) for turn in
            (by_type[kind] if per_type is None else rng.sample(by_type[kind], min(per_type, len(by_type[kind]))))]


def relation_answer_mix(records: list[dict]) -> dict[str, int]:
    """How many relation turns of the one-picture ``records`` give each RELATION_TRUTHS answer."""
    mix = Counter(relation_truth(t["conversations"][1]["value"]) for t in training_turns(records, None)
                  if t["answer_type"] == "relation")
    return {t: mix[t] for t in RELATION_TRUTHS}


def accuracy(rows: list[dict], key) -> dict[str, list[int]]:
    """{group: [right, asked]} of ``rows`` (each with "correct"), grouped by ``key(row)``."""
    out: dict[str, list[int]] = {}
    for row in rows:
        cell = out.setdefault(key(row), [0, 0])
        cell[0] += bool(row["correct"])
        cell[1] += 1
    return out


def report_run(run: Path, per_type: int, seed: int = 0) -> dict:
    """{"per_type": {type: {"train": [right, asked], "held": [...]}}, "relation": {truth: {...}},
    "sft_relation_answers": {truth: how many of SFT's relation turns give it}}."""
    held, _ = read_run_answers(run, ("id",), "fit_report")
    records = read_records(run / "world" / "sft_data.json")
    turns = training_turns(records, per_type, seed)
    from .inference import load_vlm

    with tempfile.TemporaryDirectory() as folder:
        atomic_write_json(Path(folder) / "turns.json", turns)
        trained = evaluate_vqa(load_vlm(run / "sft"), folder, json_name="turns.json",
                               image_dir=str((run / "world" / "sft_images").resolve()), progress=False)["rows"]
    splits = {"train": trained, "held": held}
    per_kind = {split: accuracy(rows, lambda r: r["type"]) for split, rows in splits.items()}
    relation = {split: accuracy([r for r in rows if r["type"] == "relation"],
                                lambda r: relation_truth(r["answer"])) for split, rows in splits.items()}
    return {"per_type": {k: {s: per_kind[s].get(k, [0, 0]) for s in splits}
                         for k in sorted(set(per_kind["held"]) | set(per_kind["train"]))},
            "relation": {t: {s: relation[s].get(t, [0, 0]) for s in splits} for t in RELATION_TRUTHS},
            "sft_relation_answers": relation_answer_mix(records)}


def summed(reports: list[dict]) -> dict:
    """The reports' counts added up, cell by cell."""
    out: dict = {"sft_relation_answers": dict(sum((Counter(r["sft_relation_answers"]) for r in reports), Counter()))}
    for report in reports:
        for table, rows in ((k, v) for k, v in report.items() if k != "sft_relation_answers"):
            for row, cells in rows.items():
                for split, (right, asked) in cells.items():
                    cell = out.setdefault(table, {}).setdefault(row, {}).setdefault(split, [0, 0])
                    cell[0] += right
                    cell[1] += asked
    return out


def percent(cell) -> str:
    right, asked = cell
    return f"{100 * right / asked:.1f} ({right}/{asked})" if asked else "–"


def tables_markdown(report: dict) -> str:
    lines = ["| answer type | its own training turns | held-out questions |", "|---|---:|---:|"]
    lines += [f"| {k} | {percent(c['train'])} | {percent(c['held'])} |" for k, c in report["per_type"].items()]
    lines += ["", "| relation, the true answer | its own training turns | held-out questions |", "|---|---:|---:|"]
    lines += [f"| {t} | {percent(c['train'])} | {percent(c['held'])} |" for t, c in report["relation"].items()]
    mix = report["sft_relation_answers"]
    total = max(sum(mix.values()), 1)
    lines += ["", "SFT's relation turns (one-picture records) answer: " + ", ".join(
        f"{t} {100 * mix.get(t, 0) / total:.1f}%" for t in RELATION_TRUTHS) + f" (of {sum(mix.values())})"]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders of world 2 (world/, sft/, eval/)")
    p.add_argument("--per-type", type=int, default=300, help="training turns asked per answer type")
    p.add_argument("--seed", type=int, default=0, help="the draw of training turns")
    p.add_argument("--record", type=Path, default=None, help="write the counts here (JSON)")
    args = p.parse_args(argv)
    reports = {}
    for run in args.runs:
        try:
            reports[str(run)] = report_run(run, args.per_type, args.seed)
        except (OSError, ValueError) as error:
            raise SystemExit(f"fit_report: {run}: {error}") from None
        print(f"{run}\n\n{tables_markdown(reports[str(run)])}\n")
    if len(reports) > 1:
        print(f"all {len(reports)} together\n\n{tables_markdown(summed(list(reports.values())))}\n")
    if args.record:
        atomic_write_json(args.record, {"per_type": args.per_type, "seed": args.seed, "runs": reports})


if __name__ == "__main__":
    main()
