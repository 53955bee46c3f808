"""The held-out-pair report: questions grouped by the object they name, counts worked out by hand,
and the groups checked against a generated world's own labels."""

import json

import pytest

from minimind_v.data.shapes import ANSWER_TYPES, EXTRA_ANSWER_TYPES, ShapesWorldConfig, generate_world
from minimind_v.data.shapes_answers import parse_question
from minimind_v.pair_report import GROUPS, main, pair_counts, question_group, says_absent

PAIRS = {("red", "triangle")}
WITH_PAIR = [{"shape": "triangle", "colour": "red", "size": "small", "position": "top left"},
             {"shape": "circle", "colour": "blue", "size": "large", "position": "center"}]
WITHOUT = [{"shape": "triangle", "colour": "green", "size": "large", "position": "bottom"}]


@pytest.mark.parametrize("reply, absent", [
    ("There is no small triangle.", True), ("Nothing is in the center.", True), ("no", True),
    ("nothing", True), ("No.", True), ("red", False), ("top left", False), ("yes", False),
    ("notably red", False),
])
def test_says_absent(reply, absent):
    assert says_absent(reply) is absent


@pytest.mark.parametrize("question, scene, group", [
    ("What colour is the triangle?", WITH_PAIR, GROUPS[2]),          # the red triangle
    ("What colour is the object in the top left?", WITH_PAIR, GROUPS[2]),
    ("Where is the blue circle?", WITH_PAIR, GROUPS[1]),             # beside it
    ("What shape is the large object?", WITH_PAIR, GROUPS[1]),
    ("What colour is the triangle?", WITHOUT, GROUPS[0]),            # green: no pair in the picture
    ("What colour is the cross?", WITH_PAIR, None),                  # nothing there
    ("How many triangles are there?", WITH_PAIR, GROUPS[2]),         # grouped; counted only where asked
    ("Is the circle below the triangle?", WITH_PAIR, None),          # a relation names no single object
])
def test_questions_fall_in_the_group_of_the_object_they_name(question, scene, group):
    assert question_group(question, scene, PAIRS) == group


def _answer(i, kind, question, truth, prediction):
    return {"id": f"q{i}", "type": kind, "question": question, "answer": truth, "prediction": prediction,
            "correct": truth.lower() == prediction.lower()}


ANSWERS = [
    _answer(0, "colour", "What colour is the triangle?", "red", "red"),
    _answer(1, "colour", "What colour is the small triangle?", "red", "There is no small triangle."),
    _answer(2, "position", "Where is the triangle?", "top left", "center"),
    _answer(3, "existence", "Is there a small triangle?", "yes", "no"),
    _answer(4, "size", "What size is the circle?", "large", "large"),
    _answer(5, "shape", "What shape is the blue object?", "circle", "There is no blue object."),
    _answer(6, "colour", "What colour is the triangle?", "green", "green"),
    _answer(7, "existence", "Is there a red square?", "no", "no"),              # truth "no": not counted
    _answer(8, "absent", "What colour is the cross?", "There is no cross.", "There is no cross."),
    _answer(9, "count", "How many triangles are there?", "one", "two"),        # a count: not counted
]
RECORDS = {"q0": WITH_PAIR, "q1": WITH_PAIR, "q2": WITH_PAIR, "q3": WITH_PAIR, "q4": WITH_PAIR, "q5": WITH_PAIR,
           "q6": WITHOUT, "q7": WITHOUT, "q8": WITH_PAIR, "q9": WITH_PAIR}


def test_counts_worked_by_hand():
    counts = pair_counts(ANSWERS, {k: {"scene": v} for k, v in RECORDS.items()}, PAIRS)
    pair, beside, seen = counts[GROUPS[2]], counts[GROUPS[1]], counts[GROUPS[0]]
    # The red triangle: q0 right; q1 and q3 deny it; q2 names the wrong place.
    assert (pair["questions"], pair["right"], pair["says absent"]) == (4, 1, 2)
    assert (pair["colour questions"], pair["colour right"], pair["existence questions"]) == (2, 1, 1)
    # The blue circle beside it: q4 right, q5 denies it.
    assert (beside["questions"], beside["right"], beside["says absent"]) == (2, 1, 1)
    assert (seen["questions"], seen["right"], seen["says absent"]) == (1, 1, 0)


