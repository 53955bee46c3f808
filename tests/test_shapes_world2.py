"""The shapes world's questions whose answer may be "no" or "nothing" (existence, absent objects,
grid relations) and its compositional split (colour-shape pairs no training picture shows).

Answers are checked two ways: against hand-worked scenes, and by re-deriving every generated
answer from its scene with the parser (``answer``), which shares no code with the generators
beyond the vocabularies.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import random
from collections import Counter

import pytest

from minimind_v.data.shapes import (ANSWER_TYPES, EXTRA_ANSWER_TYPES, POSITIONS, RELATIONS, ShapesWorldConfig, answer,
                                    generate_world, names_held_out_pair, position_phrase, questions,
                                    random_scene, region_phrase)

ALL_TYPES = ANSWER_TYPES + EXTRA_ANSWER_TYPES
PAIRS = (("red", "circle"), ("blue", "square"))
EVERY_PAIR = tuple((c, s) for c in ("red", "green", "blue", "yellow", "purple")
                   for s in ("circle", "square", "triangle", "cross"))

# A scene worked by hand: a small red circle top left, a large blue square in the centre, a large
# red triangle bottom right.
SCENE = [
    {"shape": "circle", "colour": "red", "size": "small", "position": "top left"},
    {"shape": "square", "colour": "blue", "size": "large", "position": "center"},
    {"shape": "triangle", "colour": "red", "size": "large", "position": "bottom right"},
]


@pytest.mark.parametrize("question, expected", [
    ("Is there a red circle?", "yes"),
    ("Is there a blue circle?", "no"),  # a near miss: a red circle and a blue square are there
    ("Can you see a large red object?", "yes"),
    ("Does the picture show a small square?", "no"),
    ("What colour is the cross?", "There is no cross."),
    ("What shape is at the top?", "Nothing is at the top."),
    ("What is on the left?", "Nothing is on the left."),
    ("Where is the green object?", "There is no green object."),
    ("Is the large circle small or large?", "There is no large circle."),
    ("What colour is the square in the top left?", "There is no square in the top left."),
    ("What shape is left of the blue square?", "circle"),
    ("What shape is right of the blue square?", "triangle"),
    ("Which shape is above the small object?", "nothing"),
    ("Is the circle above the triangle?", "yes"),
    ("Is the blue square left of the circle?", "no"),
    ("Is the triangle right of the small red shape?", "yes"),
])
def test_hand_worked_answers(question, expected):
    assert answer(SCENE, question, absent_ok=True) == expected


# The same questions answered worked: where the objects the question names are, then the verdict.
# SCENE's circle is in the top left, its square in the center, its triangle in the bottom right.
@pytest.mark.parametrize("question, expected", [
    ("What shape is left of the blue square?", "The blue square is in the center; left of it: circle."),
    ("What shape is right of the blue square?", "The blue square is in the center; right of it: triangle."),
    ("Which shape is above the small object?", "The small object is in the top left; above it: nothing."),
    ("Which shape is below the large red shape?", "The large red object is in the bottom right; below it: nothing."),
    ("Is the circle above the triangle?", "The circle is in the top left, the triangle in the bottom right: yes."),
    ("Is the blue square left of the circle?", "The blue square is in the center, the circle in the top left: no."),
    ("Is the triangle right of the small red shape?",
     "The triangle is in the bottom right, the small red object in the top left: yes."),
])
def test_hand_worked_relation_answers_in_the_worked_form(question, expected):
    assert answer(SCENE, question, absent_ok=True, relation_answers="worked") == expected


# Ordered: a yes/no question asking "below" or "right of" names its anchor first, so the verdict
# says whether the first object named is above (or left of) the second. The rest is as worked.
@pytest.mark.parametrize("question, expected", [
    ("Is the circle above the triangle?", "The circle is in the top left, the triangle in the bottom right: yes."),
    ("Is the triangle below the circle?", "The circle is in the top left, the triangle in the bottom right: yes."),
    ("Is the circle below the triangle?", "The triangle is in the bottom right, the circle in the top left: no."),
    ("Is the blue square left of the circle?", "The blue square is in the center, the circle in the top left: no."),
    ("Is the blue square right of the circle?", "The circle is in the top left, the blue square in the center: yes."),
    ("Is the triangle right of the small red shape?",
     "The small red object is in the top left, the triangle in the bottom right: yes."),
    ("What shape is left of the blue square?", "The blue square is in the center; left of it: circle."),
    ("Which shape is below the large red shape?", "The large red object is in the bottom right; below it: nothing."),
])
def test_hand_worked_relation_answers_in_the_ordered_form(question, expected):
    assert answer(SCENE, question, absent_ok=True, relation_answers="ordered") == expected


def test_ordered_yes_no_answers_say_whether_the_first_object_named_is_above_or_left_of_the_second():
    """The property the ordered form is made for, checked on many generated scenes: whatever the
    relation word, the verdict is whether the first position written is above it (above, below)
    or left of it (left of, right of) the second, read from the answer's own words."""
    rng = random.Random(11)
    phrases = sorted(((position_phrase(p), p) for p in POSITIONS), key=lambda x: -len(x[0]))
    checked = Counter()
    for _ in range(600):
        scene = random_scene(rng)
        for question, reply, kind in questions(scene, rng, ALL_TYPES, relation_answers="ordered"):
            if kind != "relation" or not question.startswith("Is "):
                continue
            relation = next(r for r in RELATIONS if f" {r} " in question)
            written = sorted((reply.index(phrase), position) for phrase, position in phrases if phrase in reply)
            (first, second) = [POSITIONS.index(position) for _, position in written]
            (r1, c1), (r2, c2) = divmod(first, 3), divmod(second, 3)
            earlier = r1 < r2 if relation in ("above", "below") else c1 < c2
            assert reply.endswith(": yes." if earlier else ": no."), (question, reply)
            checked[relation, reply[-4:]] += 1
    assert {r for r, _ in checked} == set(RELATIONS) and {v for _, v in checked} == {"yes.", " no."}, checked


