"""Where a run's model looks as it decides an answer: its attention on the objects a question names.

For every held-out question of the chosen types (one picture, with its scene), the first answer
token is chosen by the prompt's last position; that position's attention, averaged over heads,
over the picture's tokens (CLS and the patch grid) is split by the objects of the scene, layer by
layer: an object's share is the attention on the patches that hold any of its pixels
(``inked_patches``: the object drawn alone) over the attention on all of the picture's tokens.
The question names some of the objects (``question_objects``): for a count, the objects that fit;
for a relation, the anchor, and the subject of a yes/no question or the object the relation
finds; otherwise the objects its words fit. Models trained on different seeds look objects up in
different layers, so the tables give each question's peak share, the most that any one layer puts
on those objects, beside what attention spread evenly over the picture's tokens would put there
(their patches over all the picture's tokens): a share read against chance.

The one-word answers (a count, a relation's verdict) are decided at that first token, and the
tables split the questions by whether the whole answer was right:

  - per type: the named objects' peak share;
  - counts where several objects fit: theirs, and that of the fitting object looked at least, with
    how often the answer says "one";
  - relations, by the truth's verdict (yes, no, nothing, a shape): the anchor's peak share and the
    subject's (yes/no) or the found object's (what is there).

    python -m minimind_v.attention_report runs/world2_seed3 [more run folders ...]
    python -m minimind_v.attention_report runs/world2_seed{3,4,5} --record docs/attention_world2.json

It reads a run's world/eval_data.json (each question's scene and picture), eval/answers.json, and
loads its SFT model (sft/); given several runs it prints each run's tables and then all together.
``--record`` writes the tables' figures of each run and of all together (``summarise``; chapter
07 prints them with ``tables_markdown``), and the layer-by-layer attention on the patch grid of
the first wrong answers of two kinds in each run (``example_kind``), with their scenes to draw.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from .data.records import find_image
from .data.shapes_answers import parse_question
from .data.shapes_questions import related
from .data.shapes_records import record_images, record_scenes
from .data.shapes_scenes import BACKGROUND_RGB, NUMBER_WORDS, render_scene
from .evaluate import normalise
from .relation_report import read_run_answers
from .runfiles import atomic_write_json

TYPES = ("colour", "count", "relation")  # the default: the two weak types and one answered well
VERDICT_KINDS = ("yes", "no", "nothing", "a shape")
EXAMPLES_PER_RUN = 1  # wrong answers kept with their patch-grid attention, per kind below


def fits(obj: dict, constraints: dict) -> bool:
    return all(obj[key] == value for key, value in constraints.items())


def question_objects(question: str, scene: list[dict]) -> dict[str, list[int]]:
    """The objects of ``scene`` (their indices) that ``question`` is about, by role.
    Count: {"fits"}; relation: {"anchor", "subject"} (yes/no) or {"anchor", "found"} (what is
    there: the object the relation finds, or none); any other type: {"named"}, the objects its
    words fit (none for a question about an absent object). ValueError for a relation whose anchor
    is not exactly one object of the scene."""
    kind, constraints = parse_question(question)
    if kind == "count":
        return {"fits": [i for i, o in enumerate(scene) if fits(o, constraints)]}
    if kind != "relation":
        return {"named": [i for i, o in enumerate(scene) if fits(o, constraints)]}
    anchors = [i for i, o in enumerate(scene) if fits(o, constraints["anchor"])]
    if len(anchors) != 1:
        raise ValueError(f"attention_report: {question!r} names {len(anchors)} anchors in the scene {scene!r}")
    if "subject" in constraints:
        return {"anchor": anchors, "subject": [i for i, o in enumerate(scene) if fits(o, constraints["subject"])]}
    anchor = scene[anchors[0]]
    return {"anchor": anchors,
            "found": [i for i, o in enumerate(scene) if i != anchors[0] and related(o, constraints["relation"], anchor)]}


def inked_patches(obj: dict, image_size: int, grid: int) -> np.ndarray:
    """(grid * grid,) bool, row-major as the encoder flattens its patches: the patches that hold
    any pixel of ``obj`` drawn alone at ``image_size``. Wider than ``clip_examples.object_patches``
    (the patches whose centre the object's box holds, the tokens a probe reads it from): attention
    on a patch that shows part of the object is attention on the object."""
    if image_size % grid:
        raise ValueError(f"attention_report: a {image_size}-pixel picture does not split into {grid} x {grid} patches")
    ink = (np.asarray(render_scene([obj], image_size)) != np.asarray(BACKGROUND_RGB, dtype=np.uint8)).any(-1)
    side = image_size // grid
    return ink.reshape(grid, side, grid, side).any(axis=(1, 3)).reshape(-1)


def object_shares(image_attention: torch.Tensor, patches: np.ndarray) -> np.ndarray:
    """(L, K): each object's share of the attention on the picture, per layer. ``image_attention``
    is (L, N), over CLS and the patch grid; ``patches`` (K, N - 1) bool, one row per object."""
    attention = image_attention.double().numpy()
    on_patches = attention[:, 1:] @ patches.T.astype(np.float64)  # (L, K)
    return on_patches / attention.sum(-1, keepdims=True)


def question_row(answer_row: dict, scene: list[dict], image_attention: torch.Tensor, image_size: int,
                 grid: int) -> dict:
    """One question's figures: its answer, its objects' roles, each object's share of the picture's
    attention per layer ("shares", objects by layers), each object's patch count and the picture's
    token count (for the even share)."""
    patches = np.stack([inked_patches(o, image_size, grid) for o in scene])
    return {key: answer_row[key] for key in ("id", "type", "question", "answer", "prediction", "correct")} | {
        "objects": len(scene),
        "roles": question_objects(answer_row["question"], scene),
        "shares": object_shares(image_attention, patches).T.tolist(),  # (K, L)
        "patches": patches.sum(1).tolist(),
        "picture_tokens": int(image_attention.shape[-1]),
    }


def named(row: dict) -> list[int]:
    return sorted({i for members in row["roles"].values() for i in members})


def peak_share(row: dict, objects: list[int]) -> float:
    """The most of the picture's attention that any one layer puts on ``objects`` (a patch that
    holds pixels of two neighbours counts for both). The peak, not one layer: models trained on
    different seeds look objects up in different layers."""
    shares = np.asarray(row["shares"], dtype=np.float64)
    return float(shares[objects].sum(0).max()) if objects else 0.0


def least_peak(row: dict, objects: list[int]) -> float:
    """The peak share of the least-attended of ``objects``: how much the one looked at least got."""
    return min(peak_share(row, [i]) for i in objects)


def even_share(row: dict, objects: list[int]) -> float:
    """What attention spread evenly over the picture's tokens would put on ``objects``."""
    return sum(row["patches"][i] for i in objects) / row["picture_tokens"]


