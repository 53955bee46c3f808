"""Chapter 8, exercises: worked solutions.

Each exercise is one function that computes its answer, checks it with an assert, and returns
it. Run them all with ``python notebooks/solutions/08_solutions.py``; ``tests/test_exercises.py``
runs them too. Nothing here trains: the answers come from arithmetic, a simulation, generated
captions and a small random model (seconds).
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import torch

from minimind_v.ablations import ABLATIONS, Ablation, standard_error, variant_recipe
from minimind_v.data.shapes import POSITIONS, caption, random_scene
from minimind_v.model.vlm import MiniMindVLM, VLMConfig
from minimind_v.recipe import QUICK, Recipe, stage_fingerprints


def exercise_1():
    """Two runs at 90% on n questions: the difference has standard error sqrt(2 * 0.9 * 0.1 / n).
    For 1 point to exceed twice that, n > 4 * 0.18 / 0.01**2 = 7200 questions: on the 1000 the
    book holds out, only differences of about 2.7 points or more count. A simulation of two runs
    that both answer 90% right agrees on the spread."""
    p, delta = 0.9, 0.01
    needed = math.ceil(4 * 2 * p * (1 - p) / delta**2)
    assert 2 * math.sqrt(2) * standard_error(p, needed) <= delta < 2 * math.sqrt(2) * standard_error(p, needed - 100)
    generator = torch.Generator().manual_seed(0)
    n, trials = 1000, 4000
    a = (torch.rand(trials, n, generator=generator) < p).float().mean(1)
    b = (torch.rand(trials, n, generator=generator) < p).float().mean(1)
    simulated = float((a - b).std())
    assert abs(simulated - math.sqrt(2) * standard_error(p, n)) < 0.001  # ~0.0134
    print(f"{needed} questions for 1 point at 90% to exceed 2 standard errors; at 1000 questions the "
          f"difference of two runs spreads by {simulated:.4f} (formula {math.sqrt(2) * standard_error(p, n):.4f})")
    return {"questions_needed": needed, "sd_of_difference_at_1000": simulated}


def exercise_2():
    """In reading order the objects come in grid order (row by row, left to right); what stays the
    same is everything else: the template, the words, the objects, because both orders draw the
    same random numbers."""
    scene = random_scene(random.Random(3), min_objects=3)
    phrase = lambda o: f"{o['size']} {o['colour']} {o['shape']}"  # noqa: E731
    by_hand = [phrase(o) for o in sorted(scene, key=lambda o: POSITIONS.index(o["position"]))]
    reading = caption(scene, random.Random(5), "reading")
    shuffled = caption(scene, random.Random(5), "random")
    assert sorted(by_hand, key=reading.index) == by_hand  # named in grid order
    assert sorted(reading.lower().replace(",", "").split()) == sorted(shuffled.lower().replace(",", "").split())
    print(f"reading order: {reading}\nrandom order:  {shuffled}")
    return reading, shuffled


def exercise_3():
    """All 50 vectors are equal: the CLS token, projected. What is left is what the CLS token holds
    (the tiny CLIP trains it to count objects of each shape, colour and size); where an object is
    is gone, because it lived in *which* patch token described it."""
    n, width = 50, 16
    config = VLMConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, max_position_embeddings=128,
                       vision_width=width, num_image_tokens=n, image_token_ids=[3] * n, vision_tokens="cls")
    with torch.random.fork_rng(devices=[]):  # the model's initial weights: leave the global generator alone
        torch.manual_seed(0)
        model = MiniMindVLM(config).eval()
    ids = torch.tensor([[5] + [3] * n + [6, 7]])
    seen = []
    handle = model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=ids, image_tokens=torch.randn(1, n, width, generator=torch.Generator().manual_seed(1)))
    handle.remove()
    picture = seen[0][0, 1:1 + n]
    assert torch.equal(picture, picture[:1].expand(n, -1))
    print(f"the decoder receives {n} copies of one vector for the picture (each of width {picture.shape[1]})")
    return picture.shape


def exercise_4():
    """Without caption samples mixed into SFT: only SFT and the evaluation change, so a pair costs
    one SFT run (the world, the CLIP, the text LM and pretraining are borrowed from the recipe's)."""
    base = replace(Recipe(), **QUICK)
    mine = Ablation("no_caption_mix", "captions mixed into SFT", "10%", "none", changes=dict(mix_captions=0.0))
    before, after = stage_fingerprints(base), stage_fingerprints(variant_recipe(base, mine))
    retrained = {stage for stage in before if before[stage]["fingerprint"] != after[stage]["fingerprint"]}
    assert retrained == {"sft", "eval"}
    assert mine.name not in {a.name for a in ABLATIONS}
    print(f"no caption mix retrains {sorted(retrained)}; the world, CLIP, text LM and pretraining are borrowed")
    return retrained


if __name__ == "__main__":
    for exercise in (exercise_1, exercise_2, exercise_3, exercise_4):
        print(exercise.__name__, exercise())
