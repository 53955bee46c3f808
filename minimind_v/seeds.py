"""The recipe on several seeds: what one seed cannot say.

    python -m minimind_v.seeds --world 2 --seeds 3 4 5 --record docs/seeds_world2.json
    python -m minimind_v.seeds --world 1 --seeds 0 --record docs/seeds_world1.json
    python -m minimind_v.seeds --world 2 --seeds 3 4 5 --relation-answers regions --folder runs/regions
    python -m minimind_v.seeds --world 2 --seeds 3 4 5 --sft-steps 4500 --folder runs/w2s4500
    python -m minimind_v.seeds --world 2 --seeds 3 4 5 --sft-object-repeats 1,1,1 --folder runs/once_each
    python -m minimind_v.seeds --world 2 --seeds 4 3 5 --sft-flags="--object-curriculum" --folder runs/curriculum

A seed changes everything a run is built from: the world's pictures and questions, every stage's
initial weights, the order of every batch. Each seed is an ordinary recipe run folder
(``runs/world2_seed2``...), reused when its stages are finished with the same settings. The
record keeps, per seed, the held-out accuracy per answer type with its baselines, the seen/unseen
split, accuracy per number of objects and per layout (the picture before or after the question,
and the same questions asked as written),
each stage's minutes, the model's answers to questions about absent objects on held-out
pictures (chapter 07 asks the book's model the same ones), how much of each scene a linear probe
reads from the frozen tokens the decoder was given (``probes.scene_probe``: what the eyes offer,
against what the model answers), and, where the world holds colour-shape pairs out, how well the
eyes read objects of those pairs (``probes.pair_probe``) and how the model answers questions about
them, beside questions about the other objects (``pair_report``).
``table_markdown`` gives mean, min and max over the seeds, and ``goal_rows`` the worst seed
against the goals in ``GOALS``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import replace
from pathlib import Path
from statistics import mean

from .data.shapes_questions import RELATION_ANSWERS
from .evaluate import LAYOUT_COLUMNS, layout_split
from .recipe import STAGE_DIRS, WORLDS, default_recipe, home, recipe_record, run_recipe, stage_dir, with_world
from .runfiles import atomic_write_json
from .train.vlm import object_repeats

# (what is measured, at least): the worst seed is judged against each. "count, 3 objects" is the count
# accuracy on pictures with three objects; "unseen vs seen" the overall accuracy on pictures with
# a held-out colour-shape pair minus that on the others (at least -5 points).
GOALS = (("overall", 0.95),
         *((kind, 0.90) for kind in ("colour", "count", "position", "shape", "size")),
         *((kind, 0.85) for kind in ("existence", "absent", "relation")),
         ("count, 3 objects", 0.85), ("unseen vs seen", -0.05))
N_ABSENT_QUESTIONS = 8  # held-out pictures asked about something they do not show


def absent_questions(world: Path, n: int = N_ABSENT_QUESTIONS) -> list[dict]:
    """Questions about what the first held-out pictures do not show, with the answer that says so:
    "What shape is in the center?" of a picture with an empty centre, and "What colour is the
    <shape>?" for a shape the picture lacks. {"image", "scene", "question", "truth"}."""
    from .captions import held_out_pictures
    from .data.shapes_questions import absent_answer
    from .data.shapes_scenes import SHAPES

    asked = []
    for path, scene in held_out_pictures(world):
        if len(asked) == n:
            break
        if len(asked) % 2 == 0:  # every other question asks about an empty centre
            if any(o["position"] == "center" for o in scene):
                continue
            question, truth = "What shape is in the center?", absent_answer({"position": "center"})
        else:  # three objects at most, four shapes: one is always missing; take them in turn
            missing = [s for s in SHAPES if all(o["shape"] != s for o in scene)]
            shape = missing[len(asked) // 2 % len(missing)]
            question, truth = f"What colour is the {shape}?", absent_answer({"shape": shape})
        asked.append({"image": path.name, "scene": scene, "question": question, "truth": truth})
    return asked


def seed_figures(run: Path) -> dict:
    """What the record keeps of a finished run (see the module's docstring)."""
    from .data.records import read_records
    from .evaluate import accuracy_by_layout, accuracy_by_objects
    from .inference import answer, load_vlm
    from .pair_report import pair_answers_of_run
    from .probes import pair_probe_of_run, scene_probe_of_run

    world = stage_dir(run, "world")
    results = json.loads((stage_dir(run, "eval") / "results.json").read_text(encoding="utf-8"))
    rows = json.loads((stage_dir(run, "eval") / "answers.json").read_text(encoding="utf-8"))
    held_out = read_records(world / "eval_data.json")
    by_objects = accuracy_by_objects(rows, held_out)
    absent = absent_questions(world)
    replies = answer(load_vlm(stage_dir(run, "sft")), [str(world / "eval_data_images" / q["image"]) for q in absent],
                     [q["question"] for q in absent])
    return {"overall": results["overall"], "per_type": results["per_type"], "n": results["n"],
            "baselines": results["baselines"],
            "by_combination": results.get("by_combination"),
            "by_layout": accuracy_by_layout(rows, held_out),
            "as_written": results.get("as_written"),  # each question asked with the picture where it is written
            "by_objects": {kind: {str(k): v for k, v in per_n.items()} for kind, per_n in by_objects.items()},
            "absent_answers": [{**q, "answer": a} for q, a in zip(absent, replies)],
            "scene_probe": scene_probe_of_run(run),
            # the eyes, and the answers, on pairs no training picture showed (worlds that hold some out)
            **({"pair_probe": pair_probe_of_run(run), "pair_answers": pair_answers_of_run(run)}
               if results.get("by_combination") else {})}


def run_seeds(world: int, seeds: list[int], folder: Path | None = None, nproc: int = 1,
              record: Path | None = None, relation_answers: str | None = None,
              sft_steps: int | None = None, object_repeats: tuple[int, ...] | None = None,
              sft_flags: list[str] | None = None) -> dict:
    """Train (or reuse) the recipe of ``world`` on each seed, one after the other; the record grows
    as each seed finishes (``folder/world<N>_seeds.json``, and ``record`` if given).
    ``relation_answers``, if given, replaces the recipe's form of relation answers
    (``shapes.RELATION_ANSWERS``), and ``sft_steps`` the recipe's SFT steps (its learning-rate
    schedule spans the new count), and ``object_repeats`` how often SFT takes a record by its number of
    objects (``--object-repeats`` of the SFT stage); ``sft_flags`` are more flags of the SFT stage
    (the recipe's ``extra``, checked against the stage's parser first); the record's recipe says
    what was trained."""
    from .machine import describe_speed

    folder = Path(folder or home() / "runs")
    base = with_world(default_recipe(), world)
    if relation_answers is not None:
        base = replace(base, relation_answers=relation_answers)
    if sft_steps is not None:
        if sft_steps < 1:
            raise ValueError(f"sft_steps must be at least 1, got {sft_steps}")
        base = replace(base, sft_steps=sft_steps)
    if object_repeats is not None:
        if not object_repeats or any(n < 1 for n in object_repeats):
            raise ValueError(f"object_repeats must be whole numbers >= 1, got {object_repeats!r}")
        base = replace(base, sft_object_repeats=tuple(object_repeats))
    if sft_flags:
        check_stage_flags("sft", sft_flags)
        base = replace(base, extra={**base.extra, "sft": [*base.extra.get("sft", []), *sft_flags]})
    # The recipe as the file holds it (tuples become lists), its seed left out: the seeds vary.
    results = {"world": world, "recipe": recipe_record(replace(base, seed=-1)), "seeds": {}}
    out = folder / f"world{world}_seeds.json"
    if out.exists():
        try:
            earlier = json.loads(out.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{out} is not a record written by minimind_v.seeds ({err}); "
                             f"remove it to start the record again") from None
        if isinstance(earlier, dict) and earlier.get("recipe") == results["recipe"]:
            results = earlier  # the same recipe: keep the seeds measured before
    for seed in seeds:
        run = folder / f"world{world}_seed{seed}"
        print(f"[seeds] world {world}, seed {seed} -> {run}", flush=True)
        machine = describe_speed()
        started = time.perf_counter()
        outcome = run_recipe(run, replace(base, seed=seed), nproc=nproc)
        minutes = {stage: round(s / 60, 2) for stage, s in outcome["timings"].items()}
        entry = {"machine": machine, "minutes": minutes,
                 "total_minutes": round((time.perf_counter() - started) / 60, 2), "stages_trained": sorted(minutes)}
        earlier = results["seeds"].get(str(seed))
        if earlier and set(minutes) < set(earlier["minutes"]):
            entry = again_in_part(earlier, minutes, machine)
        results["seeds"][str(seed)] = {**entry, **seed_figures(run)}
        for path in [out] + ([Path(record)] if record else []):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, results)
    return results