def verdict_kind(truth: str) -> str:
    return truth if truth in ("yes", "no", "nothing") else "a shape"


def _mean(rows: list[dict], value) -> float:
    return round(float(np.mean([value(r) for r in rows])), 4)


def _other(row: dict) -> list[int]:
    """A relation's second object: the subject of a yes/no question, or the object the relation finds."""
    return row["roles"].get("subject") or row["roles"].get("found") or []


def summarise(rows: list[dict], types=TYPES) -> dict:
    """The three tables' figures, shares as fractions of the picture's attention (means over the
    questions of each row): "types": per type, right and wrong, the named objects' peak share and
    the even share; "counts": counts where several objects fit, right and wrong: "says_one", the
    fitting objects' peak and even shares, and the least-attended fitting object's ("least",
    "least_even"); "relations": per verdict kind of the truth, right and wrong: the anchor's peak
    and even shares, and the other object's (the subject, or the object found; None where no
    question of the row has one)."""
    summary = {"types": [], "counts": [], "relations": []}
    for kind in types:
        for right in (True, False):
            group = [r for r in rows if r["type"] == kind and r["correct"] == right and named(r)]
            if group:
                summary["types"].append({"type": kind, "right": right, "questions": len(group),
                                         "share": _mean(group, lambda r: peak_share(r, named(r))),
                                         "even": _mean(group, lambda r: even_share(r, named(r)))})
    several = [r for r in rows if r["type"] == "count" and len(r["roles"]["fits"]) >= 2]
    for right in (True, False):
        group = [r for r in several if r["correct"] == right]
        if group:
            summary["counts"].append({
                "right": right, "questions": len(group),
                "says_one": sum(normalise(r["prediction"]) == NUMBER_WORDS[1] for r in group),
                "share": _mean(group, lambda r: peak_share(r, r["roles"]["fits"])),
                "even": _mean(group, lambda r: even_share(r, r["roles"]["fits"])),
                "least": _mean(group, lambda r: least_peak(r, r["roles"]["fits"])),
                "least_even": _mean(group, lambda r: min(even_share(r, [i]) for i in r["roles"]["fits"]))})
    for kind in VERDICT_KINDS:
        for right in (True, False):
            group = [r for r in rows if r["type"] == "relation" and r["correct"] == right
                     and verdict_kind(normalise(r["answer"])) == kind]
            if not group:
                continue
            seconds = [r for r in group if _other(r)]
            summary["relations"].append({
                "truth": kind, "right": right, "questions": len(group),
                "anchor": _mean(group, lambda r: peak_share(r, r["roles"]["anchor"])),
                "anchor_even": _mean(group, lambda r: even_share(r, r["roles"]["anchor"])),
                "other": _mean(seconds, lambda r: peak_share(r, _other(r))) if seconds else None,
                "other_even": _mean(seconds, lambda r: even_share(r, _other(r))) if seconds else None})
    return summary


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


def _answered(right: bool) -> str:
    return "right" if right else "wrong"


