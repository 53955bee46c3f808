"""How a run answered its held-out count questions, split by what they count.

A count question counts every object, a size ("small objects"), or a shape or a colour
("crosses", "red objects"). Most shapes and colours occur once in a picture, so most questions of
the last kind answer "one", even in pictures of two or three objects; a model that guesses from
the question can score well on them without counting. This report finds, from the question's
words and the scene, what is counted and how many objects fit, and splits the answers: every
object; a size; a shape or colour in a one-object picture; in a busier picture, one object fits;
several fit and they look alike otherwise (two red crosses); several fit and they differ in the
other attribute (a red cross and a blue one, counted as crosses). Per group: questions, right
answers, and how many answers say "one".

    python -m minimind_v.count_report runs/world2_seed3 [more run folders ...]
    python -m minimind_v.count_report --sft [--count-shared] runs/world2_seed3

It reads a run's world/eval_data.json (each question's scene) and eval/answers.json; given several
runs, it prints each run's table and then all together. With ``--sft`` it splits the count turns
of the run's SFT records instead (world/sft_data.json, one-picture records), the answers being
the truth: what SFT showed the model; ``--count-shared`` first asks them as the SFT flag of that
name does, with the run's seed (its recipe.json).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from .data.shapes_answers import parse_question
from .data.shapes_records import count_shared
from .data.shapes_scenes import NUMBER_WORDS
from .evaluate import normalise
from .relation_report import print_each_and_together, read_rows, read_run_answers

GROUPS = ("every object", "a size", "a shape or colour, one-object picture",
          "a shape or colour, busier picture, one fits", "a shape or colour, several fit, alike otherwise",
          "a shape or colour, several fit, differing otherwise")
OTHER = {"shape": "colour", "colour": "shape"}  # what two objects of one shape (colour) may differ in


def count_group(question: str, scene: list[dict]) -> str:
    """The group of GROUPS a count question falls in, from what its words count in the scene."""
    _, constraints = parse_question(question)
    if not constraints:
        return GROUPS[0]
    if "size" in constraints:
        return GROUPS[1]
    if len(scene) == 1:
        return GROUPS[2]
    (kind, value), = constraints.items()
    fits = [o for o in scene if o[kind] == value]
    if len(fits) < 2:
        return GROUPS[3]
    return GROUPS[4] if len({o[OTHER[kind]] for o in fits}) == 1 else GROUPS[5]


def count_counts(answers: list[dict], records: dict[str, dict]) -> dict[str, Counter]:
    """Per group: 'questions', 'right', 'says one'. ``records`` maps a question's id to its held-out
    record (with its 'scene')."""
    counts = {group: Counter() for group in GROUPS}
    for row in answers:
        if row["type"] != "count":
            continue
        if row["id"] not in records:
            raise ValueError(f"count_report: answer {row['id']!r} has no held-out record of that id")
        c = counts[count_group(row["question"], records[row["id"]]["scene"])]
        c["questions"] += 1
        c["right"] += row["correct"]
        c["says one"] += normalise(row["prediction"]) == NUMBER_WORDS[1]
    return counts


def sft_counts(records: list[dict]) -> dict[str, Counter]:
    """The same split for the count turns of SFT records, their answers taken as given: 'questions',
    'right' (all of them) and 'says one'."""
    rows = []
    for record in records:
        if "scene" not in record:  # two pictures: no one scene to count in
            continue
        turns = record["conversations"]
        for t, kind in enumerate(record.get("answer_types", [])):
            if kind == "count":
                rows.append({"id": record["id"], "type": kind, "question": turns[2 * t]["value"],
                             "prediction": turns[2 * t + 1]["value"], "correct": True})
    return count_counts(rows, {r["id"]: r for r in records if "scene" in r})


def table_markdown(counts: dict[str, Counter]) -> str:
    def cell(n: int, asked: int) -> str:
        return f"{100 * n / asked:.1f}% ({n} / {asked})" if asked else "-"

    lines = ["| counting | right | says \"one\" |", "|---|---:|---:|"]
    for group in GROUPS:
        c = counts[group]
        lines.append(f"| {group} | {cell(c['right'], c['questions'])} | {cell(c['says one'], c['questions'])} |")
    return "\n".join(lines)


def read_run(run: Path) -> tuple[list[dict], dict[str, dict]]:
    """(answers, held-out records by id) of a run folder; ValueError naming the file that cannot be
    read or is not what it should be."""
    return read_run_answers(run, ("id", "scene"), "count_report")


def read_sft(run: Path, shared: bool) -> list[dict]:
    """A run's SFT records, asked as ``--count-shared`` asks them where ``shared``."""
    path, recipe = run / "world" / "sft_data.json", run / "recipe.json"
    try:
        records = read_rows(path, ("id", "conversations"), "a world's SFT records")
    except ValueError as error:
        raise ValueError(f"count_report: {error}") from None
    if not shared:
        return records
    try:
        seed = json.loads(recipe.read_text(encoding="utf-8"))["recipe"]["seed"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"count_report: cannot read the run's seed from {recipe}: {error!r}") from None
    try:
        return count_shared(records, seed, where=str(path))
    except ValueError as error:
        raise ValueError(f"count_report: {error}") from None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="a run folder of the shapes world (with world/ and eval/)")
    p.add_argument("--sft", action="store_true", help="split the SFT records' count turns instead of the answers")
    p.add_argument("--count-shared", action="store_true", help="with --sft: as the SFT flag --count-shared asks them")
    args = p.parse_args(argv)
    if args.count_shared and not args.sft:
        p.error("--count-shared goes with --sft")

    def each_run():
        for run in map(Path, args.runs):
            try:
                counts = sft_counts(read_sft(run, args.count_shared)) if args.sft else count_counts(*read_run(run))
            except ValueError as error:
                raise SystemExit(f"{error} (in {run})") from None
            shared = ", --count-shared" if args.count_shared else ""
            yield (f"{run} (SFT records{shared})" if args.sft else str(run)), counts

    print_each_and_together(each_run(), table_markdown)


if __name__ == "__main__":
    main()
