"""The baselines an accuracy is read against, and the seen/unseen split, on hand-worked records."""

from __future__ import annotations

import pytest
import torch

from minimind_v import baselines
from minimind_v.evaluate import (LAYOUT_COLUMNS, _swap_pictures, accuracy_by_combination, accuracy_by_layout,
                                 format_baselines_table, layout_split, picture_layout)


def qa(rid, question, reply, kind, **extra):
    return {"id": rid, "image": f"{rid}.png", "answer_type": kind,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": reply}],
            **extra}


HELD_OUT = [
    qa("e1", "What colour is the cross?", "red", "colour"),
    qa("e2", "What colour is the square?", "blue", "colour"),
    qa("e3", "What colour is the small circle?", "green", "colour"),
    qa("e4", "How many circles are there?", "one", "count"),
]
TRAINING = [  # one SFT record, several turns, one answer type per turn
    {"id": "t1", "image": "t1.png", "answer_types": ["colour", "colour", "colour", "count"],
     "conversations": [
         {"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"},
         {"from": "human", "value": "What colour is the triangle?"}, {"from": "gpt", "value": "red"},
         {"from": "human", "value": "What colour is the square?"}, {"from": "gpt", "value": "blue"},
         {"from": "human", "value": "How many squares are there?"}, {"from": "gpt", "value": "two"}]},
]


def test_chance_is_one_over_the_distinct_answers_of_each_type():
    result = baselines.chance(HELD_OUT)
    assert result["per_type"] == {"colour": pytest.approx(1 / 3), "count": 1.0}
    # Overall weighs each question: 3 colour questions at 1/3, one count question at 1.
    assert result["overall"] == pytest.approx((3 * (1 / 3) + 1) / 4)


def test_majority_answers_each_question_form_with_its_most_frequent_training_answer():
    result = baselines.majority(TRAINING, HELD_OUT)
    # "what colour is the <shape>?" was answered red twice and blue once: e1 right, e2 wrong.
    # "what colour is the <size> <shape>?" was never trained: the colour type's majority (red), wrong.
    # "how many <shapes> are there?" was answered "two": wrong.
    assert result["per_type"] == {"colour": pytest.approx(1 / 3), "count": 0.0}
    assert result["overall"] == pytest.approx(1 / 4)


def test_shuffled_pictures_leave_no_picture_in_place_and_keep_each_once():
    questions = [(f"r{i}", f"p{i}.png", f"q{i}", "a", "colour") for i in range(9)]
    swapped = _swap_pictures(questions, seed=3)
    assert [q[0] for q in swapped] == [q[0] for q in questions]  # questions keep their order
    assert all(s[1] != q[1] for s, q in zip(swapped, questions))  # no picture stays
    assert sorted(s[1] for s in swapped) == sorted(q[1] for q in questions)
    assert swapped == _swap_pictures(questions, seed=3) and swapped != _swap_pictures(questions, seed=4)


def test_shuffled_pictures_swap_two_picture_questions_among_themselves():
    # World 2 asks some questions about two pictures: each keeps two, from another such question.
    questions = [(f"r{i}", [f"a{i}.png", f"b{i}.png"] if i % 3 == 0 else f"p{i}.png", f"q{i}", "x", "t")
                 for i in range(12)]
    swapped = _swap_pictures(questions, seed=1)
    for s, q in zip(swapped, questions):
        assert type(s[1]) is type(q[1]) and s[1] != q[1]
    assert sorted(map(str, (s[1] for s in swapped))) == sorted(map(str, (q[1] for q in questions)))
    # With one picture each, the cycle is the same as before two-picture questions existed.
    single = [(f"r{i}", f"p{i}.png", f"q{i}", "a", "colour") for i in range(9)]
    order = torch.randperm(9, generator=torch.Generator().manual_seed(3)).tolist()
    expected = list(single)
    for here, there in zip(order, order[1:] + order[:1]):
        expected[here] = (single[here][0], single[there][1], *single[here][2:])
    assert _swap_pictures(single, seed=3) == expected


def test_accuracy_on_seen_and_unseen_combinations():
    records = [{"id": "a", "combination": "seen"}, {"id": "b", "combination": "seen"},
               {"id": "c", "combination": "unseen"}]
    rows = [{"id": "a", "type": "colour", "correct": True}, {"id": "b", "type": "shape", "correct": False},
            {"id": "c", "type": "colour", "correct": False}]
    table = accuracy_by_combination(rows, records)
    assert table == {"colour": {"seen": 1.0, "unseen": 0.0}, "shape": {"seen": 0.0},
                     "overall": {"seen": 0.5, "unseen": 0.0}}
    with pytest.raises(ValueError, match="seen/unseen"):
        accuracy_by_combination(rows, [{"id": "a"}])


def test_accuracy_with_the_picture_before_and_after_the_question():
    turn = lambda text: {"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "red"}]}  # noqa: E731
    records = [{"id": "a", **turn("<image>\nWhat colour is the circle?")},
               {"id": "b", **turn("What colour is the circle?\n<image>")},
               {"id": "c", **turn("How many circles are there?\n<image>")}]
    assert [picture_layout(r) for r in records] == ["picture first", "question first", "question first"]
    assert picture_layout(turn("What colour is the sky?")) is None and picture_layout({}) is None
    rows = [{"id": "a", "type": "colour", "correct": True}, {"id": "b", "type": "colour", "correct": False},
            {"id": "c", "type": "count", "correct": True}]
    assert accuracy_by_layout(rows, records) == {
        "colour": {"picture first": 1.0, "question first": 0.0}, "count": {"question first": 1.0},
        "overall": {"picture first": 1.0, "question first": 0.5}}
    with pytest.raises(ValueError, match="a picture in its first turn"):
        accuracy_by_layout(rows, [{"id": "a", **turn("no picture here")}])
    # Asked again with the picture moved in front of b's and c's questions, b is now right.
    moved = [rows[0], {**rows[1], "correct": True}, rows[2]]
    figures = {"by_layout": accuracy_by_layout(moved, records),
               "as_written": {"by_layout": accuracy_by_layout(rows, records)}}
    first, written, now = LAYOUT_COLUMNS
    assert layout_split(figures) == {"colour": {first: 1.0, written: 0.0, now: 1.0}, "count": {written: 1.0, now: 1.0},
                                     "overall": {first: 1.0, written: 0.5, now: 1.0}}


def test_baselines_table_has_a_column_per_baseline():
    result = {"per_type": {"colour": 0.9}, "overall": 0.9, "n": 10,
              "rows": [{"type": "colour"}] * 10}
    table = format_baselines_table(result, {"text only": {"per_type": {"colour": 0.1}, "overall": 0.1},
                                            "chance": {"per_type": {"colour": 0.2}, "overall": 0.2}})
    assert table.splitlines()[0] == "| answer type | questions | accuracy | text only | chance |"
    assert "| colour | 10 | 90.0% | 10.0% | 20.0% |" in table