def tables_markdown(summary: dict) -> str:
    """``summarise``'s figures as three markdown tables, in % of the picture's attention."""
    lines = ["| answers | questions | named objects' peak share | spread evenly |", "|---|---:|---:|---:|"]
    lines += [f"| {t['type']}, {_answered(t['right'])} | {t['questions']} | {_percent(t['share'])} "
              f"| {_percent(t['even'])} |" for t in summary["types"]]
    lines += ["", "| counts, several objects fit | questions | says \"one\" | their peak share | spread evenly "
              "| the least-attended one's peak | spread evenly |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {_answered(c['right'])} | {c['questions']} | {c['says_one']} | {_percent(c['share'])} "
              f"| {_percent(c['even'])} | {_percent(c['least'])} | {_percent(c['least_even'])} |" for c in summary["counts"]]
    lines += ["", "| relation, truth | answers | questions | anchor's peak share | spread evenly "
              "| subject's or found object's peak share | spread evenly |", "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['truth']} | {_answered(r['right'])} | {r['questions']} | {_percent(r['anchor'])} "
              f"| {_percent(r['anchor_even'])} | {_percent(r['other'])} | {_percent(r['other_even'])} |"
              for r in summary["relations"]]
    return "\n".join(lines)


def example_kind(row: dict) -> str | None:
    """The wrong answers kept as pictures: a count that says "one" where several objects fit, and a
    relation whose truth is a shape or "yes"."""
    if row["correct"]:
        return None
    if row["type"] == "count" and len(row["roles"]["fits"]) >= 2 and normalise(row["prediction"]) == NUMBER_WORDS[1]:
        return "count"
    if row["type"] == "relation" and verdict_kind(normalise(row["answer"])) in ("yes", "a shape"):
        return "relation"
    return None


def run_rows(run: Path, types=TYPES) -> tuple[list[dict], list[dict]]:
    """(rows, examples) of one run: every held-out question of ``types`` with a one-picture scene,
    and up to EXAMPLES_PER_RUN wrong answers per ``example_kind`` with their (L, grid, grid) patch
    attention and the scene to draw them on."""
    from .inference import load_vlm
    from .viz.trace import answer_with_attention

    answers, by_id = read_run_answers(run, ("id", "image"), "attention_report")
    vlm = load_vlm(run / "sft", require_complete=True)
    pictures = run / "world" / "eval_data_images"
    rows, examples, kept = [], [], defaultdict(int)
    for answer_row in answers:
        if answer_row["type"] not in types:
            continue
        if answer_row["id"] not in by_id:
            raise ValueError(f"attention_report: answer {answer_row['id']!r} has no held-out record of that id")
        record = by_id[answer_row["id"]]
        images, scenes = record_images(record), record_scenes(record)
        if len(images) != 1:  # two pictures: no one scene to split the attention by
            continue
        image, scene = images[0], scenes[0]
        picture = find_image(pictures, image, f"{run / 'world' / 'eval_data.json'}", record["id"])
        trace = answer_with_attention(vlm, picture, answer_row["question"], max_new_tokens=1)
        row = question_row(answer_row, scene, trace.image_attention[0], trace.image_size, trace.grid)
        rows.append(row)
        kind = example_kind(row)
        if kind and kept[kind] < EXAMPLES_PER_RUN:
            kept[kind] += 1
            grids = trace.image_attention[0, :, 1:] / trace.image_attention[0].sum(-1, keepdim=True)
            examples.append({"run": run.name, "kind": kind, "scene": scene, "question": row["question"],
                             "answer": row["answer"], "prediction": row["prediction"], "roles": row["roles"],
                             "image_size": trace.image_size,
                             "patch_attention": np.round(grids.reshape(-1, trace.grid, trace.grid).numpy(), 3).tolist()})
    return rows, examples


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m minimind_v.attention_report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (world/, eval/answers.json, sft/)")
    p.add_argument("--types", nargs="+", default=list(TYPES), help=f"answer types to trace (default: {' '.join(TYPES)})")
    p.add_argument("--record", type=Path, help="write each run's figures, all together, and a few examples to this JSON file")
    args = p.parse_args(argv)
    types = tuple(args.types)
    every, record = [], {"runs": {}, "examples": []}
    for run in args.runs:
        try:
            rows, examples = run_rows(run, types)
        except ValueError as error:
            raise SystemExit(str(error)) from None
        every += rows
        record["runs"][str(run)] = summarise(rows, types)
        record["examples"] += examples
        print(f"{run}\n\n{tables_markdown(record['runs'][str(run)])}\n")
    record["together"] = summarise(every, types)
    if len(args.runs) > 1:
        print(f"all {len(args.runs)} together\n\n{tables_markdown(record['together'])}\n")
    if args.record:
        atomic_write_json(args.record, record, indent=None)
        print(f"wrote {args.record}")


if __name__ == "__main__":
    main()