def check_stage_flags(stage: str, flags: list[str]) -> None:
    """Refuse, before anything trains, flags that the stage's own parser would refuse at its start."""
    from .train.vlm import build_parser

    parser = build_parser(stage)
    parser.exit_on_error = False
    try:
        parser.parse_args(["--data", "-", "--init", "-", "--out", "-", *flags])
    except argparse.ArgumentError as err:
        raise ValueError(f"flags for the {stage} stage {' '.join(flags)!r}: {err}") from None
    except SystemExit:  # (argparse exits on some errors whatever exit_on_error says)
        raise ValueError(f"flags for the {stage} stage {' '.join(flags)!r}: refused by its parser "
                         f"(above)") from None


def again_in_part(earlier: dict, minutes: dict, machine: str) -> dict:
    """A seed's timing entry after some of its stages ran again (a new evaluation, say) and the rest
    were reused: the reused stages keep the minutes measured when they were trained, the total
    counts each stage once, and ``rerun`` says what ran again on which machine."""
    merged = {**earlier["minutes"], **minutes}
    entry = {"machine": earlier["machine"], "minutes": merged,
             "total_minutes": round(earlier["total_minutes"] + sum(minutes.values())
                                    - sum(earlier["minutes"][s] for s in minutes), 2),
             "stages_trained": earlier["stages_trained"]}
    if minutes:
        return entry | {"rerun": {"stages": sorted(minutes), "machine": machine}}
    return entry | ({"rerun": earlier["rerun"]} if "rerun" in earlier else {})


