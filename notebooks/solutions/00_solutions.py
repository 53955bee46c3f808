"""Chapter 0, exercises: worked solutions.

Each exercise is one function that computes its answer, checks it with an assert, and returns
it. Run them all with ``python notebooks/solutions/00_solutions.py``; ``tests/test_exercises.py``
runs them too. Every world here is small and written to a temporary folder: seconds, no run
folder needed.
"""

from __future__ import annotations

import math
import random
import tempfile
from collections import Counter
from pathlib import Path

from minimind_v.baselines import chance, majority
from minimind_v.data import shapes
from minimind_v.data.datasets import read_records
from minimind_v.data.shapes import ShapesWorldConfig, generate_world


def small_world(folder: Path, **settings) -> Path:
    config = ShapesWorldConfig(**{**dict(seed=0, n_pretrain=40, n_sft=40, n_eval=120, n_eval_images=2, workers=1),
                                  **settings})
    generate_world(folder, config, progress=False)
    return folder


def exercise_1():
    """One object alone: 4 shapes x 5 colours x 2 sizes x 9 positions = 360 descriptions (each
    drawn a little off its cell's centre, so the pictures themselves are more varied still)."""
    rng = random.Random(0)
    seen = set()
    for _ in range(20_000):
        (obj,) = shapes.random_scene(rng, 1, 1)
        seen.add((obj["shape"], obj["colour"], obj["size"], obj["position"]))
    expected = len(shapes.SHAPES) * len(shapes.COLOURS) * len(shapes.SIZES) * len(shapes.POSITIONS)
    assert expected == 360 and len(seen) == expected
    print(f"{len(seen)} one-object descriptions, as 4 x 5 x 2 x 9 predicts")
    return len(seen)


def exercise_2():
    """Every SFT answer of a world is what `shapes.answer` derives from the scene and the question
    alone: the data can be checked, and so can every answer a model gives."""
    with tempfile.TemporaryDirectory() as tmp:
        world = small_world(Path(tmp) / "world")
        records = read_records(world / "sft_data.json")
    checked = 0
    for record in records:
        turns = record["conversations"]
        for question, reply in zip(turns[::2], turns[1::2]):
            text = question["value"].replace("<image>", "").strip()
            assert shapes.answer(record["scene"], text, absent_ok=True) == reply["value"], (text, reply)
            checked += 1
    print(f"{checked} answers in {len(records)} SFT records, every one re-derived from its scene")
    return checked


def exercise_3():
    """Hold a pair out: no training picture shows a red triangle, and no caption or question names
    one; the held-out set mixes pictures with it ("unseen") and without ("seen")."""
    with tempfile.TemporaryDirectory() as tmp:
        config = dict(held_out_pairs=(("red", "triangle"),))
        world = small_world(Path(tmp) / "world", **config)
        cfg = ShapesWorldConfig(**config)
        training = read_records(world / "pretrain_data.json") + read_records(world / "sft_data.json")
        held_out = read_records(world / "eval_data.json")
    assert not any(shapes.has_held_out_pair(r["scene"], cfg) for r in training)
    assert not any(shapes.names_held_out_pair(t["value"], cfg) for r in training for t in r["conversations"])
    kinds = Counter(r["combination"] for r in held_out)
    assert kinds["unseen"] > 0 and kinds["seen"] > 0
    assert all(shapes.has_held_out_pair(r["scene"], cfg) == (r["combination"] == "unseen") for r in held_out)
    print(f"training: no red triangle in {len(training)} records; held out: {dict(kinds)}")
    return dict(kinds)


def exercise_4():
    """Chance is 1/5 for a colour, 1/4 for a shape, 1/2 for a size, 1/9 for a position and 1/3 for
    a count (one to three objects). Guessing the training set's most frequent answer for each
    question form does better only where the wording gives the answer away."""
    with tempfile.TemporaryDirectory() as tmp:
        world = small_world(Path(tmp) / "world", n_sft=200)
        train, held_out = read_records(world / "sft_data.json"), read_records(world / "eval_data.json")
    by_chance, by_majority = chance(held_out)["per_type"], majority(train, held_out)["per_type"]
    predicted = {"colour": 1 / 5, "count": 1 / 3, "position": 1 / 9, "shape": 1 / 4, "size": 1 / 2}
    assert by_chance.keys() == predicted.keys()
    assert all(math.isclose(by_chance[k], predicted[k]) for k in predicted), by_chance
    print({k: f"chance {by_chance[k]:.2f}, majority {by_majority[k]:.2f}" for k in by_chance})
    return by_chance, by_majority


if __name__ == "__main__":
    for exercise in (exercise_1, exercise_2, exercise_3, exercise_4):
        exercise()