# Regions: the anchor's place, the rows or columns the relation points to from it, then (yes/no)
# the subject's row or column, then the verdict.
@pytest.mark.parametrize("question, expected", [
    ("What shape is left of the blue square?", "The blue square is in the center; left of it: the left column: circle."),
    ("What shape is right of the blue square?",
     "The blue square is in the center; right of it: the right column: triangle."),
    ("Which shape is above the small object?", "The small object is in the top left; above it: no row: nothing."),
    ("Which shape is below the large red shape?",
     "The large red object is in the bottom right; below it: no row: nothing."),
    ("Which shape is above the large red shape?",
     "The large red object is in the bottom right; above it: the top and middle rows: nothing."),  # two: not asked
    ("Is the circle above the triangle?",
     "The triangle is in the bottom right; above it: the top and middle rows; the circle is in the top row: yes."),
    ("Is the blue square left of the circle?",
     "The circle is in the top left; left of it: no column; the blue square is in the center column: no."),
    ("Is the triangle right of the small red shape?",
     "The small red object is in the top left; right of it: the center and right columns; "
     "the triangle is in the right column: yes."),
    ("Is the circle below the blue square?",
     "The blue square is in the center; below it: the bottom row; the circle is in the top row: no."),
])
def test_hand_worked_relation_answers_in_the_regions_form(question, expected):
    if "above the large red" in question:  # the circle and the square are both above: two right answers
        with pytest.raises(ValueError, match="has 2 answers"):
            answer(SCENE, question, absent_ok=True, relation_answers="regions")
        return
    assert answer(SCENE, question, absent_ok=True, relation_answers="regions") == expected


