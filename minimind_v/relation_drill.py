"""The relation rule alone, in text: can the book's decoder learn to judge a relation once both
positions are written out?

World 2 asks "Is the circle above the red cross?". Its worked answers ("The circle is in the top
left, the red cross at the bottom: yes.") put the two positions in the text, so the verdict asks
nothing of the picture: it is a function of the relation word and the two position phrases. This
drill trains a fresh decoder of the book's preset on that last step alone, with the world's own
questions and answers (``shapes.questions``) and the loss on the verdict token only, and scores it
on 400 questions drawn with another seed (the rule is the same; the words may repeat).

In the worked form the same two positions take opposite verdicts under "above" and "below" (and
under "left of" and "right of"): the verdict depends on the relation word and both positions at
once. In the ordered form (``relation_answers="ordered"``) the question's two objects are named in
the order the relation reads, so the verdict is whether the first position is above (or left of)
the second; the relation word only says which of the two comparisons to make. In the regions form
(``relation_answers="regions"``) the relation and the anchor's place meet once, in the rows or
columns the answer names ("above it: the top and middle rows"), and the verdict is whether the
subject's row is among them; the drill trains both, the region and the verdict, the text before
each given.

    python -m minimind_v.relation_drill                        # every form, 600 steps each (~30-45 s each)
    python -m minimind_v.relation_drill --forms worked --relations above below
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from .config import PRESETS, MiniMindConfig
from .data.shapes_questions import RELATION_ANSWERS, questions
from .data.shapes_scenes import RELATIONS, random_scene
from .model.llm import IGNORE_INDEX, MiniMindForCausalLM
from .relation_report import answer_steps
from .tokenizer import train_tokenizer
from .train.trainer import make_optimizer

FORMS = tuple(form for form in RELATION_ANSWERS if form != "verdict")  # the forms that write positions down


def drill_examples(n: int, form: str, seed: int, relations=RELATIONS) -> list[tuple[str, str]]:
    """n yes/no relation questions of the world, as (question, worked answer), drawn from random
    scenes by the world's own generator; only those whose relation is in ``relations``."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    unknown = set(relations) - set(RELATIONS)
    if unknown or not relations:
        raise ValueError(f"relations must be some of {RELATIONS}, got {list(relations)!r}")
    rng, out = random.Random(seed), []
    while len(out) < n:
        for question, reply, kind in questions(random_scene(rng), rng, ("relation",), relation_answers=form):
            if question.startswith("Is ") and any(f" {r} " in question for r in relations):
                out.append((question, reply))
    return out[:n]


def answer_parts(reply: str) -> list[tuple[str, bool]]:
    """The answer cut into (text, learned) pieces that join back into it: learned are the parts its
    earlier words decide (the verdict; in the regions form also the region, as
    ``relation_report.answer_steps`` finds it), given are the places the picture decides."""
    cut = reply.rindex(":") + 1  # the verdict follows the last colon
    verdict = (reply[cut:].rstrip("."), True)
    region = answer_steps(reply).get("region")
    if region is None:  # worked, ordered: every place given, the verdict learned
        return [(reply[:cut], False), verdict]
    start = reply.index(" it: ") + len(" it: ")
    end = start + len(region)
    return [(reply[:start], False), (reply[start:end], True), (reply[end:cut], False), verdict]


def encode(tokenizer, question: str, reply: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat turn and its answer, and labels that keep the learned parts' tokens
    alone (``answer_parts``; the places are given, as the model has written them)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for text, learned in answer_parts(reply):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if learned else [IGNORE_INDEX] * len(piece)
    return ids, labels


def batch_of(tokenizer, examples) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [encode(tokenizer, q, a) for q, a in examples]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows])
    return ids, labels


@torch.no_grad()
def verdict_accuracy(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose every learned token is the greedy choice given the text before it."""
    model.eval()
    predicted = model(ids).logits[:, :-1].argmax(-1)
    targets = labels[:, 1:]
    right = ((predicted == targets) | (targets == IGNORE_INDEX)).all(dim=1)
    model.train()
    return float(right.float().mean())


def drill(form: str, steps: int = 600, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
          relations=RELATIONS, preset: str = "tiny", n_eval: int = 400, every: int = 100) -> dict:
    """Train a fresh decoder of ``preset`` on the verdicts of ``form``; returns the held-out verdict
    accuracy every ``every`` steps, and what answering "no" to everything scores."""
    train = drill_examples(steps * batch_size, form, seed, relations)
    held_out = drill_examples(n_eval, form, seed + 10_000, relations)
    tokenizer = train_tokenizer([f"user\n{q}\nassistant\n{a}" for q, a in train[:5000]], vocab_size=512)
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(MiniMindConfig(**PRESETS[preset], vocab_size=len(tokenizer),
                                               max_position_embeddings=192)).train()
    optimizer = make_optimizer(model, 0.1, lr)
    eval_ids, eval_labels = batch_of(tokenizer, held_out)
    curve = [(0, verdict_accuracy(model, eval_ids, eval_labels))]
    start = time.perf_counter()
    for step in range(1, steps + 1):
        ids, labels = batch_of(tokenizer, train[(step - 1) * batch_size: step * batch_size])
        model(ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % every == 0 or step == steps:
            curve.append((step, verdict_accuracy(model, eval_ids, eval_labels)))
    majority = sum(a.endswith(": no.") for _, a in held_out) / len(held_out)
    return {"form": form, "relations": list(relations), "curve": curve, "answer_no": majority,
            "seconds": time.perf_counter() - start}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    p.add_argument("--relations", nargs="+", choices=RELATIONS, default=list(RELATIONS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=100, help="score the held-out questions every N steps")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="the decoder's size (config.PRESETS)")
    args = p.parse_args(argv)
    for form in args.forms:
        result = drill(form, args.steps, args.batch_size, args.lr, args.seed, args.relations, args.preset,
                       every=args.every)
        curve = ", ".join(f"{step}: {100 * acc:.1f}" for step, acc in result["curve"])
        scored = "regions and verdicts" if form == "regions" else "verdicts"
        print(f"{form:>8} ({', '.join(result['relations'])}; {args.preset}): held-out {scored} right at step {curve}% "
              f"(answering 'no' to all: {100 * result['answer_no']:.1f}%; {result['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