# ----------------------------------------------------------------------------- over the seeds


def measured(figures: dict, name: str) -> float | None:
    """One seed's value of a goal's measure (None when the seed's world does not have it)."""
    if name == "overall":
        return figures["overall"]
    if name == "count, 3 objects":
        return figures["by_objects"].get("count", {}).get("3")
    if name == "unseen vs seen":
        split = (figures.get("by_combination") or {}).get("overall", {})
        return split["unseen"] - split["seen"] if {"seen", "unseen"} <= set(split) else None
    return figures["per_type"].get(name)


def spread(values: list[float]) -> tuple[float, float, float]:
    """(mean, min, max)."""
    return mean(values), min(values), max(values)


def goal_rows(results: dict) -> list[dict]:
    """Each goal of ``GOALS`` that the record's world measures: its mean, worst seed, and by how
    much the worst seed misses it (0 when met)."""
    rows = []
    for name, least in GOALS:
        values = [v for f in results["seeds"].values() if (v := measured(f, name)) is not None]
        if not values:
            continue
        average, worst, _ = spread(values)
        rows.append({"goal": name, "at_least": least, "mean": average, "worst": worst,
                     "short_by": max(0.0, least - worst), "met": worst >= least})
    return rows


def _cell(values: list[float]) -> str:
    average, low, high = spread(values)
    return f"{100 * average:.1f} ({100 * low:.1f} – {100 * high:.1f})"


def _value(figures: dict, kind: str, baseline: str | None = None) -> float:
    """One seed's accuracy on ``kind`` (or "overall"), or that of one of its baselines."""
    source = figures if baseline is None else figures["baselines"][baseline]
    return source["overall"] if kind == "overall" else source["per_type"][kind]


