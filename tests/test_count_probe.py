"""The count probe: the state it reads is the one a single unpadded prompt gives, whatever the
batch; a layer that holds the number is read right and one of noise is not; the SFT turns and the
held-out groups are counted as worked out by hand."""

from collections import Counter

import pytest
import torch

from minimind_v.count_probe import (MAX_COUNT, answer_states, number_label, probe_counts, probe_predictions,
                                    sft_count_turns, table_markdown)
from minimind_v.count_report import GROUPS
from minimind_v.inference import LoadedVLM

TWO_CROSSES = [{"shape": "cross", "colour": "red", "size": "small", "position": "top left"},
               {"shape": "cross", "colour": "blue", "size": "large", "position": "center"}]
ONE = [{"shape": "circle", "colour": "red", "size": "small", "position": "bottom"}]


@pytest.fixture(scope="module")
def vlm(make_tiny_vlm, world_tokenizer, tiny_encoder):
    model = make_tiny_vlm(seed=2).eval()
    return LoadedVLM.from_parts(model, world_tokenizer, tiny_encoder)


def test_number_labels():
    assert [number_label(w, "here") for w in ("zero", "One", "two.", " Three ")] == [0, 1, 2, 3]
    for bad in ("four", "yes", ""):
        with pytest.raises(ValueError, match=f"here: {bad!r} is not a count of 0 to {MAX_COUNT}"):
            number_label(bad, "here")


def test_each_state_is_that_of_the_prompt_alone_whatever_its_batch(vlm):
    questions = ["How many crosses are there?", "How many red objects can you see in the picture?",
                 "How many objects are there?"]
    n_tokens, width = vlm.model.config.num_image_tokens, vlm.model.config.vision_width
    tokens = torch.randn(len(questions), n_tokens, width, generator=torch.Generator().manual_seed(0))
    batched = answer_states(vlm, questions, tokens, batch_size=2)  # a padded batch of two, then one alone
    assert batched.shape == (3, vlm.model.config.n_layers, vlm.model.config.dim)
    processor = vlm.processor
    for i, question in enumerate(questions):
        ids = torch.tensor([processor.question_ids(question)])  # one prompt, no padding
        with torch.no_grad():
            out = vlm.model(input_ids=ids, image_tokens=tokens[i : i + 1], output_hidden_states=True, use_cache=False)
        alone = torch.stack([h[0, -1] for h in out.hidden_states[1:]])  # after each layer
        torch.testing.assert_close(batched[i], alone, rtol=1e-4, atol=1e-5)
    blind = answer_states(vlm, questions, None)
    assert not torch.allclose(blind[:, -1], batched[:, -1])  # the picture changes the answer's state


def test_a_layer_that_holds_the_number_is_read_and_noise_is_not():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % (MAX_COUNT + 1)
    test_labels = torch.arange(200) % (MAX_COUNT + 1)

    def states(y):  # layer 0: noise; layer 1: the number on one axis of 16, plus noise
        noise = torch.randn(len(y), 2, 16, generator=g)
        noise[:, 1, 3] += 8.0 * y  # classes 8 noise widths apart
        return noise

    predictions = probe_predictions(states(labels), labels, states(test_labels))
    assert predictions.shape == (2, 200)
    assert (predictions[1] == test_labels).float().mean() > 0.95
    assert (predictions[0] == test_labels).float().mean() < 0.45  # chance is 0.25


def test_sft_count_turns_are_the_count_turns_with_their_pictures():
    def record(rid, turns, kinds):
        return {"id": rid, "answer_types": kinds,
                "conversations": [{"from": f, "value": v} for q, a in turns for f, v in (("human", q), ("gpt", a))]}

    records = [record("a", [("<image>\nHow many crosses are there?", "two"), ("What colour is it?", "red")],
                      ["count", "colour"]),
               record("b", [("What shape is it?\n<image>", "circle"), ("How many objects are there?", "one")],
                      ["shape", "count"]),
               record("c", [("How many circles are there?", "one"), ("How many red objects are there?", "one")],
                      ["count", "count"])]
    tokens = torch.arange(3.0)[:, None, None].expand(3, 3, 4)  # record i's picture: all i
    questions, labels, picked = sft_count_turns(records, tokens, n=10)
    # One "two" and three "one"s: one of each number, the "one" drawn from the three.
    assert labels.tolist() == [1, 2] and picked[1, 0, 0] == 0.0 and questions[1] == "How many crosses are there?"
    assert (questions[0], picked[0, 0, 0].item()) in {("How many objects are there?", 1.0),
                                                      ("How many circles are there?", 2.0),
                                                      ("How many red objects are there?", 2.0)}
    assert len(sft_count_turns(records, tokens, n=1)[0]) == 0  # fewer than one of each number asked
    with pytest.raises(ValueError, match="SFT record 'd'"):
        sft_count_turns([record("d", [("How many objects are there?", "many")], ["count"])], tokens, n=1)
    with pytest.raises(ValueError, match="no count turns"):
        sft_count_turns([record("e", [("What colour is it?", "red")], ["colour"])], tokens, n=1)


