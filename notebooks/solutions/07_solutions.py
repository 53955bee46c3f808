"""Chapter 7, exercises: worked solutions.

Each exercise is one function that computes its answer, checks it with an assert, and returns
it. Run them all with ``python notebooks/solutions/07_solutions.py``; ``tests/test_exercises.py``
runs them too. Nothing here needs a trained model: the answers are made by hand or derived from
small generated worlds (seconds).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from minimind_v.baselines import chance
from minimind_v.config import MiniMindConfig
from minimind_v.data import shapes
from minimind_v.data.datasets import read_records
from minimind_v.data.shapes import ShapesWorldConfig, generate_world
from minimind_v.evaluate import accuracy_by_objects, normalise
from minimind_v.model.chat_inputs import picture_in_front
from minimind_v.model.llm import MiniMindForCausalLM


def exercise_1():
    """Exact match after `normalise` (lower case, single spaces, no trailing full stop or '!'):
    "Top left." and "top  left" count, "2" for "two", "a red one" for "red" and "top-left" do not.
    The shapes world's answers are single words or fixed phrases, so exact match is fair here;
    free-form captions would need another measure."""
    reference = "top left"
    candidates = {"Top left.": True, "top  left": True, "TOP LEFT!": True, "top-left": False, "left": False}
    judged = {c: normalise(c) == normalise(reference) for c in candidates}
    assert judged == candidates
    assert normalise("2") != normalise("two") and normalise("a red one") != normalise("red")
    print(judged)
    return judged


def exercise_2():
    """By hand: one-object pictures 2 of 2 right (100%), two objects 1 of 2 (50%), three objects 0
    of 1; overall per group the same, since every row here is a colour question."""
    scenes = {"a": 1, "b": 1, "c": 2, "d": 2, "e": 3}
    records = [{"id": rid, "scene": [{}] * n} for rid, n in scenes.items()]
    rows = [{"id": rid, "type": "colour", "correct": rid in ("a", "b", "c")} for rid in scenes]
    table = accuracy_by_objects(rows, records)
    assert table == {"colour": {1: 1.0, 2: 0.5, 3: 0.0}, "overall": {1: 1.0, 2: 0.5, 3: 0.0}}
    print(table)
    return table


def exercise_3():
    """A question about an absent object: chance among the distinct held-out answers is a few
    percent, yet the answer is fixed by the question's own words ("What colour is the triangle?"
    -> "there is no triangle"). The picture decides only *whether* the object is there; a model
    that learned that can copy the rest. "Uniform chance" is a weak yardstick for such a type."""
    with tempfile.TemporaryDirectory() as tmp:
        config = ShapesWorldConfig(seed=0, n_pretrain=10, n_sft=10, n_eval=300, n_eval_images=1, workers=1,
                                   question_types=("colour", "absent"))
        generate_world(Path(tmp) / "world", config, progress=False)
        held_out = read_records(Path(tmp) / "world" / "eval_data.json")
    absent = [r for r in held_out if r["answer_type"] == "absent"]
    for r in absent:
        question, reply = (t["value"].replace("<image>", "").strip() for t in r["conversations"][:2])
        _, constraints = shapes.parse_question(question)
        assert reply == shapes.absent_answer(constraints)  # the words of the answer are the question's
    by_chance = chance(held_out)["per_type"]["absent"]
    assert by_chance < 0.1
    print(f"{len(absent)} absent-object answers, each spelled out by its question; uniform chance {by_chance:.1%}")
    return by_chance


def exercise_4():
    """Only a lone tag that is not already in front moves; a question with two pictures keeps its
    order (its words say which picture is which). Under the causal mask a position sees only what
    comes before it: with the picture first, the picture's hidden states are the same whatever is
    asked after it (every layer's); with the question first, they depend on the question. A tiny
    random decoder shows it, with ids standing in for the 50 picture tokens."""
    moved = {q: picture_in_front(q) for q in ("What colour is the circle?\n<image>",
                                              "<image>\nWhat colour is the circle?",
                                              "Is <image> bigger than <image>?", "What is <image> here?")}
    assert moved == {"What colour is the circle?\n<image>": "<image>\nWhat colour is the circle?",
                     "<image>\nWhat colour is the circle?": "<image>\nWhat colour is the circle?",
                     "Is <image> bigger than <image>?": "Is <image> bigger than <image>?",
                     "What is <image> here?": "<image>\nWhat is here?"}
    with torch.random.fork_rng():  # a seeded random model, the global generator left as it was
        torch.manual_seed(0)
        model = MiniMindForCausalLM(MiniMindConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, n_kv_heads=2)).eval()
    picture = torch.arange(10, 18)
    questions = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])

    def picture_states(question, picture_first):
        ids = torch.cat([picture, question] if picture_first else [question, picture])[None]
        with torch.no_grad():
            states = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        return states[:len(picture)] if picture_first else states[len(question):]

    same = torch.equal(*(picture_states(q, True) for q in questions))
    differ = not torch.allclose(*(picture_states(q, False) for q in questions))
    assert same and differ
    print(moved, f"\npicture first: picture states equal for two questions: {same}; "
          f"question first: they differ: {differ}")
    return moved, same, differ


if __name__ == "__main__":
    for exercise in (exercise_1, exercise_2, exercise_3, exercise_4):
        exercise()