def table_markdown(results: dict, against: dict | None = None) -> str:
    """Per answer type: mean (min – max) over the seeds, next to the text-only and majority
    baselines; then seen/unseen, per number of objects, the goals, and each stage's minutes per seed (and per seed of
    ``against``, another record measured on the same machine: today's recipe)."""
    seeds, figures = list(results["seeds"]), list(results["seeds"].values())
    kinds = list(figures[0]["per_type"]) + ["overall"]
    lines = [f"World {results['world']}, seeds {', '.join(seeds)}: mean (min – max), %", "",
             "| answer type | accuracy | text only | majority answer |", "|---|---:|---:|---:|"]
    for k in kinds:
        cells = [_cell([_value(f, k, b) for f in figures]) for b in (None, "text only", "majority answer")]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if all(f.get("by_combination") for f in figures):
        lines += ["", "| answer type | seen combinations | unseen combinations |", "|---|---:|---:|"]
        for k in kinds:
            cells = [_cell([f["by_combination"][k][g] for f in figures]) for g in ("seen", "unseen")]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if all(f.get("as_written") for f in figures):
        splits = [layout_split(f) for f in figures]
        lines += ["", "| answer type | " + " | ".join(LAYOUT_COLUMNS) + " |", "|---|" + "---:|" * len(LAYOUT_COLUMNS)]
        for k in kinds:
            cells = [_cell([split[k][c] for split in splits]) if all(c in split.get(k, {}) for split in splits)
                     else "–" for c in LAYOUT_COLUMNS]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    counts = sorted({n for f in figures for per_n in f["by_objects"].values() for n in per_n}, key=int)
    lines += ["", "| answer type | " + " | ".join(f"{n} object{'s' if n != '1' else ''}" for n in counts) + " |",
              "|---|" + "---:|" * len(counts)]
    for k in [k for k in kinds if k in figures[0]["by_objects"]]:
        cells = [_cell([f["by_objects"][k][n] for f in figures]) if all(n in f["by_objects"][k] for f in figures)
                 else "–" for n in counts]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if all("scene_probe" in f for f in figures):
        lines += ["", "| what the frozen tokens give a linear probe | read right |", "|---|---:|",
                  *(f"| {label} | {_cell([f['scene_probe'][key] for f in figures])} |" for key, label in
                    (("cells", "grid cells (empty, or shape, colour and size)"), ("objects", "objects"),
                     ("scenes", "whole pictures (all nine cells)")))]
        if all("pair_probe" in f for f in figures):
            lines += [f"| {label} | {_cell([f['pair_probe'][key] for f in figures])} |" for key, label in
                      (("seen", "held-out pictures: objects of a pair seen in training (shape, colour, size)"),
                       ("unseen", "held-out pictures: objects of a pair no training picture showed"))]
    if all("pair_answers" in f for f in figures):
        lines += ["", "| questions about an object the picture shows | right | wrong answers that say it is not there |",
                  "|---|---:|---:|"]
        for group in next(iter(figures))["pair_answers"]:
            per_seed = [f["pair_answers"][group] for f in figures]
            wrong = sum(c["questions"] - c["right"] for c in per_seed)
            rates = [c["right"] / c["questions"] for c in per_seed if c["questions"]]
            lines.append(f"| {group} | {_cell(rates) if rates else '–'} | "
                         f"{sum(c['says absent'] for c in per_seed)} of {wrong} |")
    lines += ["", "| goal | at least | mean | worst seed | |", "|---|---:|---:|---:|---|"]
    for row in goal_rows(results):
        signed = row["goal"] == "unseen vs seen"
        fmt = (lambda v: f"{100 * v:+.1f}") if signed else (lambda v: f"{100 * v:.1f}")
        verdict = "met" if row["met"] else f"short by {100 * row['short_by']:.1f} points"
        lines.append(f"| {row['goal']} | {fmt(row['at_least'])} | {fmt(row['mean'])} | {fmt(row['worst'])} | {verdict} |")
    columns = {f"world {results['world']} seed {s}": f for s, f in results["seeds"].items()}
    if against:
        columns.update({f"world {against['world']} seed {s}": f for s, f in against["seeds"].items()})
    stages = [s for s in STAGE_DIRS if any(s in f["minutes"] for f in columns.values())]
    lines += ["", "| minutes | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for stage in stages + ["total"]:
        cells = [f"{f['total_minutes'] if stage == 'total' else f['minutes'].get(stage, float('nan')):.1f}"
                 for f in columns.values()]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += ["", "Machine: " + "; ".join(sorted({f["machine"] for f in columns.values()}))]
    again = sorted({f"{', '.join(f['rerun']['stages'])} on {f['rerun']['machine']}"
                    for f in columns.values() if "rerun" in f})
    if again:
        lines[-1] += "; run again later (those minutes): " + "; ".join(again)
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, choices=sorted(WORLDS), default=2)
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="the seeds, run one after the other")
    p.add_argument("--folder", default=None, help="where the run folders go (default: runs/ in the project root)")
    p.add_argument("--nproc", type=int, default=1, help="processes per training stage (torchrun if > 1)")
    p.add_argument("--record", default=None, help="also write the record (JSON) to this file")
    p.add_argument("--relation-answers", choices=RELATION_ANSWERS, default=None,
                   help="how relation questions are answered (default: the recipe's, the verdict alone)")
    p.add_argument("--sft-steps", type=int, default=None,
                   help="SFT steps in place of the recipe's (the record's recipe says which were trained)")
    p.add_argument("--sft-object-repeats", type=object_repeats, default=None, metavar="N1,N2,...",
                   help="SFT takes a record with k objects N_k times an epoch, e.g. 1,2,3 (default: once each)")
    p.add_argument("--sft-flags", default=None, metavar='"--flag value ..."',
                   help="more flags for the SFT stage, as one string (write --sft-flags=\"--lr 5e-4\")")
    p.add_argument("--against", default=None,
                   help="another record (JSON) whose minutes go beside these: today's recipe on this machine")
    ns = p.parse_args(argv)
    if any(s < 0 for s in ns.seeds):
        p.error(f"--seeds must be >= 0, got {ns.seeds}")
    if ns.sft_steps is not None and ns.sft_steps < 1:
        p.error(f"--sft-steps must be at least 1, got {ns.sft_steps}")
    if ns.nproc < 1:
        p.error(f"--nproc must be at least 1, got {ns.nproc}")
    sft_flags = shlex.split(ns.sft_flags) if ns.sft_flags else None
    if sft_flags:
        try:
            check_stage_flags("sft", sft_flags)
        except ValueError as err:
            p.error(f"--sft-flags: {err}")
    against = json.loads(Path(ns.against).read_text(encoding="utf-8")) if ns.against else None
    results = run_seeds(ns.world, ns.seeds, Path(ns.folder) if ns.folder else None, ns.nproc,
                        Path(ns.record) if ns.record else None, ns.relation_answers, ns.sft_steps,
                        ns.sft_object_repeats, sft_flags)
    print(table_markdown(results, against))
    return results


if __name__ == "__main__":
    main()
