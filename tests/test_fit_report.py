"""fit_report: the training turns it asks are SFT's own questions one by one, their answers are
what the model says to each asked alone, and the tables count what they should."""

import json
import shutil

import pytest

from minimind_v.data.records import find_image, read_records
from minimind_v.data.shapes_records import relation_truth
from minimind_v.evaluate import normalise
from minimind_v.fit_report import main, relation_answer_mix, report_run, summed, tables_markdown, training_turns
from minimind_v.inference import answer, load_vlm


def record(rid, *turns, image="p.png"):
    conversations = [m for question, _, answer in turns
                     for m in ({"from": "human", "value": question}, {"from": "gpt", "value": answer})]
    return {"id": rid, "image": image, "conversations": conversations, "answer_types": [t for _, t, _ in turns]}


def test_training_turns_are_each_question_alone_with_its_picture():
    records = [record("a", ("<image>\nWhat colour?", "colour", "red"), ("How many?", "count", "two")),
               record("b", ("How many?\n<image>", "count", "one")),
               record("c", ("<image>\n<image>\nWhich?", "two pictures", "first"), image=["x.png", "y.png"])]
    turns = training_turns(records, per_type=5)
    assert sorted(t["id"] for t in turns) == ["a#0", "a#1", "b#0"]  # not the two-picture record's
    by_id = {t["id"]: t for t in turns}
    assert by_id["a#1"]["conversations"] == [{"from": "human", "value": "How many?\n<image>"},
                                             {"from": "gpt", "value": "two"}]
    assert by_id["a#0"]["conversations"][0]["value"] == "<image>\nWhat colour?"  # its tag kept where it was
    assert by_id["b#0"]["image"] == "p.png" and by_id["a#1"]["answer_type"] == "count"
    assert [t["answer_type"] for t in turns] == ["colour", "count", "count"]  # in type order
    many = [record(f"r{i}", ("Q?", "size", str(i))) for i in range(20)]
    drawn = training_turns(many, per_type=4, seed=1)
    assert len(drawn) == 4 and len({t["id"] for t in drawn}) == 4
    assert drawn == training_turns(many, per_type=4, seed=1) and drawn != training_turns(many, per_type=4, seed=2)


def test_relation_answer_mix_counts_every_relation_turn_of_one_picture_records():
    records = [record("a", ("Is it?", "relation", "yes"), ("What is left?", "relation", "nothing")),
               record("b", ("What is above?", "relation", "the red circle"), ("Colour?", "colour", "no")),
               record("c", ("Is it?", "relation", "no"), image=["x.png", "y.png"])]  # two pictures: not counted
    assert relation_answer_mix(records) == {"nothing": 1, "no": 0, "yes": 1, "an object": 1}
    assert len(training_turns(records, None)) == 4


def test_malformed_records_are_refused_by_their_place():
    with pytest.raises(ValueError, match=r"SFT record 1 \(b\): 2 answer types for 1 question"):
        training_turns([record("a", ("Q?", "size", "small")),
                        {**record("b", ("Q?", "size", "small")), "answer_types": ["size", "colour"]}], 5)
    with pytest.raises(ValueError, match="SFT record 0: not a shapes-world record"):
        training_turns([{"id": "a", "conversations": [{"from": "human"}], "answer_types": ["size"]}], 5)


def test_truth_classes():
    assert [relation_truth(a) for a in ("nothing", "Nothing.", "no", "Yes.", "the red circle", "square")] == [
        "nothing", "nothing", "no", "yes", "an object", "an object"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_world, save_tiny_sft):
    run = tmp_path_factory.mktemp("fit") / "run"
    shutil.copytree(tiny_world, run / "world")
    save_tiny_sft(run / "sft", seed=3)
    held = [("colour", "red", True), ("colour", "blue", False), ("relation", "nothing", True),
            ("relation", "yes", False), ("relation", "the red circle", True), ("relation", "no", False)]
    (run / "eval").mkdir()
    (run / "eval" / "answers.json").write_text(json.dumps([
        {"id": f"e{i}", "type": kind, "question": "?", "answer": truth, "prediction": "x", "correct": correct}
        for i, (kind, truth, correct) in enumerate(held)]))
    return run


def test_the_report_counts_each_turns_own_answer_and_the_held_out_ones(run):
    report = report_run(run, per_type=3, seed=0)
    turns = training_turns(read_records(run / "world" / "sft_data.json"), 3, 0)
    vlm = load_vlm(run / "sft")
    expected = {}
    for turn in turns:  # each asked on its own, not in evaluate's batches
        picture = find_image(run / "world" / "sft_images", turn["image"], "the test", turn["id"])  # (v1's file names)
        said = answer(vlm, [str(picture)], [turn["conversations"][0]["value"]])[0]
        cell = expected.setdefault(turn["answer_type"], [0, 0])
        cell[0] += normalise(said) == normalise(turn["conversations"][1]["value"])
        cell[1] += 1
    assert {k: c["train"] for k, c in report["per_type"].items() if c["train"][1]} == expected
    assert report["per_type"]["colour"]["held"] == [1, 2]
    assert report["per_type"]["relation"]["held"] == [2, 4]
    assert {t: c["held"] for t, c in report["relation"].items()} == {
        "nothing": [1, 1], "no": [0, 1], "yes": [0, 1], "an object": [1, 1]}
    assert report["sft_relation_answers"] == {t: 0 for t in ("nothing", "no", "yes", "an object")}  # world 1: none
    together = summed([report, report])
    assert together["per_type"]["colour"]["held"] == [2, 4]
    table = tables_markdown(report)
    assert "| colour | " in table and "| an object | " in table and "50.0 (1/2)" in table


def test_a_run_without_answers_is_refused_by_name(tmp_path, capsys):
    (tmp_path / "world").mkdir()
    with pytest.raises(SystemExit, match="fit_report: .*answers.json|fit_report: .*eval_data.json"):
        main([str(tmp_path)])
