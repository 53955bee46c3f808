"""The attention report: which patches hold an object (worked out by hand from the drawing
rules), each object's share of the picture's attention (hand-made attention rows), which objects a
question names, the tables' figures, and a run folder written here traced with a tiny model,
its shares checked against one plain forward pass of that model."""

import json

import numpy as np
import pytest
import torch

from minimind_v.attention_report import (main, inked_patches, object_shares, question_objects, run_rows,
                                         summarise, tables_markdown)
from minimind_v.data.shapes_scenes import render_scene
from minimind_v.model.vlm import placeholder_mask

CROSSES = [{"shape": "cross", "colour": "red", "size": "small", "position": "top left", "offset": [0, 0]},
           {"shape": "cross", "colour": "blue", "size": "large", "position": "center", "offset": [0, 0]},
           {"shape": "circle", "colour": "red", "size": "small", "position": "bottom right", "offset": [0, 0]}]


def cells(mask: np.ndarray, grid: int) -> set:
    return {divmod(int(i), grid) for i in np.flatnonzero(mask)}


def test_the_patches_of_an_object_worked_out_by_hand():
    # At 224 px in 32-px patches: a small object (42 px) centred in the centre cell spans pixels
    # 91..132, so patch rows and columns 2..4. A square inks all nine; a circle of radius 21 about
    # (111.5, 111.5) misses the four corner patches (their nearest pixel lies 23.3 px away).
    centre = {"shape": "square", "colour": "red", "size": "small", "position": "center", "offset": [0, 0]}
    assert cells(inked_patches(centre, 224, 7), 7) == {(r, c) for r in (2, 3, 4) for c in (2, 3, 4)}
    circle = centre | {"shape": "circle"}
    assert cells(inked_patches(circle, 224, 7), 7) == {(2, 3), (3, 2), (3, 3), (3, 4), (4, 3)}
    # A large square (64 px) in the top-left cell: pixels 6..69, patches 0..2 both ways.
    top_left = centre | {"size": "large", "position": "top left"}
    assert cells(inked_patches(top_left, 224, 7), 7) == {(r, c) for r in (0, 1, 2) for c in (0, 1, 2)}
    # At 64 px in 2 x 2 patches a small object in a corner cell (12 px, at 4..15 or 48..59) inks one patch.
    assert cells(inked_patches(CROSSES[0], 64, 2), 2) == {(0, 0)}
    assert cells(inked_patches(CROSSES[2], 64, 2), 2) == {(1, 1)}
    with pytest.raises(ValueError, match="does not split into 7 x 7 patches"):
        inked_patches(centre, 100, 7)


def test_each_objects_share_of_the_pictures_attention():
    patches = np.array([[True, False, False, False], [False, False, False, True]])  # patch 0; patch 3
    attention = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0],     # CLS and patch 0
                              [0.0, 0.25, 0.25, 0.25, 0.25],  # every patch alike
                              [0.1, 0.1, 0.0, 0.0, 0.2]])     # a row's image part: 0.4 of the row
    np.testing.assert_allclose(object_shares(attention, patches), [[0.5, 0.0], [0.25, 0.25], [0.25, 0.5]])


@pytest.mark.parametrize("question, roles", [
    ("How many crosses are there?", {"fits": [0, 1]}),
    ("How many red objects can you see?", {"fits": [0, 2]}),
    ("How many squares are in the picture?", {"fits": []}),
    ("What colour is the circle?", {"named": [2]}),
    ("What colour is the triangle?", {"named": []}),                      # absent: no object
    ("What shape is left of the blue cross?", {"anchor": [1], "found": [0]}),   # column 0 < column 1
    ("Which shape is above the red circle?", {"anchor": [2], "found": [0, 1]}),
    ("What shape is right of the circle?", {"anchor": [2], "found": []}),      # nothing there
    ("Is the circle below the red cross?", {"anchor": [0], "subject": [2]}),
])
def test_the_objects_a_question_names(question, roles):
    assert question_objects(question, CROSSES) == roles


def test_a_relation_must_name_one_anchor():
    with pytest.raises(ValueError, match="names 2 anchors"):
        question_objects("What shape is left of the cross?", CROSSES)


def _row(kind, correct, roles, shares, patches, answer="two", prediction="two"):
    return {"type": kind, "correct": correct, "roles": roles, "shares": shares, "patches": patches,
            "picture_tokens": 50, "answer": answer, "prediction": prediction}


