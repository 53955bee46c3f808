"""The relation drill: the world's own yes/no relation questions, the loss on what the text before decides."""

import pytest

from minimind_v.relation_drill import batch_of, drill, drill_examples, encode
from minimind_v.tokenizer import train_tokenizer


@pytest.mark.parametrize("form", ["worked", "ordered", "regions"])
def test_drill_examples_are_the_worlds_yes_no_relation_questions(form):
    examples = drill_examples(200, form, seed=3, relations=("above", "below"))
    assert len(examples) == 200
    for question, reply in examples:
        assert question.startswith("Is ") and (" above " in question or " below " in question)
        assert reply.endswith((": yes.", ": no."))
    verdicts = {reply.rsplit(": ", 1)[1] for _, reply in examples}
    assert verdicts == {"yes.", "no."}
    assert drill_examples(50, form, seed=3) == drill_examples(50, form, seed=3)  # the seed fixes them


def test_ordered_and_worked_drills_ask_the_same_questions():
    worked, ordered = drill_examples(300, "worked", 5), drill_examples(300, "ordered", 5)
    assert [q for q, _ in worked] == [q for q, _ in ordered]
    assert [a.rsplit(": ", 1)[1] for _, a in worked] == [a.rsplit(": ", 1)[1] for _, a in ordered]
    assert any(a != b for (_, a), (_, b) in zip(worked, ordered))  # below / right of: the names swap


def _encoded(form: str, seed: int, n: int = 20):
    """The first n drill examples of ``form`` encoded: (reply, ids, labels, the labelled positions)."""
    examples = drill_examples(100, form, seed)
    tokenizer = train_tokenizer([f"user\n{q}\nassistant\n{a}" for q, a in examples], vocab_size=400)
    for question, reply in examples[:n]:
        ids, labels = encode(tokenizer, question, reply)
        yield reply, ids, labels, [i for i, label in enumerate(labels) if label != -100], tokenizer


def test_labels_keep_the_verdict_alone():
    for reply, ids, labels, kept, tokenizer in _encoded("ordered", 1):
        assert kept and kept[-1] == len(ids) - 1  # the verdict is last
        assert tokenizer.decode([ids[i] for i in kept]).strip() == reply.rsplit(": ", 1)[1].rstrip(".")
        assert [labels[i] for i in kept] == [ids[i] for i in kept]
    ids, labels = batch_of(tokenizer, drill_examples(8, "ordered", 1))
    assert ids.shape == labels.shape and ids.shape[0] == 8


def test_regions_labels_keep_the_region_and_the_verdict():
    # "The red cross is at the bottom; above it: the top and middle rows; the circle is in the top row: yes."
    for reply, ids, labels, kept, tokenizer in _encoded("regions", 2):
        region = reply.split(" it: ", 1)[1].split(";")[0]
        verdict = reply.rsplit(": ", 1)[1].rstrip(".")
        gaps = [b for a, b in zip(kept, kept[1:]) if b != a + 1]
        assert len(gaps) == 1 and kept[-1] == len(ids) - 1  # two runs of learned tokens, the verdict last
        assert tokenizer.decode([ids[i] for i in kept if i < gaps[0]]).strip() == region
        assert tokenizer.decode([ids[i] for i in kept if i >= gaps[0]]).strip() == verdict


def test_drill_runs_and_reports_its_curve():
    result = drill("worked", steps=4, batch_size=4, n_eval=16, every=2, relations=("left of",))
    assert [step for step, _ in result["curve"]] == [0, 2, 4]
    assert all(0.0 <= acc <= 1.0 for _, acc in result["curve"])
    assert 0.0 < result["answer_no"] < 1.0


def test_refuses_unknown_forms_and_relations():
    with pytest.raises(ValueError, match="form must be one of"):
        drill_examples(3, "verdict", 0)
    with pytest.raises(ValueError, match="relations must be some of"):
        drill_examples(3, "worked", 0, relations=("near",))