@pytest.mark.parametrize("relation, position, expected", [
    ("left of", "top left", "no column"), ("left of", "top", "the left column"),
    ("left of", "bottom right", "the left and center columns"), ("right of", "left", "the center and right columns"),
    ("right of", "center", "the right column"), ("right of", "right", "no column"),
    ("above", "bottom", "the top and middle rows"), ("above", "left", "the top row"), ("above", "top right", "no row"),
    ("below", "top left", "the middle and bottom rows"), ("below", "center", "the bottom row"),
    ("below", "bottom left", "no row"),
])
def test_region_phrases_as_worked_out_by_hand(relation, position, expected):
    assert region_phrase(relation, position) == expected


def test_regions_answers_are_a_lookup_in_the_region_they_name():
    """What the regions form is made for, on many generated scenes, read from the answer's own words
    and the scene: a yes/no verdict is "yes" exactly when the subject's row or column is one the
    region names; a shape answer is the one object in the cells of the named region, "nothing"
    that there is none there."""
    rng = random.Random(12)
    checked = Counter()
    for _ in range(600):
        scene = random_scene(rng)
        for question, reply, kind in questions(scene, rng, ALL_TYPES, relation_answers="regions"):
            if kind != "relation":
                continue
            head, verdict = reply[:-1].rsplit(": ", 1)
            region = head.split(" it: ", 1)[1].split(";")[0].split(":")[0]
            lines = region.split()[1:-1] if region.startswith("the ") else []  # "the top and middle rows"
            lines = [w for w in lines if w != "and"]
            if question.startswith("Is "):
                line = head.rsplit(" is in the ", 1)[1].split()[0]
                assert verdict == ("yes" if line in lines else "no"), (question, reply)
            else:
                vertical = region.endswith(("row", "rows"))
                names = ("top", "middle", "bottom") if vertical else ("left", "center", "right")
                inside = [o["shape"] for o in scene
                          if names[divmod(POSITIONS.index(o["position"]), 3)[0 if vertical else 1]] in lines]
                assert len(inside) <= 1 and verdict == (inside[0] if inside else "nothing"), (question, reply)
            checked[question.startswith("Is "), verdict in ("yes", "nothing")] += 1
    assert len(checked) == 4 and min(checked.values()) > 20, checked