def test_held_out_counts_are_split_as_the_count_report_splits_them(vlm):
    n_tokens, width = vlm.model.config.num_image_tokens, vlm.model.config.vision_width
    g = torch.Generator().manual_seed(1)
    fit_questions = ["How many crosses are there?", "How many objects are there?"] * 10
    fits = [(fit_questions, torch.tensor([2, 1] * 10), torch.randn(20, n_tokens, width, generator=g)) for _ in range(2)]
    answers = [{"id": "q0", "question": "How many crosses are there?", "answer": "two", "correct": False},
               {"id": "q1", "question": "How many objects are there?", "answer": "two", "correct": True},
               {"id": "q2", "question": "How many circles are there?", "answer": "one", "correct": True}]
    counts = probe_counts(vlm, fits, answers, [TWO_CROSSES, TWO_CROSSES, ONE], torch.randn(3, n_tokens, width, generator=g))
    assert counts[GROUPS[5]]["questions"] == 1 and counts[GROUPS[5]]["model"] == 0   # a red and a blue cross
    assert counts[GROUPS[0]]["questions"] == 1 and counts[GROUPS[2]]["questions"] == 1
    assert counts["all"]["model"] == 2 and counts["all"]["questions"] == 3
    layers = [f"layer {k}" for k in range(1, vlm.model.config.n_layers + 1)]
    assert counts["all"]["draws"] == 2
    for key in ("model", "question only", *layers):  # every group's counts add up to all of them
        assert sum(counts[g][key] for g in GROUPS) == counts["all"][key] <= (3 if key == "model" else 6)
    text = table_markdown(counts)
    assert "| read right, % | all (3) |" in text and "| the model's answers | 66.7 |" in text
    assert "probe, after the last layer, no picture" in text and f"after layer {len(layers)} (normed)" in text
    two_draws = Counter(questions=2, model=1, draws=2, **{"layer 1": 4, "layer 2": 1})  # per draw: 2 of 2, 1 of 4
    assert table_markdown({"all": two_draws, GROUPS[0]: two_draws}).splitlines()[2:5] == [
        "| the model's answers | 50.0 | 50.0 |", "| probe, after layer 1 | 100.0 | 100.0 |",
        "| probe, after layer 2 (normed) | 25.0 | 25.0 |"]


def test_a_run_without_readable_count_answers_is_refused_before_anything_loads(tmp_path):
    import json

    from minimind_v.count_probe import main

    run = tmp_path / "run"
    (run / "world").mkdir(parents=True)
    (run / "eval").mkdir()
    (run / "world" / "eval_data.json").write_text(json.dumps([{"id": "q0", "image": "p.png", "scene": ONE}]))
    (run / "eval" / "answers.json").write_text("[{\"id\": 1}]")
    with pytest.raises(SystemExit, match=r"count_probe: .*answers.json is not an evaluation's answers.json"):
        main([str(run)])
    colour = {"id": "q0", "type": "colour", "question": "What colour is the circle?", "answer": "red",
              "prediction": "red", "correct": True}
    (run / "eval" / "answers.json").write_text(json.dumps([colour]))
    with pytest.raises(SystemExit, match="holds no count answers about one picture"):
        main([str(run)])
    (run / "eval" / "answers.json").write_text(json.dumps([colour | {"id": "q9"}]))
    with pytest.raises(SystemExit, match="answer 'q9' has no held-out record"):
        main([str(run)])
