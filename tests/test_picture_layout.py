"""Relaying SFT's first turns into one layout (``minimind_v.picture_layout``), without training."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest

from minimind_v import picture_layout as L
from minimind_v.recipe import Recipe, recipe_record, with_world


def test_a_turn_is_moved_into_either_layout_and_only_a_one_picture_turn():
    assert L.in_layout("What colour is the circle?\n<image>", "picture-first") == "<image>\nWhat colour is the circle?"
    assert L.in_layout("<image>\nWhat colour is the circle?", "question-first") == "What colour is the circle?\n<image>"
    assert L.in_layout("<image>\nHow many?", "picture-first") == "<image>\nHow many?"
    for text in ("How many?", "<image>\n<image>\nWhich picture has more circles?"):
        with pytest.raises(ValueError, match="one '<image>' tag"):
            L.in_layout(text, "picture-first")


def test_relaid_records_change_first_turns_only_and_leave_the_input_alone():
    records = [
        {"id": "a", "image": "a.png", "conversations": [
            {"from": "human", "value": "What colour is the circle?\n<image>"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "How many circles are there?"}, {"from": "gpt", "value": "one"}]},
        {"id": "b", "image": ["b1.png", "b2.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich picture has more circles?"}, {"from": "gpt", "value": "the first"}]},
    ]
    before = copy.deepcopy(records)
    out = L.relaid_records(records, "picture-first")
    assert records == before
    assert out[0]["conversations"][0]["value"] == "<image>\nWhat colour is the circle?"
    assert out[0]["conversations"][1:] == records[0]["conversations"][1:]
    assert {k: v for k, v in out[0].items() if k != "conversations"} == {"id": "a", "image": "a.png"}
    assert out[1] == records[1]  # two pictures: as it was


def test_the_recorded_recipe_is_the_recipe_that_wrote_it(tmp_path):
    r = replace(with_world(Recipe(), 2), seed=7, extra={"sft": ["--lr", "5e-4"]})
    (tmp_path / "recipe.json").write_text(json.dumps({"recipe": recipe_record(r), "processes": 1}))
    assert L.recorded_recipe(tmp_path) == r


def test_a_bad_layout_or_a_used_folder_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="layout must be one of"):
        L.run_layout(tmp_path / "run", "sideways", tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="give a new folder"):
        L.run_layout(tmp_path / "run", "picture-first", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
