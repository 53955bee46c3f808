"""The ablations of chapter 08: what each variant changes, what it may borrow, and the table's arithmetic.
(The runs themselves: chapter 08 trains every pair at quick sizes in test_book's quick run.)"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from minimind_v import ablations
from minimind_v.ablations import ABLATIONS, BY_NAME, borrow_stages, table_markdown, table_rows, variant_recipe
from minimind_v.recipe import FINGERPRINT, QUICK, STAGE_DIRS, Recipe, stage_dir, stage_fingerprints
from minimind_v.runfiles import atomic_write_json, mark_complete

BASE = replace(Recipe(), **QUICK)


def changed(a: Recipe, b: Recipe) -> set[str]:
    fa, fb = stage_fingerprints(a), stage_fingerprints(b)
    return {s for s in fa if fa[s]["fingerprint"] != fb[s]["fingerprint"]}


@pytest.mark.parametrize("name, stages", [
    ("caption_order", set(STAGE_DIRS)),  # the world changes, so everything built on it
    ("questions_per_record", set(STAGE_DIRS)),
    ("sft_trains_projection", {"sft", "eval"}),
    ("sft_trains_ends", {"sft", "eval"}),
    ("cls_only", {"pretrain", "sft", "eval"}),
    ("mlp_projector", {"pretrain", "sft", "eval"}),
    ("clip_without_aux", {"clip", "pretrain", "sft", "eval"}),
    ("moe", {"llm", "pretrain", "sft", "eval"}),
])
def test_each_variant_retrains_exactly_the_stages_its_choice_reaches(name, stages):
    assert changed(BASE, variant_recipe(BASE, BY_NAME[name])) == stages


def test_a_variant_keeps_the_recipes_own_flags_and_adds_its_one():
    variant = variant_recipe(BASE, BY_NAME["clip_without_aux"])
    assert variant.extra["clip"] == BASE.extra["clip"] + ["--aux-weight", "0"]
    assert BASE.extra["clip"][-2:] != ["--aux-weight", "0"]  # the recipe itself is left alone
    assert {a.name for a in ABLATIONS} == set(BY_NAME) and len(ABLATIONS) == len(BY_NAME)


def fake_stage(run, r: Recipe, stage: str, complete: bool = True):
    folder = stage_dir(run, stage)
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(stage.encode())
    atomic_write_json(folder / FINGERPRINT, stage_fingerprints(r)[stage])
    if complete:
        mark_complete(folder, {"stage": stage})


def test_borrowing_links_finished_stages_with_the_same_fingerprint_only(tmp_path):
    source, run = tmp_path / "book", tmp_path / "ablation"
    fake_stage(source, BASE, "world")
    fake_stage(source, BASE, "tokenizer")
    fake_stage(source, BASE, "clip", complete=False)  # stopped before it finished
    fake_stage(source, replace(BASE, llm_steps=7), "llm")  # built with other settings
    assert borrow_stages(source, run, BASE) == ["world", "tokenizer"]
    for stage in ("world", "tokenizer"):
        a, b = stage_dir(source, stage) / "weights.bin", stage_dir(run, stage) / "weights.bin"
        assert os.stat(a).st_ino == os.stat(b).st_ino  # the same file, not a copy
    assert not stage_dir(run, "clip").exists() and not stage_dir(run, "llm").exists()
    assert borrow_stages(source, run, BASE) == []  # already there
    # A variant whose world differs borrows nothing: every stage is built on the world.
    assert borrow_stages(source, tmp_path / "other", replace(BASE, caption_order="reading")) == []


def test_the_table_reports_each_difference_and_whether_it_exceeds_twice_its_standard_error():
    recipe = {"overall": 0.9, "n": 1000, "per_type": {"colour": 0.95, "count": 0.85}, "minutes": 1.0}
    results = {"recipe": recipe, "ablations": {
        "caption_order": {"choice": "caption object order", "recipe_value": "random order",
                          "variant_value": "reading order",
                          "variant": {"overall": 0.6, "n": 1000, "per_type": {"colour": 0.7, "count": 0.5}, "minutes": 2.5}},
        "mlp_projector": {"choice": "projector", "recipe_value": "linear", "variant_value": "MLP",
                          "variant": {"overall": 0.89, "n": 1000, "per_type": {"colour": 0.95, "count": 0.83}, "minutes": 1.5}},
    }}
    rows = table_rows(results)
    assert [r["name"] for r in rows] == ["caption_order", "mlp_projector"]  # ABLATIONS' order
    assert rows[0]["delta"] == pytest.approx(-0.3) and rows[0]["beyond_noise"]
    # 1 point on 1000 questions at ~90%: the standard error of the difference is ~1.37 points.
    assert rows[1]["delta"] == pytest.approx(-0.01) and not rows[1]["beyond_noise"]
    assert ablations.standard_error(0.9, 1000) == pytest.approx(0.009487, abs=1e-6)
    text = table_markdown(results)
    assert "90.0 → **60.0** (-30.0)" in text and "90.0 → **89.0** (-1.0) (within noise)" in text
    assert "85.0 → 50.0" in text


def test_the_chart_draws_one_arrow_and_one_heat_map_row_per_finished_ablation():
    import matplotlib

    matplotlib.use("Agg")
    from minimind_v.viz.ablations import plot_ablations

    recipe = {"overall": 0.9, "n": 1000, "per_type": {"colour": 0.95, "count": 0.85}}
    variant = {"overall": 0.6, "n": 1000, "per_type": {"colour": 0.7, "count": 0.5}, "minutes": 1.0}
    results = {"recipe": recipe, "ablations": {name: {"choice": name, "recipe_value": "a", "variant_value": "b",
                                                      "variant": variant} for name in ("cls_only", "mlp_projector")}}
    fig = plot_ablations(results)
    left, right = fig.axes[:2]
    assert len(left.get_yticks()) == 2
    assert right.images[0].get_array().shape == (2, 2)
    assert right.images[0].get_array()[0, 1] == pytest.approx(-35.0)  # count: 85 -> 50
    with pytest.raises(ValueError, match="no ablation"):
        plot_ablations({"recipe": recipe, "ablations": {}})


def test_a_rerun_that_trains_nothing_keeps_the_minutes_measured_before(tmp_path, monkeypatch):
    monkeypatch.setattr(ablations, "_accuracy", lambda run: {"overall": 0.5})
    monkeypatch.setattr(ablations, "run_recipe", lambda run, r, nproc: {"timings": {}})
    earlier = {"overall": 0.5, "minutes": 7.5, "stages_trained": ["pretrain", "sft"]}
    again = ablations._train(tmp_path / "run", BASE, [], 1, earlier)
    assert again["minutes"] == 7.5 and again["stages_trained"] == ["pretrain", "sft"]
    monkeypatch.setattr(ablations, "run_recipe", lambda run, r, nproc: {"timings": {"sft": 3.0}})
    trained = ablations._train(tmp_path / "run", BASE, [], 1, earlier)
    assert trained["stages_trained"] == ["sft"] and trained["minutes"] < 1  # measured now


def test_a_damaged_results_file_is_named(tmp_path):
    assert ablations.read_results(tmp_path) is None
    (tmp_path / ablations.RESULTS).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="results.json is not a results table"):
        ablations.read_results(tmp_path)