def test_the_tables_figures_worked_out_by_hand():
    rows = [
        _row("count", True, {"fits": [0, 1]}, [[0.2, 0.4], [0.1, 0.1], [0.3, 0.0]], [5, 5, 10]),
        _row("count", False, {"fits": [0, 1]}, [[0.4, 0.2], [0.0, 0.2], [0.1, 0.1]], [5, 5, 10], prediction="One."),
        _row("count", False, {"fits": []}, [[0.4, 0.2]], [5], answer="zero", prediction="one"),
        _row("relation", False, {"anchor": [1], "found": [0]}, [[0.1, 0.3], [0.6, 0.2]], [10, 5],
             answer="circle", prediction="nothing"),
        _row("relation", True, {"anchor": [0], "found": []}, [[0.5, 0.5], [0.0, 0.0]], [5, 5],
             answer="nothing", prediction="nothing"),
    ]
    summary = summarise(rows)
    types = {(t["type"], t["right"]): t for t in summary["types"]}
    # Peak shares: the most any layer puts on the named objects together (layer sums per object set).
    assert types == {("count", True): {"type": "count", "right": True, "questions": 1, "share": 0.5, "even": 0.2},
                     ("count", False): {"type": "count", "right": False, "questions": 1, "share": 0.4, "even": 0.2},
                     ("relation", False): {"type": "relation", "right": False, "questions": 1, "share": 0.7,
                                           "even": 0.3},
                     ("relation", True): {"type": "relation", "right": True, "questions": 1, "share": 0.5,
                                          "even": 0.1}}   # the count of none names nothing: left out
    right, wrong = summary["counts"]
    assert right == {"right": True, "questions": 1, "says_one": 0, "share": 0.5, "even": 0.2,
                     "least": 0.1, "least_even": 0.1}     # object 1's peak is 0.1
    assert wrong == {"right": False, "questions": 1, "says_one": 1, "share": 0.4, "even": 0.2,
                     "least": 0.2, "least_even": 0.1}     # "One." says one
    assert summary["relations"] == [
        {"truth": "nothing", "right": True, "questions": 1, "anchor": 0.5, "anchor_even": 0.1,
         "other": None, "other_even": None},
        {"truth": "a shape", "right": False, "questions": 1, "anchor": 0.6, "anchor_even": 0.1,
         "other": 0.3, "other_even": 0.2}]
    text = tables_markdown(summary)
    assert "| count, right | 1 | 50 | 20 |" in text
    assert "| right | 1 | 0 | 50 | 20 | 10 | 10 |" in text and "| wrong | 1 | 1 | 40 | 20 | 20 | 10 |" in text
    assert "| a shape | wrong | 1 | 60 | 10 | 30 | 20 |" in text and "| nothing | right | 1 | 50 | 10 | - | - |" in text


@pytest.fixture
def run(tmp_path, save_tiny_sft):
    """A run folder: three held-out questions about one picture, their answers, a tiny model."""
    from minimind_v.runfiles import mark_complete

    run = tmp_path / "run"
    (run / "world" / "eval_data_images").mkdir(parents=True)
    (run / "eval").mkdir()
    render_scene(CROSSES, 64).save(run / "world" / "eval_data_images" / "p.png")
    questions = [("count", "How many crosses are there?", "two", "one"),
                 ("relation", "What shape is left of the blue cross?", "cross", "nothing"),
                 ("colour", "What colour is the circle?", "red", "red")]
    records = [{"id": f"q{i}", "image": "p.png", "scene": CROSSES,
                "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
               for i, (_, q, a, _) in enumerate(questions)]
    answers = [{"id": f"q{i}", "type": t, "question": q, "answer": a, "prediction": p, "correct": a == p}
               for i, (t, q, a, p) in enumerate(questions)]
    (run / "world" / "eval_data.json").write_text(json.dumps(records))
    (run / "eval" / "answers.json").write_text(json.dumps(answers))
    save_tiny_sft(run / "sft", seed=1)
    mark_complete(run / "sft")
    return run


def test_a_run_is_traced_as_one_forward_pass_of_its_model_reads(run):
    from minimind_v.inference import load_vlm

    rows, examples = run_rows(run)
    assert [r["roles"] for r in rows] == [{"fits": [0, 1]}, {"anchor": [1], "found": [0]}, {"named": [2]}]
    vlm = load_vlm(run / "sft")
    model, processor = vlm.model, vlm.processor
    pixels = processor(images=[render_scene(CROSSES, 64)])["pixel_values"]
    for row in rows:
        ids = torch.tensor([processor.question_ids(row["question"])])
        with torch.no_grad():
            out = model(input_ids=ids, image_tokens=model.encode_images(pixels), output_attentions=True)
        image = placeholder_mask(ids, torch.tensor(model.config.image_token_ids))[0]
        for layer, attention in enumerate(out.attentions):
            on_picture = attention[0, :, -1, image].mean(0)  # CLS, then patches (0,0) (0,1) (1,0) (1,1)
            # The two small objects ink one patch each at 64 px (worked out above); the large cross
            # in the centre reaches into all four.
            total = on_picture.sum()
            expected = torch.stack([on_picture[1], total - on_picture[0], on_picture[4]]) / total
            np.testing.assert_allclose([share[layer] for share in row["shares"]], expected, rtol=1e-4, atol=1e-6)
    assert [(e["kind"], e["prediction"]) for e in examples] == [("count", "one"), ("relation", "nothing")]
    maps = np.asarray(examples[0]["patch_attention"])
    assert maps.shape == (model.config.n_layers, 2, 2)
    np.testing.assert_allclose(maps[:, 0, 0], rows[0]["shares"][0], atol=1e-3)  # the red cross's one patch


def test_the_report_prints_and_records_and_refuses_a_broken_run(run, tmp_path, capsys):
    record = tmp_path / "attention.json"
    main([str(run), str(run), "--record", str(record)])
    out = capsys.readouterr().out
    assert "all 2 together" in out and "| count, wrong | 2 |" in out
    written = json.loads(record.read_text())
    assert set(written) == {"runs", "together", "examples"} and len(written["examples"]) == 4
    one_run = written["runs"][str(run)]["counts"]
    assert written["together"]["counts"] == [one_run[0] | {"questions": 2, "says_one": 2}]  # the run twice
    (run / "eval" / "answers.json").write_text("[{\"id\": 1}]")
    with pytest.raises(SystemExit, match=r"attention_report: .*answers.json is not an evaluation's answers.json"):
        main([str(run)])
