"""Chapter 5, exercises: worked solutions.

Each exercise is one function that computes its answer, checks it with an assert, and returns
it. Run them all with ``python notebooks/solutions/05_solutions.py``; ``tests/test_exercises.py``
runs them too. Everything is built here, small and random: no run folder is needed.
"""

from __future__ import annotations

import math
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from minimind_v.config import PRESETS
from minimind_v.data import shapes
from minimind_v.data.datasets import Sample, collate
from minimind_v.data.features import ensure_cache
from minimind_v.model.vision import VisionEncoder
from minimind_v.testing import make_random_clip
from minimind_v.model.vlm import MiniMindVLM, VLMConfig
from minimind_v.tokenizer import IGNORE_INDEX, encode_chat, train_tokenizer
from minimind_v.train.common import set_trainable


def exercise_1():
    """Trainable parameters of the book's VLM.

    proj: one 128 x 128 matrix and a bias: 16,512. A tiny block: attention 4 x 128 x 128 = 65,536
    (4 key/value heads, so wk and wv are full size), SwiGLU 3 x 128 x 384 = 147,456, two norms
    256: 213,248. ends = 16,512 + 2 x 213,248 = 443,008. all: everything (the embedding too).
    """
    config = VLMConfig(vocab_size=500, vision_width=128, image_token_ids=[3] * 50, **PRESETS["tiny"])
    with torch.device("meta"):  # shapes only: counting needs no numbers
        vlm = MiniMindVLM(config)
    counts = {strategy: set_trainable(vlm, strategy)[0] for strategy in ("proj", "ends", "all")}
    total = sum(p.numel() for p in vlm.parameters())
    block = 4 * 128 * 128 + 3 * 128 * 384 + 2 * 128
    assert counts["proj"] == 128 * 128 + 128 == 16_512
    assert counts["ends"] == 16_512 + 2 * block == 443_008
    assert counts["all"] == total
    print("trainable parameters:", {k: f"{v:,}" for k, v in counts.items()}, f"of {total:,}")
    return counts


def exercise_2():
    """Feature-cache size: pictures x 50 tokens x width x 2 bytes (float16).

    ViT-B/32: 50 x 768 x 2 = 76,800 bytes a picture; 595,000 pictures: 45.7 GB (twice that in
    float32). The cache trades disk for the encoder's compute, paid once instead of every epoch.
    Tiny CLIP (width 128), 20,000 pictures: 50 x 128 x 2 x 20,000 = 256 MB.
    """
    per_picture = 50 * 768 * 2
    answers = {"ViT-B/32 per picture": per_picture, "595k pictures, GB": 595_000 * per_picture / 1e9,
               "tiny CLIP, 20k pictures, MB": 20_000 * 50 * 128 * 2 / 1e6}
    assert per_picture == 76_800 and round(answers["595k pictures, GB"], 1) == 45.7
    assert answers["tiny CLIP, 20k pictures, MB"] == 256
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        encoder = VisionEncoder.from_pretrained(make_random_clip(tmp / "clip", width=32, layers=1))
        (tmp / "images").mkdir()
        rng = random.Random(0)
        for i in range(3):
            shapes.render_scene(shapes.random_scene(rng)).save(tmp / "images" / f"{i}.png")
        with torch.random.fork_rng(devices=[]):  # its DataLoader draws a seed from the global generator
            cache = ensure_cache(encoder, tmp / "images", tmp / "cache", progress=False)
        files = list((tmp / "cache").glob("*.npy"))
        assert len(files) == 1, files
        stored = np.load(files[0], mmap_mode="r")
        assert stored.shape == (3, 50, 32) and stored.dtype == np.float16
        assert stored.nbytes == 3 * 50 * 32 * 2
        del stored, cache
    print({k: round(v, 1) for k, v in answers.items()})
    return answers


def exercise_3():
    """Loss tokens of a caption sample: the caption's tokens plus its closing </s>.

    Nothing else: the header, the request and the 50 placeholders are all IGNORE_INDEX. A batch
    counts the sum over its samples (`Batch.n_targets`, after the one-position shift, which
    drops nothing here: the first label of a sample is never an answer).
    """
    captions = ["A small red circle in the top left.",
                "There is a large blue square at the bottom and a small green cross."]
    texts = ["user\nDescribe this picture briefly.", *(f"assistant\n{c}" for c in captions)]
    tokenizer = train_tokenizer(texts * 3, vocab_size=300)
    samples, expected = [], []
    for i, caption in enumerate(captions):
        turns = [{"from": "human", "value": "<image>\nDescribe this picture briefly."},
                 {"from": "gpt", "value": caption}]
        ids, labels = encode_chat(tokenizer, turns, num_image_tokens=50)
        predicted = len(tokenizer(caption, add_special_tokens=False).input_ids) + 1  # + </s>
        assert sum(label != IGNORE_INDEX for label in labels) == predicted, (caption, labels)
        expected.append(predicted)
        samples.append(Sample(str(i), torch.tensor(ids), torch.tensor(labels), None))
    batch = collate(samples, pad_id=tokenizer.pad_token_id)
    assert batch.n_targets == sum(expected)
    print(f"loss tokens per caption: {expected}; in the batch: {batch.n_targets} "
          f"of {batch.input_ids.numel()} positions")
    return expected


def exercise_4():
    """Three objects in random order, and five templates: 3! x 5 = 30 captions of one picture,
    equally likely. Whatever the picture shows, choosing among them costs ln 30 = 3.4 nats per
    caption that no model can save: the floor under the caption loss (spread over its ~20 tokens).
    """
    scene = [dict(shape="circle", colour="red", size="small", position="top left", offset=[0, 0]),
             dict(shape="square", colour="blue", size="large", position="bottom", offset=[0, 0]),
             dict(shape="cross", colour="green", size="small", position="right", offset=[0, 0])]
    shapes.validate_scene(scene)
    written = {shapes.caption(scene, random.Random(seed)) for seed in range(3000)}
    predicted = math.factorial(3) * len(shapes.CAPTION_TEMPLATES)
    assert predicted == 30 and len(written) == predicted, len(written)
    print(f"{len(written)} different captions; ln {predicted} = {math.log(predicted):.2f} nats each; "
          f"e.g. {sorted(written)[0]!r}")
    return len(written)


def exercise_5():
    """--freeze proj: the optimiser only holds the projection, so only it moves; the decoder,
    embeddings included, is exactly as it was."""
    config = VLMConfig(vocab_size=40, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, vision_width=16,
                       num_image_tokens=4, image_token_ids=[3] * 4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vlm = MiniMindVLM(config).train()
    set_trainable(vlm, "proj")
    before = {name: p.detach().clone() for name, p in vlm.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[1, 7, 3, 3, 3, 3, 8, 2, 9, 10, 11, 2]])
    labels = torch.where(ids == 3, IGNORE_INDEX, ids)
    image_tokens = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    vlm(input_ids=ids, image_tokens=image_tokens, labels=labels, use_cache=False).loss.backward()
    optimizer.step()
    moved = sorted(name for name, p in vlm.named_parameters() if not torch.equal(p, before[name]))
    assert moved == ["vision_proj.layers.0.bias", "vision_proj.layers.0.weight"], moved
    print("moved:", moved)
    return moved


if __name__ == "__main__":
    for n in range(1, 6):
        print(f"--- exercise {n}")
        globals()[f"exercise_{n}"]()
