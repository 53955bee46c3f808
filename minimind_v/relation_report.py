"""How a run answered its relation questions, step by step.

A relation answer may be the verdict alone ("yes", "circle", "nothing") or a worked one that writes
steps before it (the world's ``relation_answers``: "worked", "ordered", "regions"). Accuracy judges
the whole answer; this report splits it, per kind of verdict the truth has (yes, no, nothing, a
shape): how often the whole answer is right, the verdict alone, and each written step (the anchor's
place, the region, the subject's row or column), and the verdict where every step before it is
right, so a reader sees which step fails.

    python -m minimind_v.relation_report runs/default/eval/answers.json [more answers.json ...]

Given several runs' answers, it prints each run's table and then the counts of all together.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

VERDICT_KINDS = ("yes", "no", "nothing", "a shape")
STEPS = ("places", "region", "subject's line")


def answer_steps(reply: str) -> dict[str, str]:
    """The parts of a relation answer: its verdict and the steps written before it.
    'The red cross is at the bottom; above it: the top and middle rows; the circle is in the top row: yes.'
    -> {"verdict": "yes", "places": "The red cross is at the bottom", "region": "the top and middle rows",
    "subject's line": "the circle is in the top row"}; 'nothing' -> {"verdict": "nothing"}."""
    head, sep, verdict = reply.strip().rstrip(".").rpartition(": ")
    if not sep:
        return {"verdict": verdict}
    parts = [p.strip() for p in head.split(";")]
    steps = {"verdict": verdict, "places": parts[0]}
    regions = [i for i, part in enumerate(parts) if " it: " in part]  # "above it: the top row"
    if regions:
        steps["region"] = parts[regions[0]].split(" it: ", 1)[1]
        if len(parts) > regions[0] + 1:
            steps["subject's line"] = parts[regions[0] + 1]
    return steps


def verdict_kind(verdict: str) -> str:
    return verdict if verdict in ("yes", "no", "nothing") else "a shape"


def relation_steps(answers: list[dict]) -> dict[str, Counter]:
    """Per verdict kind of the truth: 'questions', 'whole answer', 'verdict' and each step of STEPS
    that the truth writes, counted right (a step the prediction lacks is wrong), and 'after right
    steps': the verdict right among the answers whose every written step is right."""
    counts = {kind: Counter() for kind in VERDICT_KINDS}
    for row in answers:
        if row["type"] != "relation":
            continue
        truth, said = answer_steps(row["answer"]), answer_steps(row["prediction"])
        c = counts[verdict_kind(truth["verdict"])]
        c["questions"] += 1
        c["whole answer"] += row["correct"]
        for step in ("verdict", *STEPS):
            if step in truth:
                c[step] += said.get(step) == truth[step]
                c[f"{step} asked"] += 1
        # The last step alone: the verdict where every step written before it is right.
        if all(said.get(step) == truth[step] for step in STEPS if step in truth):
            c["after right steps asked"] += 1
            c["after right steps"] += said["verdict"] == truth["verdict"]
    return counts


def table_markdown(counts: dict[str, Counter]) -> str:
    """'right / asked' per verdict kind and step; '-' where the answers write no such step."""
    columns = ["whole answer", "verdict", *STEPS, "after right steps"]
    names = [*columns[:-1], "verdict, every step right"]
    lines = ["| truth's verdict | questions | " + " | ".join(names) + " |", "|---|" + "---:|" * (len(columns) + 1)]
    for kind in (*VERDICT_KINDS, "all"):
        c = sum(counts.values(), Counter()) if kind == "all" else counts[kind]
        cells = [f"{c['whole answer']} / {c['questions']}"]
        cells += [f"{c[s]} / {c[f'{s} asked']}" if c[f"{s} asked"] else "-" for s in columns[1:]]
        lines.append(f"| {kind} | {c['questions']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_rows(path: Path, fields: tuple[str, ...], what: str) -> list[dict]:
    """A JSON file holding a list of rows, each with ``fields``; ValueError naming the file and what
    it should have been."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and set(fields) <= r.keys() for r in rows):
        raise ValueError(f"{path} is not {what} (a list of rows with {', '.join(fields)})")
    return rows


ANSWER_FIELDS = ("id", "type", "question", "answer", "prediction", "correct")  # a row of eval/answers.json


def read_run_answers(run: Path, record_fields: tuple[str, ...], report: str) -> tuple[list[dict], dict[str, dict]]:
    """(answers, held-out records by id) of a run folder: its eval/answers.json and its
    world/eval_data.json, each record with ``record_fields``; ValueError starting with ``report``
    and naming the file that cannot be read or is not what it should be."""
    try:
        records = read_rows(run / "world" / "eval_data.json", record_fields, "a world's held-out records")
        answers = read_rows(run / "eval" / "answers.json", ANSWER_FIELDS, "an evaluation's answers.json")
    except ValueError as error:
        raise ValueError(f"{report}: {error}") from None
    return answers, {r["id"]: r for r in records}


def print_each_and_together(runs, table) -> None:
    """Print each (label, {row: Counter}) of ``runs`` as ``table`` draws it, then, for more than one,
    their counts summed."""
    every, n = {}, 0
    for label, counts in runs:
        n += 1
        for row, c in counts.items():
            every[row] = every.get(row, Counter()) + c
        print(f"{label}\n\n{table(counts)}\n")
    if n > 1:
        print(f"all {n} together\n\n{table(every)}\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("answers", nargs="+", help="an evaluation's answers.json (its eval/ folder)")
    args = p.parse_args(argv)
    def each_run():
        for path in args.answers:
            try:
                rows = read_rows(Path(path), ("type", "answer", "prediction", "correct"), "an evaluation's answers.json")
            except ValueError as error:
                raise SystemExit(f"relation_report: {error}") from None
            yield path, relation_steps(rows)

    print_each_and_together(each_run(), table_markdown)


if __name__ == "__main__":
    main()
