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


@pytest.mark.parametrize("action", [L.run_layout, L.ask_in_layout])
def test_a_bad_layout_or_a_used_folder_is_refused_before_anything_is_written(tmp_path, action):
    with pytest.raises(ValueError, match="layout must be one of"):
        action(tmp_path / "run", "sideways", tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="give a new folder"):
        action(tmp_path / "run", "picture-first", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_a_quick_run_asked_and_trained_again_in_one_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_V_QUICK", "1")
    from minimind_v.recipe import default_recipe, run_recipe

    run = tmp_path / "run"
    run_recipe(run, replace(with_world(default_recipe(), 2), seed=4))
    own = (run / "world" / "sft_data.json").read_bytes()
    held_out = json.loads((run / "world" / "eval_data.json").read_text())

    asked = L.ask_in_layout(run, "picture-first", tmp_path / "asked")
    relaid = json.loads((tmp_path / "asked" / "eval_data.json").read_text())
    assert [r["id"] for r in relaid] == [r["id"] for r in held_out]
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in relaid)
    # split by the layout each question had in the held-out set, which asks both
    assert set(asked["by_layout"]["overall"]) == set(asked["run_by_layout"]["overall"]) == {"picture first", "question first"}

    trained = L.run_layout(run, "question-first", tmp_path / "relaid", sft_steps=2)
    firsts = [r["conversations"][0]["value"] for r in json.loads((tmp_path / "relaid" / "world" / "sft_data.json").read_text())
              if isinstance(r["image"], str) and "<image>" in r["conversations"][0]["value"]]
    assert firsts and all(t.endswith("\n<image>") for t in firsts)
    assert (run / "world" / "sft_data.json").read_bytes() == own  # the run's own records untouched
    assert json.loads((tmp_path / "relaid" / "sft" / "metrics.jsonl").read_text().splitlines()[0])["total_steps"] == 2
    assert 0 <= trained["overall"] <= 1
