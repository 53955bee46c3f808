"""What an answer is worth without looking: the baselines an accuracy is read against.

- **chance**: a uniform guess among the answers a type has in the held-out set (1/5 for a
  colour, 1/9 for a position, 1/2 for yes/no);
- **majority**: for each question form ("what colour is the <size> <shape>?"), the answer the
  training set gives that form most often; the best any model can do from the question's wording
  alone, if it learned the training answers' frequencies perfectly;
- **text only** and **shuffled picture** need the model: the same questions with no picture, or
  with another question's picture (``evaluate_vqa(..., with_image=False)`` and
  ``evaluate_vqa(..., shuffle_pictures=seed)``). The text-only model may score below chance:
  the placeholders it was trained to read are empty, an input it never saw.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from .data.shapes import question_form
from .evaluate import normalise


def _qa_pairs(records: list[dict]):
    """(answer type, question, answer) of every question-answer turn pair of shapes-world records."""
    for r in records:
        turns = r.get("conversations", [])
        kinds = r.get("answer_types") or [r.get("answer_type", "all")] * (len(turns) // 2)
        for kind, q, a in zip(kinds, turns[::2], turns[1::2]):
            yield kind, q["value"], a["value"]


def _summary(hits: dict, counts: dict) -> dict:
    return {"overall": sum(hits.values()) / max(1, sum(counts.values())),
            "per_type": {k: hits[k] / counts[k] for k in sorted(counts)}}


def chance(eval_records: list[dict]) -> dict:
    """Expected accuracy of a uniform guess among each type's distinct held-out answers."""
    answers, counts = defaultdict(set), Counter()
    for kind, _, a in _qa_pairs(eval_records):
        answers[kind].add(normalise(a))
        counts[kind] += 1
    return _summary({k: counts[k] / len(answers[k]) for k in counts}, counts)


def majority(train_records: list[dict], eval_records: list[dict]) -> dict:
    """Accuracy of answering each held-out question with the training set's most frequent answer
    to its question form (or, for a form never trained on, to its answer type)."""
    by_form, by_type = defaultdict(Counter), defaultdict(Counter)
    for kind, q, a in _qa_pairs(train_records):
        by_form[question_form(q)][normalise(a)] += 1
        by_type[kind][normalise(a)] += 1
    hits, counts = Counter(), Counter()
    for kind, q, a in _qa_pairs(eval_records):
        seen = by_form.get(question_form(q)) or by_type.get(kind)
        guess = seen.most_common(1)[0][0] if seen else None
        hits[kind] += guess == normalise(a)
        counts[kind] += 1
    return _summary(hits, counts)
