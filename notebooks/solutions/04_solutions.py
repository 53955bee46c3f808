"""Chapter 4, exercises: worked solutions.

Each exercise is one function that computes its answer, checks it with an assert, and returns
it. Run them all with ``python notebooks/solutions/04_solutions.py``; ``tests/test_exercises.py``
runs them too. Everything is built here, small and random: no run folder is needed.
"""

from __future__ import annotations

import torch
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from minimind_v.model.processing import MiniMindVProcessor
from minimind_v.model.vlm import MiniMindVLM, VLMConfig, placeholder_mask
from minimind_v.tokenizer import IGNORE_INDEX, train_tokenizer

IMAGE_ID = 3  # <|image|> in the tokenizers trained here


def find_placeholders(input_ids, pattern):
    """The chapter's version: (B, T) bool, True inside every complete copy of `pattern`."""
    B, T = input_ids.shape
    N = len(pattern)
    found = torch.zeros(B, T, dtype=torch.bool)
    for start in range(T - N + 1):
        hit = (input_ids[:, start:start + N] == pattern).all(dim=1)
        found[hit, start:start + N] = True
    return found


def substitute(embeds, found, projected):
    """The chapter's version: projected (n_images, N, dim) into the marked rows, in order."""
    n_images, N, dim = projected.shape
    if int(found.sum()) != n_images * N:
        raise ValueError(f"{int(found.sum())} placeholder positions, but {n_images} image(s) of {N} tokens")
    out = embeds.clone()
    out[found] = projected.reshape(n_images * N, dim)
    return out