@pytest.mark.parametrize("form", ["worked", "ordered", "regions"])
def test_worked_relation_answers_ask_the_same_questions_and_only_relations_change(tmp_path, form):
    verdict, worked = _world(tmp_path, "verdict"), _world(tmp_path, form, relation_answers=form)
    for name in ("pretrain_data.json", "sft_data.json", "eval_data.json"):
        a, b = (json.loads((w / name).read_text()) for w in (verdict, worked))
        changed = 0
        for ra, rb in zip(a, b, strict=True):
            assert ra["scene"] == rb["scene"] and ra["image"] == rb["image"]
            kinds = ra.get("answer_types") or [ra.get("answer_type")] * (len(ra["conversations"]) // 2)
            for i, (ta, tb) in enumerate(zip(ra["conversations"], rb["conversations"], strict=True)):
                if i % 2 == 0 or kinds[i // 2] != "relation" or name == "pretrain_data.json":
                    assert ta == tb, (name, ra["id"])  # questions, captions and other answers as they were
                    continue
                # The worked answer ends in the verdict alone answers, and is re-derived from the scene.
                assert tb["value"].endswith(f": {ta['value']}."), (ta, tb)
                question = ra["conversations"][i - 1]["value"]
                assert answer(rb["scene"], question, absent_ok=True, relation_answers=form) == tb["value"]
                changed += 1
        assert changed > 10 or name == "pretrain_data.json"
    assert json.loads((worked / "world.json").read_text())["config"]["relation_answers"] == form
    assert "relation_answers" not in json.loads((verdict / "world.json").read_text())["config"]


def test_ambiguous_and_absent_questions_are_refused_unless_the_world_asks_them():
    # Both the square and the triangle are below the circle: two right answers.
    with pytest.raises(ValueError, match="has 2 answers"):
        answer(SCENE, "What shape is below the circle?", absent_ok=True)
    with pytest.raises(ValueError, match="refers to 0 objects"):
        answer(SCENE, "What colour is the cross?")
    with pytest.raises(ValueError, match="refers to 2 objects"):
        answer(SCENE, "What colour is the large object?", absent_ok=True)


def test_every_generated_question_is_answered_from_its_scene():
    rng = random.Random(7)
    seen = Counter()
    for _ in range(400):
        scene = random_scene(rng)
        for question, expected, kind in questions(scene, rng, ALL_TYPES):
            assert answer(scene, question, absent_ok=True) == expected, (scene, question)
            seen[kind, expected if kind in ("existence", "relation") and expected in ("yes", "no", "nothing")
                 else "other"] += 1
    assert {k for k, _ in seen} == set(ALL_TYPES)
    # Existence is about half yes, half no; relations sometimes answer "nothing", yes and no.
    yes, no = seen["existence", "yes"], seen["existence", "no"]
    assert 0.4 < yes / (yes + no) < 0.6
    assert min(seen["relation", "nothing"], seen["relation", "yes"], seen["relation", "no"]) > 10


def test_existence_near_misses_differ_from_a_present_object_in_one_attribute():
    rng = random.Random(3)
    checked = 0
    for _ in range(300):
        scene = random_scene(rng)
        for question, expected, kind in questions(scene, rng, ("existence",)):
            if expected != "no":
                continue
            words = question.rstrip("?").split()[-3:]
            asked = {w for w in words}
            best = max(len(asked & {o["shape"], o["colour"], o["size"]}) for o in scene)
            assert best >= 1, (question, scene)  # shares attributes with something present
            checked += 1
    assert checked > 50


def _world(tmp_path, name, **overrides):
    config = ShapesWorldConfig(seed=5, n_pretrain=150, n_sft=150, n_eval=240, n_eval_images=3, image_size=96,
                               workers=1, question_types=ALL_TYPES, held_out_pairs=PAIRS, **overrides)
    out = tmp_path / name
    generate_world(out, config, progress=False)
    return out


def test_world_two_records_answer_from_their_scenes_and_hold_out_pairs(tmp_path):
    world = _world(tmp_path, "a")
    cfg = ShapesWorldConfig(question_types=ALL_TYPES, held_out_pairs=PAIRS)
    pretrain = json.loads((world / "pretrain_data.json").read_text())
    sft = json.loads((world / "sft_data.json").read_text())
    evaluation = json.loads((world / "eval_data.json").read_text())
    # Training pictures, captions and questions never show or name a held-out pair.
    for record in pretrain + sft:
        assert not any((o["colour"], o["shape"]) in PAIRS for o in record["scene"]), record["id"]
        for turn in record["conversations"]:
            assert not names_held_out_pair(turn["value"], cfg), (record["id"], turn["value"])
    for demo in json.loads((world / "world.json").read_text())["eval_images"]:
        assert not any((o["colour"], o["shape"]) in PAIRS for o in demo["scene"])
    # The held-out set has both splits; an unseen picture shows a held-out pair, a seen one none.
    splits = Counter(r["combination"] for r in evaluation)
    assert splits["seen"] > 60 and splits["unseen"] > 60
    for r in evaluation:
        shows = any((o["colour"], o["shape"]) in PAIRS for o in r["scene"])
        assert shows == (r["combination"] == "unseen"), r["id"]
    # Every answer, in every split, is re-derived from the scene.
    for record in sft + evaluation:
        turns = record["conversations"]
        for q, a in zip(turns[::2], turns[1::2]):
            assert answer(record["scene"], q["value"], absent_ok=True) == a["value"], (record["id"], q["value"])
    assert Counter(r["answer_type"] for r in evaluation) == {k: 30 for k in ALL_TYPES}
    assert {k for r in sft for k in r["answer_types"]} == set(ALL_TYPES)


def test_the_same_seed_gives_byte_identical_files(tmp_path):
    a, b = _world(tmp_path, "a"), _world(tmp_path, "b")
    comparison = filecmp.dircmp(a, b)
    assert not comparison.diff_files and not comparison.left_only and not comparison.right_only
    for sub in comparison.common_dirs:
        _, mismatch, errors = filecmp.cmpfiles(a / sub, b / sub, [p.name for p in (a / sub).iterdir()], shallow=False)
        assert not mismatch and not errors, sub
    for name in ("pretrain_data.json", "sft_data.json", "eval_data.json", "world.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    c = _world(tmp_path, "c", unseen_eval_fraction=0.3)
    assert (a / "eval_data.json").read_bytes() != (c / "eval_data.json").read_bytes()


def test_world_two_is_still_the_world_its_recorded_seeds_trained_on(tmp_path):
    """Digests of a small world-2 world as the code that trained docs/seeds_world2.json wrote it: a
    change that draws from the seeded generator in another order gives another world under the
    same fingerprint, and recorded runs would be reused on data they never saw."""
    config = ShapesWorldConfig(seed=5, n_pretrain=40, n_sft=150, n_eval=120, n_eval_images=2, image_size=96,
                               workers=1, question_types=ALL_TYPES,
                               held_out_pairs=(("red", "triangle"), ("blue", "cross")))
    generate_world(tmp_path / "w", config, progress=False)
    digests = {name: hashlib.sha256((tmp_path / "w" / name).read_bytes()).hexdigest()
               for name in ("sft_data.json", "eval_data.json", "world.json")}
    assert digests == {
        "sft_data.json": "60e81137d6773b82da3a89b08e4b300765b1881ac974a27f27c3f8c3f599c6d4",
        "eval_data.json": "68b1276fa6ed0bbbb890f9788f82eb75d84f0c02ac4207836544b82ca02d376f",
        "world.json": "1f5814d42dcd8765720ff596ce1ab12a680fbd5f85f1d858639d89492211b64b",
    }


@pytest.mark.parametrize("overrides, message", [
    (dict(question_types=("colour", "mood")), "question_types"),
    (dict(question_types=("colour", "colour")), "question_types"),
    (dict(held_out_pairs=(("red", "hexagon"),)), "held_out_pairs"),
    (dict(held_out_pairs=EVERY_PAIR), "every colour-shape pair"),
    (dict(held_out_pairs=PAIRS, unseen_eval_fraction=1.0), "unseen_eval_fraction"),
    (dict(relation_answers="shown"), "relation_answers"),
])
def test_bad_world_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        ShapesWorldConfig(**overrides).validate()


def test_repeat_by_objects_counts_the_fuller_picture_and_refuses_records_without_scenes():
    from minimind_v.data.shapes_records import repeat_by_objects

    one, three = [{"shape": "circle"}], [{"shape": "circle"}, {"shape": "square"}, {"shape": "cross"}]
    records = [{"id": "a", "scene": three}, {"id": "b", "scene": one},
               {"id": "c", "scenes": [one, three[:2]]}]  # two pictures: the fuller one has 2 objects
    assert [r["id"] for r in repeat_by_objects(records, (1, 4, 2))] == ["a", "a", "b", "c", "c", "c", "c"]
    assert repeat_by_objects(records, (1, 1, 1)) == records
    with pytest.raises(ValueError, match=r"here\[1\]: no scene description"):
        repeat_by_objects([records[0], {"id": "x", "image": "x.png"}], (1, 2, 3), where="here")


def test_repeat_found_relations_takes_records_whose_relation_holds_more_often():
    from minimind_v.data.shapes_records import repeat_found_relations

    def record(rid, *turns):  # turns: (answer type, answer)
        conversations = [m for kind, answer in turns for m in ({"from": "human", "value": "?"},
                                                                {"from": "gpt", "value": answer})]
        return {"id": rid, "conversations": conversations, "answer_types": [kind for kind, _ in turns]}

    records = [record("nothing", ("relation", "nothing"), ("colour", "red")),
               record("no", ("count", "two"), ("relation", "no")),
               record("object", ("relation", "nothing"), ("relation", "the red circle")),
               record("yes", ("relation", "Yes.")),
               record("colour yes", ("existence", "yes"), ("colour", "blue"))]  # a "yes" that is no relation
    assert [r["id"] for r in repeat_found_relations(records, 3)] == [
        "nothing", "no", "object", "object", "object", "yes", "yes", "yes", "colour yes"]
    assert repeat_found_relations(records, 1) == records
    with pytest.raises(ValueError, match=r"here\[1\] \(x\): no answer_types"):
        repeat_found_relations([records[0], {"id": "x", "conversations": []}], 2, where="here")
    with pytest.raises(ValueError, match=r"here\[0\] \(y\): its conversations are not"):
        repeat_found_relations([{"id": "y", "conversations": [{}, {}], "answer_types": ["relation"]}], 2, where="here")


def counted(question: str) -> str:
    """What a count question counts: "How many red objects are there?" -> "red objects"."""
    import re

    return re.search(r"(circles|squares|triangles|crosses|\w+ objects)", question).group(1)


def test_count_shared_asks_what_objects_share_and_answers_from_the_scene(tmp_path):
    """`--count-shared`: count questions answered "one" are asked again about a shape or colour that
    several objects share; worked by hand on one record, then re-derived from the scenes of a world."""
    import copy

    from minimind_v.data.shapes_records import count_shared

    scene = [{"shape": "cross", "colour": "red", "size": "small", "position": "top left", "offset": [0, 0]},
             {"shape": "cross", "colour": "blue", "size": "large", "position": "center", "offset": [0, 0]},
             {"shape": "circle", "colour": "red", "size": "small", "position": "bottom", "offset": [0, 0]}]
    turns = [("<image>\nWhat colour is the circle?", "red"), ("How many circles are there?", "one"),
             ("Count the blue objects in the image.", "one"), ("How many objects are there?", "three")]
    record = {"id": "r", "scene": scene, "answer_types": ["colour", "count", "count", "count"],
              "conversations": [{"from": f, "value": v} for q, a in turns for f, v in (("human", q), ("gpt", a))]}
    (after,) = count_shared([record], seed=1)
    said = [t["value"] for t in after["conversations"]]
    assert said[:2] == ["<image>\nWhat colour is the circle?", "red"]  # not a count: left as it was
    assert said[6:] == ["How many objects are there?", "three"]  # not "one": left as it was
    assert said[3] == said[5] == "two"  # two crosses, two red objects: each asked once
    assert {counted(said[2]), counted(said[4])} == {"crosses", "red objects"}
    assert record["conversations"][3]["value"] == "one"  # the input is not changed
    with pytest.raises(ValueError, match=r"here\[0\] \(r\): 4 answer types for 6 turns"):
        count_shared([{**record, "conversations": record["conversations"][:6]}], seed=1, where="here")

    sft = json.loads((_world(tmp_path, "a") / "sft_data.json").read_text())
    kept = copy.deepcopy(sft)
    out = count_shared(sft, seed=3)
    assert sft == kept and count_shared(sft, seed=3) == out  # the same seed, the same records
    changed = 0
    for before, now in zip(sft, out):
        assert (now["id"], now.get("answer_types")) == (before["id"], before.get("answer_types"))
        if "scenes" in before:  # two pictures: left alone
            assert now == before
            continue
        asked = []
        pairs = zip(before["conversations"][::2], before["conversations"][1::2], now["conversations"][::2],
                    now["conversations"][1::2], before["answer_types"])
        for q0, a0, q1, a1, kind in pairs:
            if (q0, a0) == (q1, a1):
                continue
            changed += 1
            assert kind == "count" and a0["value"] == "one"
            assert answer(before["scene"], q1["value"], absent_ok=True) == a1["value"] in ("two", "three")
            assert q0["value"].startswith("<image>\n") == q1["value"].startswith("<image>\n")
            assert q0["value"].endswith("\n<image>") == q1["value"].endswith("\n<image>")
            asked.append(counted(q1["value"]))
        assert len(asked) == len(set(asked))
    assert changed > 10
