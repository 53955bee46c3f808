"""The recipe on several seeds: the questions about absent objects, the arithmetic over seeds and
goals, and one quick run through the whole command."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from minimind_v import seeds
from minimind_v.data.images import load_image
from minimind_v.data.shapes import ShapesWorldConfig, generate_world, render_scene
from minimind_v.recipe import (TRAINING_STAGES, WORLD2, default_recipe, stage_commands, stage_dir,
                              stage_fingerprints, with_world)


def test_absent_questions_ask_about_what_the_picture_lacks(tmp_path):
    config = ShapesWorldConfig(seed=3, n_pretrain=0, n_sft=0, n_eval=60, n_eval_images=1, image_size=96, workers=1)
    generate_world(tmp_path, config, progress=False)
    asked = seeds.absent_questions(tmp_path, n=6)
    assert len(asked) == 6
    for i, q in enumerate(asked):
        # The scene draws the very picture (chapter 07 draws it again to ask its own model).
        stored = np.asarray(load_image(tmp_path / "eval_data_images" / q["image"]))
        assert np.array_equal(stored, np.asarray(render_scene(q["scene"], 96).convert("RGB")))
        if i % 2 == 0:
            assert q["question"] == "What shape is in the center?"
            assert all(o["position"] != "center" for o in q["scene"])
            assert q["truth"] == "Nothing is in the center."
        else:
            shape = q["question"].removeprefix("What colour is the ").removesuffix("?")
            assert shape in ("circle", "square", "triangle", "cross")
            assert all(o["shape"] != shape for o in q["scene"])
            assert q["truth"] == f"There is no {shape}."


def figures(overall, colour, seen, unseen, count3, text_only):
    per_type = {"colour": colour, "count": 0.9}
    return {"overall": overall, "per_type": per_type, "n": 100, "machine": "m", "total_minutes": 10.0,
            "minutes": {"sft": 5.0, "clip": 3.0},
            "baselines": {"text only": {"overall": text_only, "per_type": {"colour": text_only, "count": 0.5}},
                          "majority answer": {"overall": 0.3, "per_type": {"colour": 0.2, "count": 0.6}}},
            "by_combination": {k: {"seen": seen, "unseen": unseen} for k in ("colour", "count", "overall")},
            "by_objects": {"count": {"1": 1.0, "3": count3}}}


RECORD = {"world": 2, "seeds": {"2": figures(0.96, 0.90, 0.90, 0.88, 0.80, 0.20),
                                "3": figures(0.94, 0.95, 0.95, 0.85, 0.90, 0.30)}}


def test_goals_are_judged_on_the_worst_seed():
    rows = {r["goal"]: r for r in seeds.goal_rows(RECORD)}
    # Only what the record's world measures: no shape, position, relation... here.
    assert set(rows) == {"overall", "colour", "count", "count, 3 objects", "unseen vs seen"}
    assert rows["overall"]["mean"] == pytest.approx(0.95) and rows["overall"]["worst"] == 0.94
    assert rows["overall"]["short_by"] == pytest.approx(0.01) and not rows["overall"]["met"]
    assert rows["colour"]["met"] and rows["colour"]["short_by"] == 0  # 0.90 on the worst seed is enough
    assert rows["count, 3 objects"]["worst"] == 0.80 and rows["count, 3 objects"]["short_by"] == pytest.approx(0.05)
    # unseen minus seen: -0.02 and -0.10; the worst misses -0.05 by 5 points.
    assert rows["unseen vs seen"]["mean"] == pytest.approx(-0.06)
    assert rows["unseen vs seen"]["short_by"] == pytest.approx(0.05)


def test_the_table_gives_mean_min_max_per_type_and_minutes_beside_another_record():
    today = {"world": 1, "seeds": {"0": {**figures(0.9, 0.9, 0, 0, 0, 0), "minutes": {"sft": 4.0}, "total_minutes": 8.0}}}
    table = seeds.table_markdown(RECORD, against=today)
    assert "| colour | 92.5 (90.0 – 95.0) | 25.0 (20.0 – 30.0) | 20.0 (20.0 – 20.0) |" in table
    assert "| overall | 95.0 (94.0 – 96.0) |" in table
    assert "| overall | 92.5 (90.0 – 95.0) | 86.5 (85.0 – 88.0) |" in table  # seen | unseen
    assert "| answer type | 1 object | 3 objects |" in table
    assert "| count | 100.0 (100.0 – 100.0) | 85.0 (80.0 – 90.0) |" in table and "| colour | – |" not in table
    assert "| unseen vs seen | -5.0 | -6.0 | -10.0 | short by 5.0 points |" in table
    assert "| minutes | world 2 seed 2 | world 2 seed 3 | world 1 seed 0 |" in table
    assert "| clip | 3.0 | 3.0 | nan |" in table and "| sft | 5.0 | 5.0 | 4.0 |" in table
    assert "| total | 10.0 | 10.0 | 8.0 |" in table


def test_the_table_shows_what_a_probe_reads_from_the_tokens_when_every_seed_has_it():
    assert "frozen tokens" not in seeds.table_markdown(RECORD)  # records from before the probe
    probed = {"world": 2, "seeds": {s: {**f, "scene_probe": {"cells": c, "objects": o, "scenes": w}}
                                    for (s, f), (c, o, w) in zip(RECORD["seeds"].items(),
                                                                 [(1.0, 0.99, 0.97), (0.99, 0.97, 0.95)])}}
    table = seeds.table_markdown(probed)
    assert "| whole pictures (all nine cells) | 96.0 (95.0 – 97.0) |" in table
    assert "question before the picture" not in table  # no seed has the split by layout
    split = lambda a, b: {"colour": {"picture first": a, "question first": b},  # noqa: E731
                          "overall": {"picture first": a, "question first": b}}
    laid = {"world": 2, "seeds": {s: {**f, "by_layout": split(a, c), "as_written": {"by_layout": split(a, b)}}
                                  for (s, f), (a, b, c) in zip(RECORD["seeds"].items(), [(0.9, 0.7, 0.85), (1.0, 0.8, 0.95)])}}
    by_layout = seeds.table_markdown(laid)
    assert ("| answer type | picture before the question | question before the picture, as written | "
            "the same, picture moved in front |") in by_layout
    assert "| colour | 95.0 (90.0 – 100.0) | 75.0 (70.0 – 80.0) | 90.0 (85.0 – 95.0) |" in by_layout
    assert "| count | – | – | – |" in by_layout  # a type the split does not hold
    assert "| objects | 98.0 (97.0 – 99.0) |" in table
    assert "no training picture showed" not in table  # no seed has the pair probe
    paired = {"world": 2, "seeds": {s: {**f, "pair_probe": {"seen": a, "unseen": b, "n_seen": 10, "n_unseen": 5}}
                                    for (s, f), (a, b) in zip(probed["seeds"].items(), [(0.99, 0.9), (0.97, 0.8)])}}
    table = seeds.table_markdown(paired)
    assert "| held-out pictures: objects of a pair seen in training (shape, colour, size) | 98.0 (97.0 – 99.0) |" in table
    assert "| held-out pictures: objects of a pair no training picture showed | 85.0 (80.0 – 90.0) |" in table
    assert "wrong answers that say it is not there" not in table  # no seed has the pair answers


def test_the_table_splits_questions_by_the_object_they_name_when_every_seed_has_it():
    def answers(right_pair, questions_pair, denied):
        return {"picture without a held-out pair": {"questions": 100, "right": 96, "says absent": 1},
                "another object, picture with one": {"questions": 50, "right": 47, "says absent": 0},
                "the held-out pair's object": {"questions": questions_pair, "right": right_pair, "says absent": denied}}
    paired = {"world": 2, "seeds": {s: {**f, "pair_answers": answers(*a)}
                                    for (s, f), a in zip(RECORD["seeds"].items(), [(40, 50, 6), (36, 45, 3)])}}
    table = seeds.table_markdown(paired)
    # 40/50 = 80%, 36/45 = 80%; wrong 10 + 9, of them denials 6 + 3
    assert "| the held-out pair's object | 80.0 (80.0 – 80.0) | 9 of 19 |" in table
    assert "| picture without a held-out pair | 96.0 (96.0 – 96.0) | 2 of 8 |" in table


def test_a_quick_run_records_each_seed_and_keeps_its_minutes_when_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_V_QUICK", "1")
    record = tmp_path / "docs" / "seeds.json"
    first = seeds.run_seeds(2, [4], folder=tmp_path, record=record)
    entry = first["seeds"]["4"]
    run = tmp_path / "world2_seed4"
    evaluation = json.loads((stage_dir(run, "eval") / "results.json").read_text())
    assert entry["overall"] == evaluation["overall"] and set(entry["per_type"]) == set(WORLD2["question_types"])
    assert set(entry["minutes"]) >= set(TRAINING_STAGES) and entry["stages_trained"]
    assert set(entry["by_combination"]["overall"]) == {"seen", "unseen"}
    assert len(entry["absent_answers"]) == seeds.N_ABSENT_QUESTIONS
    assert all(isinstance(a["answer"], str) for a in entry["absent_answers"])
    assert set(entry["by_layout"]["overall"]) == {"picture first", "question first"}
    probe = entry["scene_probe"]
    assert set(probe) == {"cells", "objects", "scenes"} and 0 <= probe["scenes"] <= probe["cells"] <= 1
    pairs = entry["pair_probe"]  # world 2 holds two pairs out: half the held-out pictures show one
    assert pairs["n_unseen"] > 0 and pairs["n_seen"] > 0 and 0 <= pairs["unseen"] <= 1
    named = entry["pair_answers"]  # the same questions the report splits (tests/test_pair_report.py)
    assert named["the held-out pair's object"]["questions"] > 0
    assert all(0 <= c["says absent"] <= c["questions"] - c["right"] for c in named.values())
    assert json.loads(record.read_text()) == json.loads((tmp_path / "world2_seeds.json").read_text())
    asked = entry["as_written"]  # the same questions asked with the picture where each is written
    assert set(asked["by_layout"]["overall"]) == {"picture first", "question first"}
    # Questions written picture first are the same input either way.
    assert asked["by_layout"]["overall"]["picture first"] == entry["by_layout"]["overall"]["picture first"]
    again = seeds.run_seeds(2, [4], folder=tmp_path)  # every stage reused: the minutes stay those measured
    assert again["seeds"]["4"]["minutes"] == entry["minutes"]
    assert again["seeds"]["4"]["total_minutes"] == entry["total_minutes"]
    shutil.rmtree(stage_dir(run, "eval"))  # the evaluation alone again: the training minutes stay
    third = seeds.run_seeds(2, [4], folder=tmp_path)["seeds"]["4"]
    assert third["rerun"]["stages"] == ["eval"]
    assert {s: m for s, m in third["minutes"].items() if s != "eval"} == \
        {s: m for s, m in entry["minutes"].items() if s != "eval"}
    assert third["overall"] == entry["overall"]


def test_the_record_says_which_relation_answers_were_trained(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(seeds, "run_recipe", lambda run, recipe, nproc=1: trained.append(recipe) or {"timings": {}})
    monkeypatch.setattr(seeds, "seed_figures", lambda run: {"overall": 0.5})
    record = seeds.run_seeds(2, [6, 7], folder=tmp_path, relation_answers="regions")
    assert [r.relation_answers for r in trained] == ["regions", "regions"] and [r.seed for r in trained] == [6, 7]
    assert record["recipe"]["relation_answers"] == "regions"
    assert "relation_answers" not in seeds.run_seeds(2, [6], folder=tmp_path)["recipe"]  # the verdict, as ever
    assert set(json.loads((tmp_path / "world2_seeds.json").read_text())["seeds"]) == {"6"}  # another recipe: anew
    with pytest.raises(SystemExit):
        seeds.main(["--seeds", "6", "--relation-answers", "sideways"])


def test_the_record_says_how_many_sft_steps_were_trained(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(seeds, "run_recipe", lambda run, recipe, nproc=1: trained.append(recipe) or {"timings": {}})
    monkeypatch.setattr(seeds, "seed_figures", lambda run: {"overall": 0.5})
    recipe_steps = with_world(default_recipe(), 2).sft_steps
    record = seeds.run_seeds(2, [6], folder=tmp_path, sft_steps=recipe_steps + 1500)
    assert [(r.sft_steps, r.seed) for r in trained] == [(recipe_steps + 1500, 6)]
    assert record["recipe"]["sft_steps"] == recipe_steps + 1500
    assert seeds.run_seeds(2, [7], folder=tmp_path)["recipe"]["sft_steps"] == recipe_steps
    assert set(json.loads((tmp_path / "world2_seeds.json").read_text())["seeds"]) == {"7"}  # another recipe: anew
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit):
            seeds.main(["--seeds", "6", "--sft-steps", bad])


def test_the_record_says_how_often_sft_took_records_by_their_objects(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(seeds, "run_recipe", lambda run, recipe, nproc=1: trained.append(recipe) or {"timings": {}})
    monkeypatch.setattr(seeds, "seed_figures", lambda run: {"overall": 0.5})
    record = seeds.run_seeds(2, [6], folder=tmp_path, object_repeats=(1, 3, 5))
    assert [(r.sft_object_repeats, r.seed) for r in trained] == [((1, 3, 5), 6)]
    assert record["recipe"]["sft_object_repeats"] == [1, 3, 5]
    _, argv = stage_commands(tmp_path / "run", trained[0])["sft"]
    assert argv[argv.index("--object-repeats") + 1] == "1,3,5"  # what the SFT stage is launched with
    assert seeds.run_seeds(2, [7], folder=tmp_path)["recipe"]["sft_object_repeats"] == [1, 2, 3]  # world 2's own
    assert set(json.loads((tmp_path / "world2_seeds.json").read_text())["seeds"]) == {"7"}  # another recipe: anew
    assert seeds.run_seeds(2, [8], folder=tmp_path, object_repeats=(1, 1, 1))["recipe"]["sft_object_repeats"] == [1, 1, 1]
    _, argv = stage_commands(tmp_path / "run", trained[-1])["sft"]
    assert "--object-repeats" not in argv  # every record once: the recipe before world 2 repeated any
    for bad in ("0,1", "1,x"):
        with pytest.raises(SystemExit):
            seeds.main(["--seeds", "6", "--sft-object-repeats", bad])


def test_sft_flags_go_to_the_sft_stage_alone_and_bad_ones_are_refused_before_anything_trains(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(seeds, "run_recipe", lambda run, recipe, nproc=1: trained.append(recipe) or {"timings": {}})
    monkeypatch.setattr(seeds, "seed_figures", lambda run: {"overall": 0.5})
    monkeypatch.setattr(seeds, "table_markdown", lambda results, against=None: "")
    record = seeds.main(["--seeds", "6", "--folder", str(tmp_path), "--sft-flags=--object-curriculum --lr 5e-4"])
    assert record["recipe"]["extra"] == {"sft": ["--object-curriculum", "--lr", "5e-4"]}
    base = replace(with_world(default_recipe(), 2), seed=6)
    assert trained == [replace(base, extra={"sft": ["--object-curriculum", "--lr", "5e-4"]})]
    before, after = stage_fingerprints(base), stage_fingerprints(trained[0])
    assert {k for k in before if before[k] != after[k]} == {"sft", "eval"}  # the earlier stages are reused
    for bad in ("--no-such-flag", "--lr fast", "--object-curriculum=yes"):
        with pytest.raises(SystemExit):
            seeds.main(["--seeds", "6", "--folder", str(tmp_path), f"--sft-flags={bad}"])
        with pytest.raises(ValueError, match="flags for the sft stage"):
            seeds.run_seeds(2, [6], folder=tmp_path, sft_flags=bad.split())
    assert len(trained) == 1  # nothing trained for a refused flag


def test_a_stage_run_again_keeps_the_minutes_of_the_others():
    earlier = {"machine": "old", "minutes": {"world": 1.0, "sft": 5.0, "eval": 0.2}, "total_minutes": 6.5,
               "stages_trained": ["eval", "sft", "world"]}
    entry = seeds.again_in_part(earlier, {"eval": 0.3}, "new")
    assert entry == {"machine": "old", "minutes": {"world": 1.0, "sft": 5.0, "eval": 0.3}, "total_minutes": 6.6,
                     "stages_trained": ["eval", "sft", "world"], "rerun": {"stages": ["eval"], "machine": "new"}}
    assert seeds.again_in_part(entry, {}, "newer") == entry  # nothing ran: as it was, rerun kept
    record = {"world": 2, "seeds": {"2": {**figures(0.9, 0.9, 0.9, 0.8, 0.8, 0.2), **entry}}}
    assert seeds.table_markdown(record).endswith("Machine: old; run again later (those minutes): eval on new")


def test_a_damaged_record_is_named_not_overwritten(tmp_path):
    (tmp_path / "world2_seeds.json").write_text("{half a record")
    with pytest.raises(ValueError, match="world2_seeds.json is not a record written by minimind_v.seeds"):
        seeds.run_seeds(2, [4], folder=tmp_path)
    assert (tmp_path / "world2_seeds.json").read_text() == "{half a record"
    assert not (tmp_path / "world2_seed4").exists()
