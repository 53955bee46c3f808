"""How a run answered questions about the objects of its held-out colour-shape pairs.

World 2 keeps some colour-shape pairs (a red triangle, a blue cross) out of every training picture
and caption, and half of its held-out pictures show one. Accuracy on those pictures, taken whole,
mixes two kinds of question: about the held-out pair's object itself, and about the other objects
beside it. This report splits them. For every question that names an object the picture shows
(colour, shape, size, position, and existence questions whose answer is "yes"), it finds the
object from the question's words and the scene, and counts the answers in three groups: about an
object in a picture without a held-out pair, about another object in a picture with one, and about
the held-out pair's object. Of the wrong answers it counts those that say the object is not there
("There is no small triangle.", "no"): the picture shows it, and the model denies it.

    python -m minimind_v.pair_report runs/world2_seed3 [more run folders ...]

It reads a run's world/world.json (the held-out pairs), world/eval_data.json (each question's
scene) and eval/answers.json; given several runs, it prints each run's table and then all together.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from .data.shapes_answers import parse_question
from .evaluate import normalise
from .relation_report import print_each_and_together, read_run_answers

GROUPS = ("picture without a held-out pair", "another object, picture with one", "the held-out pair's object")
ASKED_TYPES = ("colour", "shape", "size", "position", "existence")  # the types whose question names one object


def says_absent(reply: str) -> bool:
    """Does the reply say that what was asked about is not there? ('There is no red circle.',
    'Nothing is in the center.', 'no', 'nothing')"""
    said = normalise(reply)
    return said in ("no", "nothing") or said.startswith(("there is no ", "nothing is "))


def question_group(question: str, scene: list[dict], held_out_pairs: set) -> str | None:
    """The group of GROUPS a question falls in, from the objects its words name in the scene;
    None where it names none (an absent object, a count, a relation)."""
    _, constraints = parse_question(question)
    named = [o for o in scene if all(o.get(k) == v for k, v in constraints.items())]
    if not named or "relation" in constraints:
        return None
    if any((o["colour"], o["shape"]) in held_out_pairs for o in named):
        return GROUPS[2]
    shown = any((o["colour"], o["shape"]) in held_out_pairs for o in scene)
    return GROUPS[1] if shown else GROUPS[0]


def pair_counts(answers: list[dict], records: dict[str, dict], held_out_pairs: set) -> dict[str, Counter]:
    """Per group: 'questions', 'right', 'says absent' (wrong answers that deny the object), and per
    answer type '<type> questions' and '<type> right'. ``records`` maps a question's id to its
    held-out record (with its 'scene')."""
    counts = {group: Counter() for group in GROUPS}
    for row in answers:
        if row["type"] not in ASKED_TYPES or row["type"] == "existence" and normalise(row["answer"]) != "yes":
            continue
        if row["id"] not in records:
            raise ValueError(f"pair_report: answer {row['id']!r} has no held-out record of that id")
        group = question_group(row["question"], records[row["id"]]["scene"], held_out_pairs)
        if group is None:
            continue
        c = counts[group]
        c["questions"] += 1
        c["right"] += row["correct"]
        c["says absent"] += not row["correct"] and says_absent(row["prediction"])
        c[f"{row['type']} questions"] += 1
        c[f"{row['type']} right"] += row["correct"]
    return counts


def table_markdown(counts: dict[str, Counter]) -> str:
    """Right / asked per group, overall and per answer type, and how many wrong answers deny the object."""
    def cell(right: int, asked: int) -> str:
        return f"{100 * right / asked:.1f}% ({right} / {asked})" if asked else "-"

    lines = ["| questions about | right | wrong | of them, says it is not there | "
             + " | ".join(ASKED_TYPES) + " |", "|---|---:|---:|---:|" + "---:|" * len(ASKED_TYPES)]
    for group in GROUPS:
        c = counts[group]
        per_type = [cell(c[f"{t} right"], c[f"{t} questions"]) for t in ASKED_TYPES]
        lines.append(f"| {group} | {cell(c['right'], c['questions'])} | {c['questions'] - c['right']} | "
                     f"{c['says absent']} | " + " | ".join(per_type) + " |")
    return "\n".join(lines)


def read_run(run: Path) -> tuple[list[dict], dict[str, dict], set]:
    """(answers, held-out records by id, held-out pairs) of a run folder; ValueError naming the file
    that cannot be read or is not what it should be."""
    world = run / "world" / "world.json"
    try:
        config = json.loads(world.read_text(encoding="utf-8"))["config"]
        pairs = {tuple(p) for p in config.get("held_out_pairs") or ()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"pair_report: cannot read the world's settings from {world}: {error!r}") from None
    if not pairs:
        raise ValueError(f"pair_report: {world} holds out no colour-shape pair (world 2 does)")
    answers, records = read_run_answers(run, ("id", "scene"), "pair_report")
    return answers, records, pairs


def pair_answers_of_run(run: Path) -> dict[str, dict[str, int]]:
    """What the seeds record keeps: per group, the questions, the right answers, and the wrong
    answers that say the object is not there."""
    counts = pair_counts(*read_run(Path(run)))
    return {group: {key: counts[group][key] for key in ("questions", "right", "says absent")} for group in GROUPS}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="a run folder of world 2 (with world/ and eval/)")
    args = p.parse_args(argv)
    def each_run():
        for run in map(Path, args.runs):
            try:
                answers, records, pairs = read_run(run)
                counts = pair_counts(answers, records, pairs)
            except ValueError as error:
                raise SystemExit(f"{error} (in {run})") from None
            yield f"{run} (held out: {', '.join(' '.join(p) for p in sorted(pairs))})", counts

    print_each_and_together(each_run(), table_markdown)


if __name__ == "__main__":
    main()