def _run(folder, answers, records, pairs=(("red", "triangle"),)):
    (folder / "world").mkdir(parents=True)
    (folder / "eval").mkdir()
    (folder / "world" / "world.json").write_text(json.dumps({"config": {"held_out_pairs": [list(p) for p in pairs]}}))
    (folder / "world" / "eval_data.json").write_text(json.dumps([{"id": k, "scene": v} for k, v in records.items()]))
    (folder / "eval" / "answers.json").write_text(json.dumps(answers))
    return folder


def test_the_command_prints_each_run_and_all_together(tmp_path, capsys):
    a = _run(tmp_path / "a", ANSWERS, RECORDS)
    b = _run(tmp_path / "b", ANSWERS[:2], RECORDS)
    main([str(a), str(b)])
    out = capsys.readouterr().out
    assert f"{a} (held out: red triangle)" in out and "all 2 together" in out
    together = out.split("all 2 together")[1]
    # a: 4 questions, 1 right, 2 denials; b (q0 right, q1 denied): 2 questions, 1 right, 1 denial
    assert "| the held-out pair's object | 33.3% (2 / 6) | 4 | 3 |" in together
    assert "| another object, picture with one | 50.0% (1 / 2) | 1 | 1 |" in together


def test_the_command_names_what_it_cannot_use(tmp_path):
    with pytest.raises(SystemExit, match="holds out no colour-shape pair"):
        main([str(_run(tmp_path / "w1", ANSWERS, RECORDS, pairs=()))])
    with pytest.raises(SystemExit, match=r"cannot read the world's settings from .*missing.*world\.json"):
        main([str(tmp_path / "missing")])
    run = _run(tmp_path / "broken", ANSWERS, RECORDS)
    (run / "world" / "eval_data.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"cannot read .*eval_data\.json"):
        main([str(run)])
    with pytest.raises(SystemExit, match="has no held-out record of that id"):
        main([str(_run(tmp_path / "other", ANSWERS, {"q0": WITH_PAIR}))])
    with pytest.raises(SystemExit, match="is not an evaluation's answers.json"):
        main([str(_run(tmp_path / "rows", [{"id": "q0"}], RECORDS))])


def test_groups_agree_with_a_generated_worlds_own_labels(tmp_path):
    """On a generated world-2 world: every question grouped 'without a held-out pair' comes from a
    record the generator labelled 'seen', the other two groups from 'unseen' ones; and a colour
    question about a held-out pair's object that names the shape has a held-out pair as its
    (answer colour, shape), worked out from the generator's answer, not the scene."""
    pairs = (("red", "triangle"), ("blue", "cross"))
    config = ShapesWorldConfig(seed=7, n_pretrain=20, n_sft=20, n_eval=400, n_eval_images=2, image_size=96, workers=1,
                               question_types=ANSWER_TYPES + EXTRA_ANSWER_TYPES, held_out_pairs=pairs)
    generate_world(tmp_path / "w", config, progress=False)
    records = json.loads((tmp_path / "w" / "eval_data.json").read_text())
    grouped = {group: 0 for group in GROUPS}
    colour_checked = 0
    for r in records:
        question, truth = r["conversations"][0]["value"], r["conversations"][1]["value"]
        group = question_group(question, r["scene"], set(pairs))
        if group is None:
            continue
        grouped[group] += 1
        assert r["combination"] == ("seen" if group == GROUPS[0] else "unseen"), question
        kind, constraints = parse_question(question)
        if group == GROUPS[2] and kind == "colour" and "shape" in constraints:
            assert (truth.rstrip("."), constraints["shape"]) in pairs, question
            colour_checked += 1
    assert min(grouped.values()) > 20 and colour_checked > 3, (grouped, colour_checked)
