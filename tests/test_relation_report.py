"""The relation report: answers cut into their steps, and counts worked out by hand."""

import json

import pytest

from minimind_v.relation_report import answer_steps, main, relation_steps, table_markdown


@pytest.mark.parametrize("reply, expected", [
    ("nothing", {"verdict": "nothing"}),
    ("yes", {"verdict": "yes"}),
    ("The blue square is in the center; left of it: circle.",
     {"verdict": "circle", "places": "The blue square is in the center"}),
    ("The circle is in the top left, the red cross at the bottom: yes.",
     {"verdict": "yes", "places": "The circle is in the top left, the red cross at the bottom"}),
    ("The blue square is in the center; left of it: the left column: circle.",
     {"verdict": "circle", "places": "The blue square is in the center", "region": "the left column"}),
    ("The red cross is at the bottom; above it: the top and middle rows; the circle is in the top row: yes.",
     {"verdict": "yes", "places": "The red cross is at the bottom", "region": "the top and middle rows",
      "subject's line": "the circle is in the top row"}),
])
def test_answers_cut_into_their_steps(reply, expected):
    assert answer_steps(reply) == expected


def _row(answer, prediction, kind="relation"):
    return {"type": kind, "question": "?", "answer": answer, "prediction": prediction, "correct": answer == prediction}


YES = "The red cross is at the bottom; above it: the top and middle rows; the circle is in the top row: yes."
ROWS = [
    _row(YES, YES),  # all right
    _row(YES, YES.replace("the top row: yes", "the top row: no")),  # every step right, the verdict wrong
    _row(YES, "The red cross is at the top; above it: no row; the circle is in the top row: no."),
    _row("The square is on the left; left of it: no column: nothing.", "nothing"),  # no steps written
    _row("The square is in the center; left of it: the left column: circle.",
         "The square is in the center; left of it: the left column: cross."),
    _row("red", "red", kind="colour"),  # not a relation: not counted
]


def test_counts_per_verdict_and_step_as_worked_out_by_hand():
    counts = relation_steps(ROWS)
    yes, nothing, shape = counts["yes"], counts["nothing"], counts["a shape"]
    assert (yes["questions"], yes["whole answer"], yes["verdict"]) == (3, 1, 1)
    assert (yes["places"], yes["region"], yes["subject's line"]) == (2, 2, 3)
    assert (nothing["questions"], nothing["verdict"], nothing["places"], nothing["places asked"]) == (1, 1, 0, 1)
    assert (shape["questions"], shape["verdict"], shape["places"], shape["region"]) == (1, 0, 1, 1)
    assert shape["subject's line asked"] == 0 and counts["no"]["questions"] == 0
    # Every step right in the first two yes answers and the shape answer; of those, one verdict right each.
    assert (yes["after right steps"], yes["after right steps asked"]) == (1, 2)
    assert (shape["after right steps"], shape["after right steps asked"]) == (0, 1)
    assert nothing["after right steps asked"] == 0
    table = table_markdown(counts)
    assert "| yes | 3 | 1 / 3 | 1 / 3 | 2 / 3 | 2 / 3 | 3 / 3 | 1 / 2 |" in table
    assert "| a shape | 1 | 0 / 1 | 0 / 1 | 1 / 1 | 1 / 1 | - | 0 / 1 |" in table
    assert "| all | 5 | 1 / 5 | 2 / 5 | 3 / 5 | 3 / 5 | 3 / 3 | 1 / 3 |" in table


def test_command_reads_answers_and_refuses_other_files(tmp_path, capsys):
    good = tmp_path / "answers.json"
    good.write_text(json.dumps(ROWS))
    main([str(good)])
    assert "| all | 5 |" in capsys.readouterr().out
    main([str(good), str(good)])  # two runs: each, then the two counted together
    out = capsys.readouterr().out
    assert out.count("| all | 5 | 1 / 5 |") == 2 and "all 2 together" in out
    assert "| all | 10 | 2 / 10 | 4 / 10 | 6 / 10 | 6 / 10 | 6 / 6 | 2 / 6 |" in out
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"overall": 0.9}))
    with pytest.raises(SystemExit, match="not an evaluation's answers.json"):
        main([str(bad)])
    (tmp_path / "half.json").write_text("[{")
    with pytest.raises(SystemExit, match="cannot read .*half.json"):
        main([str(tmp_path / "half.json")])