def tiny_vlm(num_image_tokens: int = 50, vision_width: int = 16, seed: int = 0) -> MiniMindVLM:
    """A one-layer VLM of width 32 whose picture is `num_image_tokens` copies of id 3."""
    config = VLMConfig(vocab_size=32, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vision_width=vision_width,
                       num_image_tokens=num_image_tokens, image_token_ids=[IMAGE_ID] * num_image_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MiniMindVLM(config).eval()


def error_of(call) -> str | None:
    """The message of the ValueError `call()` raises, or None when it raises none."""
    try:
        call()
    except ValueError as err:
        return str(err)
    return None


def exercise_1():
    """577 instead of 50 placeholders: the prompt is 527 tokens longer, and the text around the
    picture does not change. With the 22 text tokens this small tokenizer makes, 72 -> 599
    tokens: attention compares every pair of positions, so its cost grows (599 / 72)^2 = 69 times;
    the parts that work per position, 8.3 times. This is why VLMs with bigger encoders pool or
    merge their patch tokens.
    """
    texts = ["user\nWhat colour is the circle?", "assistant\nred", "user\nDescribe this picture briefly."]
    tokenizer = train_tokenizer(texts * 3, vocab_size=300)
    question = "What colour is the circle?"
    # One processor per encoder size; only its placeholder count matters here (no picture is processed).
    lengths = {n: len(MiniMindVProcessor(CLIPImageProcessorPil(), tokenizer, num_image_tokens=n).question_ids(question))
               for n in (50, 577)}
    text_tokens = lengths[50] - 50
    assert lengths[577] - lengths[50] == 527
    assert lengths[577] == text_tokens + 577
    growth = (lengths[577] / lengths[50]) ** 2
    print(f"prompt: {text_tokens} text tokens + 50 -> {lengths[50]}; + 577 -> {lengths[577]}; "
          f"attention cost x{growth:.0f}")
    return lengths


def exercise_2():
    """A count that does not match is refused, never silently misaligned.

    49 placeholders: the 50-id pattern occurs nowhere, so the prompt holds placeholders for 0
    images while 1 was given. Two prompts with placeholders and one picture: 2 images expected, 1
    given. The chapter's `substitute` refuses both too (it counts positions, not patterns: with 49
    it says 49 positions for 1 image of 50 tokens).
    """
    vlm = tiny_vlm(num_image_tokens=50)
    one_image = torch.randn(1, 50, 16, generator=torch.Generator().manual_seed(0))
    short = torch.tensor([[1, 5] + [IMAGE_ID] * 49 + [6, 2]])  # one placeholder missing
    pair = torch.tensor([[1, 5] + [IMAGE_ID] * 50 + [6, 2]] * 2)  # two prompts, two pictures expected
    messages = {}
    with torch.no_grad():
        for name, ids in (("49 placeholders", short), ("2 prompts, 1 picture", pair)):
            message = error_of(lambda: vlm.substitute_image_tokens(ids, vlm.tok_embeddings(ids), one_image))
            assert message is not None and "image" in message, name
            projected = vlm.vision_proj(one_image)
            counted = (ids == IMAGE_ID)  # the chapter's substitute, given every placeholder position
            assert error_of(lambda: substitute(vlm.tok_embeddings(ids), counted, projected)) is not None
            messages[name] = message
    for name, message in messages.items():
        print(f"{name}: ValueError: {message}")
    return messages


def exercise_3():
    """Only complete copies of the pattern count, and copies may touch.

    [5, 5, 6, 6, 5, 5, 6, 6]: two copies back to back, all 8 positions.
    [5, 5, 6, 5, 5, 6, 6, 9]: the first window is broken (5 5 6 5); only positions 3-6.
    [5, 6, 6, 9, 5, 5, 6, 9]: no complete copy at all: nothing.
    """
    pattern = torch.tensor([5, 5, 6, 6])
    rows = torch.tensor([[5, 5, 6, 6, 5, 5, 6, 6],
                         [5, 5, 6, 5, 5, 6, 6, 9],
                         [5, 6, 6, 9, 5, 5, 6, 9]])
    expected = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1],
                             [0, 0, 0, 1, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    found = placeholder_mask(rows, pattern)
    torch.testing.assert_close(found, expected)
    torch.testing.assert_close(find_placeholders(rows, pattern), expected)
    print(found.int())
    return found


def exercise_4():
    """Gradients after the substitution.

    The placeholder positions' embeddings were overwritten, so no gradient flows back into them:
    the input side of the <|image|> row learns nothing from a prompt with a picture. The
    projection, which wrote those rows, gets the gradient instead. (The row of <|image|> in the
    embedding matrix still gets a gradient, through the tied output head: the model learns not to
    predict <|image|>. That is the head's doing, not the input's.)
    """
    vlm = tiny_vlm(num_image_tokens=4).train()
    ids = torch.tensor([[1, 7, 8] + [IMAGE_ID] * 4 + [9, 10, 2, 11, 12, 2]])  # (1, 13)
    labels = ids.clone()
    labels[ids == IMAGE_ID] = IGNORE_INDEX
    image_tokens = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    embeds = vlm.tok_embeddings(ids)  # (1, 13, 32)
    embeds.retain_grad()
    after = vlm.substitute_image_tokens(ids, embeds, image_tokens)
    vlm(inputs_embeds=after, labels=labels, use_cache=False).loss.backward()
    at_placeholders = embeds.grad[0, ids[0] == IMAGE_ID].abs().max().item()
    elsewhere = embeds.grad[0, ids[0] != IMAGE_ID].abs().amax(-1)  # per text position
    assert at_placeholders == 0.0
    assert (elsewhere[:-1] > 0).all()  # the last position predicts nothing, so it may get none
    assert vlm.vision_proj.layers[0].weight.grad.abs().max() > 0
    projection = vlm.vision_proj.layers[0].weight.grad.abs().max()
    print(f"gradient at the placeholder positions: {at_placeholders}; at the text positions up to "
          f"{elsewhere.max():.1e}; projection weight gradient up to {projection:.1e}")
    return at_placeholders


if __name__ == "__main__":
    for n in range(1, 5):
        print(f"--- exercise {n}")
        globals()[f"exercise_{n}"]()
