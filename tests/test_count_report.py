"""The count report: count questions grouped by what they count and how many objects fit, worked
out by hand, and the report's table read from a run folder written here."""

import json

import pytest

from minimind_v.count_report import GROUPS, count_counts, count_group, main

TWO_CROSSES = [{"shape": "cross", "colour": "red", "size": "small", "position": "top left"},
               {"shape": "cross", "colour": "blue", "size": "large", "position": "center"},
               {"shape": "circle", "colour": "red", "size": "small", "position": "bottom"}]
TWIN_SQUARES = [{"shape": "square", "colour": "green", "size": "small", "position": "left"},
                {"shape": "square", "colour": "green", "size": "large", "position": "right"}]
ONE = [{"shape": "triangle", "colour": "yellow", "size": "large", "position": "center"}]


@pytest.mark.parametrize("question, scene, group", [
    ("How many objects are there?", TWO_CROSSES, GROUPS[0]),
    ("Count the small objects in the image.", TWO_CROSSES, GROUPS[1]),
    ("How many triangles can you see?", ONE, GROUPS[2]),
    ("<image>\nHow many yellow objects are in the picture?", ONE, GROUPS[2]),
    ("How many circles are there?", TWO_CROSSES, GROUPS[3]),           # one of three fits
    ("How many blue objects are there?", TWO_CROSSES, GROUPS[3]),
    ("How many squares are there?", TWIN_SQUARES, GROUPS[4]),          # two, both green
    ("How many green objects are there?", TWIN_SQUARES, GROUPS[4]),    # two, both squares
    ("How many crosses are there?", TWO_CROSSES, GROUPS[5]),           # a red cross and a blue one
    ("Count the red objects in the image.", TWO_CROSSES, GROUPS[5]),   # a cross and a circle
])
def test_count_questions_fall_in_the_group_of_what_they_count(question, scene, group):
    assert count_group(question, scene) == group


def _answer(i, question, truth, prediction, kind="count"):
    return {"id": f"q{i}", "type": kind, "question": question, "answer": truth, "prediction": prediction,
            "correct": truth == prediction.lower().rstrip(".")}


ANSWERS = [
    _answer(0, "How many crosses are there?", "two", "one"),
    _answer(1, "How many crosses can you see?", "two", "Two."),
    _answer(2, "How many circles are there?", "one", "one"),
    _answer(3, "How many objects are there?", "three", "three"),
    _answer(4, "How many triangles can you see?", "one", "One"),
    _answer(5, "What colour is the circle?", "red", "one", kind="colour"),   # not a count: left out
]
RECORDS = {f"q{i}": {"id": f"q{i}", "scene": TWO_CROSSES} for i in range(6)} | {"q4": {"id": "q4", "scene": ONE}}


def test_counts_worked_out_by_hand():
    counts = count_counts(ANSWERS, RECORDS)
    assert counts[GROUPS[5]] == {"questions": 2, "right": 1, "says one": 1}
    assert counts[GROUPS[3]] == {"questions": 1, "right": 1, "says one": 1}
    assert counts[GROUPS[0]] == {"questions": 1, "right": 1, "says one": 0}
    assert counts[GROUPS[2]] == {"questions": 1, "right": 1, "says one": 1}  # "One": normalised
    assert sum(c["questions"] for c in counts.values()) == 5
    with pytest.raises(ValueError, match="answer 'q9' has no held-out record"):
        count_counts([_answer(9, "How many objects are there?", "one", "one")], RECORDS)


def test_the_report_reads_a_run_folder_and_refuses_a_broken_one(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "world").mkdir(parents=True)
    (run / "eval").mkdir()
    (run / "world" / "eval_data.json").write_text(json.dumps(list(RECORDS.values())))
    (run / "eval" / "answers.json").write_text(json.dumps(ANSWERS))
    main([str(run), str(run)])
    out = capsys.readouterr().out
    assert f"| {GROUPS[5]} | 50.0% (1 / 2) | 50.0% (1 / 2) |" in out
    assert "all 2 together" in out and f"| {GROUPS[5]} | 50.0% (2 / 4) | 50.0% (2 / 4) |" in out
    (run / "eval" / "answers.json").write_text("[{\"id\": 1}]")
    with pytest.raises(SystemExit, match=r"count_report: .*answers.json is not an evaluation's answers.json"):
        main([str(run)])


def test_the_sft_split_counts_what_sft_showed_and_asks_it_again_as_count_shared_does(tmp_path, capsys):
    from minimind_v.data.shapes_records import count_shared

    turns = [("How many circles are there?", "one"), ("How many objects are there?", "three"),
             ("What colour is the circle?", "red")]
    record = {"id": "r", "scene": TWO_CROSSES, "answer_types": ["count", "count", "colour"],
              "conversations": [{"from": f, "value": v} for q, a in turns for f, v in (("human", q), ("gpt", a))]}
    two_pictures = {"id": "t", "scenes": [ONE, ONE], "answer_types": ["count"], "conversations": []}
    run = tmp_path / "run"
    (run / "world").mkdir(parents=True)
    (run / "world" / "sft_data.json").write_text(json.dumps([record, two_pictures]))
    (run / "recipe.json").write_text(json.dumps({"recipe": {"seed": 3}}))
    main(["--sft", str(run)])
    out = capsys.readouterr().out
    assert f"| {GROUPS[3]} | 100.0% (1 / 1) | 100.0% (1 / 1) |" in out  # "one" circle of three objects
    assert f"| {GROUPS[0]} | 100.0% (1 / 1) | 0.0% (0 / 1) |" in out
    main(["--sft", "--count-shared", str(run)])
    out = capsys.readouterr().out
    assert f"| {GROUPS[3]} | - | - |" in out  # asked again about the two crosses or the two red objects
    assert f"| {GROUPS[5]} | 100.0% (1 / 1) | 0.0% (0 / 1) |" in out
    assert count_shared([record], 3)[0]["conversations"][1]["value"] == "two"
    with pytest.raises(SystemExit):
        main(["--count-shared", str(run)])
