"""Chapter 1, exercises: worked solutions.

Each exercise is one function that computes its answer, checks it with an assert, and returns
it. Run them all with ``python notebooks/solutions/01_solutions.py``; ``tests/test_exercises.py``
runs them too. Everything is built here, small and random: no run folder is needed.
"""

from __future__ import annotations

import math
import tempfile

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from minimind_v.model.vision import VisionEncoder
from minimind_v.testing import make_random_clip
from minimind_v.model.tiny_clip import contrastive_loss


def random_tower(image_size: int, patch_size: int, width: int = 32, seed: int = 0) -> CLIPVisionModel:
    """A one-layer CLIP vision tower with random weights and the given geometry."""
    config = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=width,
                              intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModel(config).eval()


def patch_embedding(pixel_values, weight, patch_size):
    """The chapter's version: (B, 3, S, S) -> (B, (S/P)^2, width)."""
    B, C, S, _ = pixel_values.shape
    g = S // patch_size
    patches = (pixel_values.reshape(B, C, g, patch_size, g, patch_size)
               .permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * patch_size * patch_size))
    return patches @ weight.reshape(len(weight), -1).T


def clip_loss(image_embeds, text_embeds, scale, negative_embeds=None):
    """The chapter's clip_loss, extended with hard negatives (exercise 4)."""
    texts = text_embeds if negative_embeds is None else torch.cat([text_embeds, negative_embeds])  # (B+M, D)
    logits_image = scale * image_embeds @ texts.T  # (B, B+M): the negatives are extra wrong columns
    logits_text = scale * text_embeds @ image_embeds.T  # (B, B): a caption still chooses among the B pictures
    targets = torch.arange(len(image_embeds))
    return (F.cross_entropy(logits_image, targets) + F.cross_entropy(logits_text, targets)) / 2


def exercise_1():
    """Tokens per picture: 1 + (S / P)^2.

    ViT-L/14 at 336 px: 336 / 14 = 24 patches per side, 24 x 24 + 1 = 577 tokens, 11.5 times the
    50 of ViT-B/32; a VLM's prompt grows by as much. ViT-B/16 at 224 px: 14 x 14 + 1 = 197.
    """
    answers = {}
    for name, size, patch in (("ViT-B/32 @ 224", 224, 32), ("ViT-B/16 @ 224", 224, 16), ("ViT-L/14 @ 336", 336, 14)):
        predicted = 1 + (size // patch) ** 2
        with torch.no_grad():
            tokens = random_tower(size, patch)(pixel_values=torch.zeros(1, 3, size, size)).last_hidden_state
        assert tokens.shape[1] == predicted, (name, tuple(tokens.shape))
        answers[name] = predicted
    assert answers == {"ViT-B/32 @ 224": 50, "ViT-B/16 @ 224": 197, "ViT-L/14 @ 336": 577}
    # The package's encoder says the same (num_tokens), from a saved random CLIP of that geometry.
    with tempfile.TemporaryDirectory() as folder:
        folder = make_random_clip(folder, image_size=336, patch_size=14, width=32, layers=1)
        encoder = VisionEncoder.from_pretrained(folder)
        assert (encoder.grid, encoder.num_tokens) == (24, 577)
    print("tokens per picture:", answers)
    return answers


def exercise_2():
    """The patch embedding is local; the transformer is not.

    Patch (row 2, column 5) is patch 2 * 7 + 5 = 19 in reading order (0-based), token 20 counting
    CLS. Only that row of the patch embedding changes. After one attention layer every token has
    looked at every other, so all 50 output tokens change.
    """
    tower = random_tower(224, 32, seed=1)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 224, 224, generator=generator)
    painted = pixels.clone()
    white = (1 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)  # pixel 1.0, normalised as CLIP does
    painted[:, :, 2 * 32:3 * 32, 5 * 32:6 * 32] = white[:, None, None]  # rows 64-95, columns 160-191
    weight = tower.embeddings.patch_embedding.weight
    with torch.no_grad():
        before, after = patch_embedding(pixels, weight, 32), patch_embedding(painted, weight, 32)
        out_before = tower(pixel_values=pixels).last_hidden_state
        out_after = tower(pixel_values=painted).last_hidden_state
    changed_patches = ((after - before).abs().amax(-1) > 0)[0].nonzero().flatten().tolist()
    changed_tokens = int(((out_after - out_before).abs().amax(-1) > 1e-6).sum())
    assert changed_patches == [2 * 7 + 5]
    assert changed_tokens == 50
    print(f"patch embedding rows changed: {changed_patches} (token {changed_patches[0] + 1} with CLS); "
          f"encoder output tokens changed: {changed_tokens} of 50")
    return changed_patches, changed_tokens


def exercise_3():
    """Two limits of the contrastive loss.

    Matched orthogonal pairs: each row has s on the diagonal and 0 elsewhere, so the loss is
    -log(e^s / (e^s + B - 1)) = log(1 + (B - 1) e^-s), in both directions. At s = 100 (CLIP's
    largest scale) that is ~0; at s = 1 it is still log(1 + 7/e) = 1.27 for B = 8: a low
    temperature cannot make confident choices even from perfect vectors.
    Every vector the same: all logits equal, the loss is ln B whatever s.
    """
    B, D = 8, 16
    eye = torch.eye(B, D)  # B orthogonal unit vectors
    results = {}
    for s in (1.0, 10.0, 100.0):
        formula = math.log(1 + (B - 1) * math.exp(-s))
        package = contrastive_loss(eye, eye, torch.tensor(s)).item()
        assert math.isclose(package, formula, rel_tol=1e-4, abs_tol=1e-6), (s, package, formula)
        results[s] = formula
    same = F.normalize(torch.ones(B, D), dim=-1)
    for s in (1.0, 10.0, 100.0):
        assert math.isclose(contrastive_loss(same, same, torch.tensor(s)).item(), math.log(B), rel_tol=1e-5)
    print("matched, orthogonal:", {s: round(v, 4) for s, v in results.items()},
          f"; all alike: ln {B} = {math.log(B):.4f}")
    return results


def exercise_4():
    """Hard negatives are extra columns of the picture -> caption table (see clip_loss above)."""
    generator = torch.Generator().manual_seed(0)
    B, M, D = 6, 4, 16
    image, text, negatives = (F.normalize(torch.randn(n, D, generator=generator), dim=-1) for n in (B, B, M))
    scale = torch.tensor(20.0)
    ours = clip_loss(image, text, scale, negatives)
    torch.testing.assert_close(ours, contrastive_loss(image, text, scale, negative_embeds=negatives))
    # More wrong answers to choose from can only raise the loss.
    assert ours > clip_loss(image, text, scale)
    print(f"with {M} hard negatives: {ours:.4f}; without: {clip_loss(image, text, scale):.4f}")
    return ours.item()


if __name__ == "__main__":
    for n in range(1, 5):
        print(f"--- exercise {n}")
        globals()[f"exercise_{n}"]()
