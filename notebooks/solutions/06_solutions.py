"""Chapter 6, exercises: worked solutions.

Each exercise is one function that computes its answer, checks it with an assert, and returns
it. Run them all with ``python notebooks/solutions/06_solutions.py``; ``tests/test_exercises.py``
runs them too. Everything is built here, small and random: no run folder is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minimind_v.config import MiniMindConfig
from minimind_v.model.llm import MiniMindForCausalLM
from minimind_v.tokenizer import IGNORE_INDEX, encode_chat, train_tokenizer

QUESTIONS = [("What colour is the circle?", "red"), ("How many shapes are there?", "two"),
             ("Where is the square?", "top left"), ("What shape is the red object?", "circle"),
             ("Is the circle small or large?", "small"), ("What colour is the square?", "blue"),
             ("Where is the circle?", "bottom right")]


def small_tokenizer():
    """A byte-level BPE (with <|image|>) trained in a moment on the questions and answers above."""
    texts = [f"user\n{q}" for q, _ in QUESTIONS] + [f"assistant\n{a}" for _, a in QUESTIONS]
    return train_tokenizer(texts * 3, vocab_size=320)


def conversation(n_questions: int) -> list[dict]:
    """Seed-format turns: the picture, then n questions and their answers."""
    turns = []
    for i, (question, answer) in enumerate(QUESTIONS[:n_questions]):
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def supervised_runs(ids, labels):
    """The stretches of ids whose labels carry a loss."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def exercise_1():
    """Loss tokens: each answer's tokens plus its </s>, and nothing else.

    The book's tokenizer writes "red" and "two" as one token each: with their two </s>, 4 loss
    tokens. This one, trained on a handful of sentences, spells "two" in three pieces: 6. Either
    way nothing else of the conversation's 94 tokens (50 placeholders among them) has a loss.
    """
    tokenizer = small_tokenizer()
    ids, labels = encode_chat(tokenizer, conversation(2), num_image_tokens=50)
    predicted = sum(len(tokenizer(a, add_special_tokens=False).input_ids) + 1 for _, a in QUESTIONS[:2])
    assert sum(label != IGNORE_INDEX for label in labels) == predicted
    assert [tokenizer.decode(run) for run in supervised_runs(ids, labels)] == ["red</s>", "two</s>"]
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    assert all(label == IGNORE_INDEX for token, label in zip(ids, labels) if token == image_id)
    runs = [tokenizer.decode(run) for run in supervised_runs(ids, labels)]
    print(f"{predicted} of {len(ids)} tokens carry a loss: {runs}")
    return predicted


def exercise_2():
    """The copying model: unshifted, its loss is ~0 (it "predicts" the token it is given);
    shifted, it scores the next token ~20 below the one it copies: a loss of ~20 wherever the two
    differ. A model trained without the shift would learn exactly this copy, a perfect training
    loss and nothing to say at generation time, where the next token is not given."""
    tokenizer = small_tokenizer()
    ids, labels = encode_chat(tokenizer, conversation(2), num_image_tokens=50)
    ids, labels = torch.tensor([ids]), torch.tensor([labels])  # (1, T)
    logits = 20.0 * F.one_hot(ids, len(tokenizer)).float()  # (1, T, vocab): a score of 20 on the token itself
    unshifted = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    shifted = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert unshifted < 1e-4 and 19 < shifted < 21, (unshifted, shifted)
    print(f"the copying model: loss without the shift {unshifted:.1e}, with it {shifted:.2f}")
    return unshifted.item(), shifted.item()


def exercise_3():
    """The "\\n" after </s> has no loss: generation stops at </s>, so the model never writes what
    follows it; the next turn's "<s>user" is the chat format's, not the model's to predict."""
    tokenizer = small_tokenizer()
    ids, labels = encode_chat(tokenizer, conversation(3), num_image_tokens=50)
    eos, newline = tokenizer.eos_token_id, tokenizer("\n", add_special_tokens=False).input_ids
    ends = [t for t, label in enumerate(labels) if label == eos]  # every answer's closing </s>
    assert len(ends) == 3
    for t in ends:
        assert ids[t + 1:t + 2] == newline and labels[t + 1] == IGNORE_INDEX
    print(f"answers end at positions {ends}; the token after each is '\\n' with label {IGNORE_INDEX}")
    return ends


def exercise_4():
    """The picture is paid once. Here: one question, 2 loss tokens in 68 (2.9%); seven questions,
    30 in 201 (14.9%): five times the share of the tokens that teach, for three times the tokens."""
    tokenizer = small_tokenizer()
    share = {}
    for n in (1, 7):
        ids, labels = encode_chat(tokenizer, conversation(n), num_image_tokens=50)
        share[n] = (sum(label != IGNORE_INDEX for label in labels), len(ids))
    fraction = {n: loss / total for n, (loss, total) in share.items()}
    assert fraction[7] > 2.5 * fraction[1]
    print({n: f"{loss} of {total} tokens ({fraction[n]:.1%})" for n, (loss, total) in share.items()})
    return fraction


def exercise_5():
    """Batch loss = sum over samples of n_i L_i / sum n_i, the mean over answer tokens: the
    seven-answer sample weighs seven times the one-answer sample. (A mean over samples would give
    each answer of a short sample more weight than each answer of a long one.)"""
    config = MiniMindConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MiniMindForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(0)
    # Embeddings (and the tied head) of standard deviation 1 instead of 0.02: confident, varied
    # predictions, so the two samples' losses differ clearly.
    torch.nn.init.normal_(model.tok_embeddings.weight, std=1.0, generator=generator)
    ids = torch.randint(4, 50, (2, 12), generator=generator)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 6] = ids[0, 6]  # sample 0: one answer token
    labels[1, 4:11] = ids[1, 4:11]  # sample 1: seven
    with torch.no_grad():
        batch = model(input_ids=ids, labels=labels, use_cache=False).loss
        alone = [model(input_ids=ids[i:i + 1], labels=labels[i:i + 1], use_cache=False).loss for i in range(2)]
    weighted = (1 * alone[0] + 7 * alone[1]) / 8
    torch.testing.assert_close(batch, weighted)
    assert not torch.isclose(batch, (alone[0] + alone[1]) / 2)
    print(f"batch {batch:.4f} = (1 x {alone[0]:.4f} + 7 x {alone[1]:.4f}) / 8; mean over samples would be "
          f"{(alone[0] + alone[1]) / 2:.4f}")
    return batch.item()


if __name__ == "__main__":
    for n in range(1, 6):
        print(f"--- exercise {n}")
        globals()[f"exercise_{n}"]()
