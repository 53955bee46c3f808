"""How well the tiny CLIP sees: held-out retrieval, and what a linear probe reads from its patch tokens.

* Retrieval (`retrieval_accuracy`): each held-out picture picks its caption
  among n (chance 1/n); a caption of the same scene content counts as right.
* The linear probe (`linear_probe`, `probe_trained_vs_random`): a logistic regression from the
  frozen patch tokens to each object's shape, colour, size and grid position, on pictures no run
  trained on, beside a randomly initialised encoder of the same size.

The held-out pairs (`load_held_out`) are the eval split of a shapes-world folder, given scenes, or
fresh ones from a seed no training run uses; training skips their pictures.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, CLIPVisionModel

from .data import shapes
from .data.clip_examples import ATTRIBUTES, content_key, object_patches
from .data.images import load_image
from .model.tiny_clip import make_image_processor, pixels_from_images, tokenize
from .model.vision import VisionEncoder

# ----------------------------------------------------------------------------- held-out pairs


@dataclass
class HeldOut:
    """Held-out (picture, caption) pairs for retrieval."""

    pixel_values: torch.Tensor  # (N, 3, 224, 224)
    captions: list[str]
    scenes: list[list[dict]]
    source: str

    @property
    def scene_keys(self) -> frozenset:
        return frozenset(shapes.scene_key(s) for s in self.scenes)


def load_held_out(data: str | Path | Sequence[list[dict]] | None = None, n: int | None = None, seed: int = 0) -> HeldOut:
    """Held-out pairs from a shapes-world folder's eval split, a list of scenes, or fresh scenes.

    data: a folder with eval_data.json + eval_data_images/ (each record's image and a caption of
    its "scene"; two-picture records are skipped), a list of scenes (rendered here), or None for `n` new scenes drawn from a
    seed no training run uses. Captions are drawn with a per-record seed, so they repeat.
    """
    if data is None:
        rng = random.Random(f"tiny-clip/{seed}/held-out")
        scenes = [shapes.random_scene(rng) for _ in range(n if n is not None else 512)]
        source = f"{len(scenes)} generated scenes (seed {seed})"
        images = [shapes.render_scene(s) for s in scenes]
    elif isinstance(data, (str, Path)):
        folder = Path(data)
        path = folder / "eval_data.json"
        if not path.is_file():
            raise FileNotFoundError(f"load_held_out: {path} not found; expected a shapes-world folder (python -m minimind_v.data.shapes)")
        records = json.loads(path.read_text(encoding="utf-8"))
        # A question about two pictures has no one caption to retrieve: it is left out.
        records = [r for r in records if not (isinstance(r, dict) and "scenes" in r)]
        if n is not None:
            records = records[:n]
        scenes, images = [], []
        for r in records:
            if "scene" not in r:
                raise ValueError(f"{path}: record {r.get('id')!r} has no 'scene'; retrieval needs shapes-world records")
            shapes.validate_scene(r["scene"], where=f"{path} record {r.get('id')!r} scene")
            scenes.append(r["scene"])
            images.append(load_image(folder / "eval_data_images" / r["image"]))
        source = f"{path} ({len(records)} records)"
    else:
        scenes = [list(s) for s in data][:n]
        for i, s in enumerate(scenes):
            shapes.validate_scene(s, where=f"held-out scene {i}")
        images = [shapes.render_scene(s) for s in scenes]
        source = f"{len(scenes)} given scenes"
    captions = [shapes.caption(s, random.Random(f"tiny-clip/held-out-caption/{i}")) for i, s in enumerate(scenes)]
    if all(im.size == (224, 224) for im in images):
        pixel_values = pixels_from_images(images)
    else:  # a world rendered at another size: CLIP's own resize and crop
        pixel_values = make_image_processor()(images=images, return_tensors="pt")["pixel_values"]
    return HeldOut(pixel_values, captions, scenes, source)


# ----------------------------------------------------------------------------- retrieval


def retrieval_top1(similarity: torch.Tensor, equivalent: torch.Tensor | None = None) -> float:
    """Image -> text top-1 accuracy of an (n images, n texts) similarity matrix whose pairs are (i, i).

    equivalent: optional (n, n) bool, True where text j describes image i just as well (the same
    scene content); picking such a text counts as correct.
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"retrieval_top1: expected a square similarity matrix, got {tuple(similarity.shape)}")
    pred = similarity.argmax(dim=1)  # (n,)
    rows = torch.arange(similarity.shape[0], device=similarity.device)
    correct = pred == rows
    if equivalent is not None:
        correct = correct | equivalent[rows, pred]
    return correct.float().mean().item()


@torch.no_grad()
def embed_held_out(clip: CLIPModel, tokenizer, held: HeldOut, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image and text embeddings (N, D) of the held-out pairs."""
    clip.eval()
    device = next(clip.parameters()).device
    images, texts = [], []
    for start in range(0, len(held.captions), batch_size):
        px = held.pixel_values[start : start + batch_size].to(device)
        enc = tokenize(tokenizer, held.captions[start : start + batch_size])
        images.append(F.normalize(clip.get_image_features(pixel_values=px).pooler_output, dim=-1))
        texts.append(F.normalize(clip.get_text_features(**{k: v.to(device) for k, v in enc.items()}).pooler_output, dim=-1))
    return torch.cat(images).cpu(), torch.cat(texts).cpu()


def retrieval_accuracy(clip: CLIPModel, tokenizer, held: HeldOut, n: int = 64) -> float:
    """Mean top-1 image -> text accuracy over consecutive batches of n held-out pairs.

    Only full batches count (every image chooses among exactly n captions; chance = 1/n).
    Two different pictures with the same content (only offsets differ) are equivalent.
    """
    if len(held.captions) < n:
        raise ValueError(f"retrieval needs at least n={n} held-out pairs, got {len(held.captions)} from {held.source}")
    image, text = embed_held_out(clip, tokenizer, held)
    keys = [content_key(s) for s in held.scenes]
    scores = []
    for start in range(0, len(keys) - n + 1, n):
        k = keys[start : start + n]
        equivalent = torch.tensor([[a == b for b in k] for a in k])
        scores.append(retrieval_top1(image[start : start + n] @ text[start : start + n].t(), equivalent))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- linear probe

PROBE_FEATURES = ("mean", "object", "centre")


def object_tokens(tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean patch token over each object's patches: tokens (B, 49, W), masks (B, K, 49) -> (B, K, W)."""
    weights = masks / masks.sum(-1, keepdim=True).clamp(min=1)  # (B, K, 49), rows sum to 1 (or 0)
    return weights @ tokens


def _probe_objects(n: int, seed: int, features: str) -> list[list[dict]]:
    rng = random.Random(f"tiny-clip/probe/{seed}/{features}")
    if features == "mean":  # one object per picture
        return [shapes.random_scene(rng, 1, 1) for _ in range(n)]
    scenes, count = [], 0  # 1-3 objects per picture; each object is one probe example
    while count < n:
        scenes.append(shapes.random_scene(rng, 1, 3))
        count += len(scenes[-1])
    return scenes


@torch.no_grad()
def _probe_features(encoder, scenes, features: str, batch_size: int = 128) -> tuple[torch.Tensor, list[dict]]:
    """Frozen patch tokens -> one feature vector per object: (n_objects, width)."""
    tokens = []
    for start in range(0, len(scenes), batch_size):
        px = pixels_from_images([shapes.render_scene(s) for s in scenes[start : start + batch_size]])
        tokens.append(encoder(px).float().cpu()[:, 1:])  # (b, 50, W) -> (b, 49, W): CLS dropped
    tokens = torch.cat(tokens)
    if features == "mean":
        return tokens.mean(dim=1), [s[0] for s in scenes]  # mean of the 49 patch tokens
    image_index, masks, objects = [], [], []
    for i, scene in enumerate(scenes):
        cells = object_patches(scene)  # (9, 49)
        for obj in scene:
            mask = cells[shapes.POSITIONS.index(obj["position"])]
            if features == "centre":  # only the patch under the centre of the object's box
                x0, y0, x1, y1 = shapes.object_box(obj)
                grid, patch = 7, 224 // 7
                mask = torch.zeros(grid * grid)
                mask[((y0 + y1) // 2 // patch) * grid + (x0 + x1) // 2 // patch] = 1.0
            image_index.append(i)
            masks.append(mask)
            objects.append(obj)
    per_object = object_tokens(tokens[image_index], torch.stack(masks)[:, None])  # (n, 1, W)
    return per_object[:, 0], objects


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float = 1e-3) -> nn.Linear:
    """Multinomial logistic regression (full-batch L-BFGS) on standardised features."""
    torch.manual_seed(0)
    probe = nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def linear_probe(encoder, n_train: int = 2000, n_test: int = 1000, seed: int = 0, features: str = "mean") -> dict[str, float]:
    """Test accuracy of a linear classifier from frozen patch tokens to each object's attributes.

    encoder: pixel_values (B, 3, 224, 224) -> tokens (B, 50, W), e.g. a VisionEncoder.
    features: "mean"   - one-object pictures; the mean of all 49 patch tokens;
              "object" - 1-3 object pictures; the mean of the patch tokens under each object's box;
              "centre" - 1-3 object pictures; the single patch token under each object's centre.
    Returns {"shape", "colour", "size", "position": accuracy} on n_test fresh objects; chance is
    1/4, 1/5, 1/2, 1/9.
    """
    if features not in PROBE_FEATURES:
        raise ValueError(f"linear_probe: features must be one of {PROBE_FEATURES}, got {features!r}")
    with torch.random.fork_rng(devices=[]):
        splits = {}
        for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1_000_003)):
            splits[split] = _probe_features(encoder, _probe_objects(n, s, features), features)
        x_train, x_test = splits["train"][0], splits["test"][0]
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
        result = {}
        for attribute, values in ATTRIBUTES.items():
            y_train = torch.tensor([values.index(o[attribute]) for o in splits["train"][1]])
            y_test = torch.tensor([values.index(o[attribute]) for o in splits["test"][1]])
            probe = fit_linear_probe(x_train, y_train, len(values))
            with torch.no_grad():
                result[attribute] = (probe(x_test).argmax(1) == y_test).float().mean().item()
    return result


def random_encoder_like(encoder, seed: int = 0):
    """A VisionEncoder with the same architecture and preprocessing but fresh random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(encoder.model.config)
    return VisionEncoder(model, encoder.processor, name_or_path=f"random ({encoder.name_or_path})")


def probe_trained_vs_random(model_folder, n_train: int = 2000, n_test: int = 1000, seed: int = 0) -> dict:
    """{"trained"|"random": {"mean"|"object"|"centre": {attribute: accuracy}}} for a saved tiny CLIP."""
    trained = VisionEncoder.from_pretrained(model_folder)
    encoders = {"trained": trained, "random": random_encoder_like(trained, seed)}
    return {
        name: {f: linear_probe(enc, n_train, n_test, seed, f) for f in PROBE_FEATURES} for name, enc in encoders.items()
    }


def describe_shape_probe(probe: dict) -> str:
    """One line for `probe_trained_vs_random`'s result: the shape accuracy, trained/random, per feature."""
    return "shape probe trained/random " + ", ".join(
        f"{f} {probe['trained'][f]['shape']:.2f}/{probe['random'][f]['shape']:.2f}" for f in PROBE_FEATURES)


# ----------------------------------------------------------------------------- the whole scene

# Every cell of the 3x3 grid is empty (0) or holds one shape in one colour (1 + shape * 5 + colour).
CELL_CLASSES = 1 + len(shapes.SHAPES) * len(shapes.COLOURS)
SIZE_CLASSES = 1 + len(shapes.SIZES)  # empty, small, large


def scene_labels(scenes: Sequence[list[dict]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 9) cell contents and (N, 9) sizes of each scene, as `CELL_CLASSES` / `SIZE_CLASSES` say."""
    content = torch.zeros(len(scenes), len(shapes.POSITIONS), dtype=torch.long)
    size = torch.zeros_like(content)
    for i, scene in enumerate(scenes):
        for o in scene:
            cell = shapes.POSITIONS.index(o["position"])
            content[i, cell] = 1 + shapes.SHAPES.index(o["shape"]) * len(shapes.COLOURS) + shapes.COLOURS.index(o["colour"])
            size[i, cell] = 1 + shapes.SIZES.index(o["size"])
    return content, size


def _fit_cell_probe(x: torch.Tensor, labels: torch.Tensor, classes: Sequence[int], steps: int,
                    seed: int):
    """One linear map from each row of ``x`` (N, D) to every cell's label under each head:
    ``labels`` (N, 9, heads), head h with ``classes[h]`` classes; AdamW, ``steps`` minibatches of
    256 rows, the sum of the heads' cross-entropies. Returns ``read``: rows -> (n, 9, heads) labels."""
    n, cells = x.shape[0], labels.shape[1]
    mean, std = x.mean(0), x.std(0) + 1e-5
    ends = np.cumsum([0, *classes]).tolist()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Linear(x.shape[1], cells * ends[-1])
        opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.05)

        def logits(rows: torch.Tensor) -> list[torch.Tensor]:  # per head (n, 9, classes)
            out = probe((rows - mean) / std)
            return [out[:, cells * a : cells * b].reshape(len(rows), cells, b - a) for a, b in zip(ends, ends[1:])]

        batches = [rows for _ in range(-(-steps * 256 // n)) for rows in torch.randperm(n).split(256)]
        for rows in batches[:steps]:
            loss = sum(F.cross_entropy(head.reshape(-1, k), labels[rows, :, h].reshape(-1))
                       for h, (head, k) in enumerate(zip(logits(x[rows]), classes)))
            opt.zero_grad()
            loss.backward()
            opt.step()

    def read(rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([head.argmax(-1) for head in logits(rows.reshape(len(rows), -1).float())], -1)

    return read


def scene_probe(tokens: torch.Tensor, scenes: Sequence[list[dict]], n_test: int, steps: int = 1200,
                seed: int = 0) -> dict[str, float]:
    """Can one linear map read the whole scene from the frozen tokens (N, T, W)?

    One linear layer from all T*W numbers of a picture to every grid cell's content (empty, or
    shape and colour) and size, fitted on the first N - n_test pictures (AdamW, ``steps``
    minibatches of 256) and scored on the last n_test. Returns {"cells": fraction of cells read
    right (content and size), "objects": of occupied cells, "scenes": of pictures with all nine
    cells right}. A VLM that answers worse than this reads less than its eyes give it."""
    n = len(scenes)
    if not 0 < n_test < n:
        raise ValueError(f"scene_probe: n_test must be between 1 and {n - 1} for {n} pictures, got {n_test}")
    if tokens.shape[0] != n:
        raise ValueError(f"scene_probe: {tokens.shape[0]} token rows for {n} scenes")
    labels = torch.stack(scene_labels(scenes), -1)  # (N, 9, 2): content, size
    x = tokens.reshape(n, -1).float()
    n_train = n - n_test
    read = _fit_cell_probe(x[:n_train], labels[:n_train], (CELL_CLASSES, SIZE_CLASSES), steps, seed)
    right = (read(x[n_train:]) == labels[n_train:]).all(-1)  # (n_test, 9)
    occupied = labels[n_train:, :, 0] > 0
    return {"cells": right.float().mean().item(), "objects": right[occupied].float().mean().item(),
            "scenes": right.all(1).float().mean().item()}


def attribute_labels(scenes: Sequence[list[dict]]) -> torch.Tensor:
    """(N, 9, 3): each cell's shape, colour and size, each 0 for an empty cell and 1 + the value's
    index otherwise (one label per attribute, so that a pair no picture showed can still be read)."""
    labels = torch.zeros(len(scenes), len(shapes.POSITIONS), 3, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for o in scene:
            labels[i, shapes.POSITIONS.index(o["position"])] = torch.tensor(
                [1 + values.index(o[kind]) for kind, values in
                 (("shape", shapes.SHAPES), ("colour", shapes.COLOURS), ("size", shapes.SIZES))])
    return labels


ATTRIBUTE_CLASSES = (1 + len(shapes.SHAPES), 1 + len(shapes.COLOURS), 1 + len(shapes.SIZES))


def pair_probe(train_tokens: torch.Tensor, train_scenes: Sequence[list[dict]], test_tokens: torch.Tensor,
               test_scenes: Sequence[list[dict]], held_out_pairs, steps: int = 1200, seed: int = 0) -> dict:
    """Do the eyes see a colour-shape pair they were never trained on?

    One linear map from a picture's tokens to every cell's shape, colour and size (each its own
    label: `attribute_labels`), fitted on ``train_*`` and scored on the objects of ``test_*``.
    Returns {"seen": fraction of test objects whose (colour, shape) is not in ``held_out_pairs``
    read right (all three attributes), "unseen": of those whose pair is, "n_seen", "n_unseen"}."""
    if train_tokens.shape[0] != len(train_scenes) or test_tokens.shape[0] != len(test_scenes):
        raise ValueError(f"pair_probe: {train_tokens.shape[0]} and {test_tokens.shape[0]} token rows for "
                         f"{len(train_scenes)} and {len(test_scenes)} scenes")
    read = _fit_cell_probe(train_tokens.reshape(len(train_scenes), -1).float(), attribute_labels(train_scenes),
                           ATTRIBUTE_CLASSES, steps, seed)
    labels = attribute_labels(test_scenes)
    right = (read(test_tokens) == labels).all(-1)  # (n, 9)
    occupied = labels[..., 0] > 0
    held = torch.zeros_like(occupied)
    for colour, shape in held_out_pairs:  # cells holding that pair, as attribute_labels codes it
        held |= (labels[..., 0] == 1 + shapes.SHAPES.index(shape)) & (labels[..., 1] == 1 + shapes.COLOURS.index(colour))
    seen, unseen = right[occupied & ~held], right[held]
    return {"seen": seen.float().mean().item() if len(seen) else float("nan"),
            "unseen": unseen.float().mean().item() if len(unseen) else float("nan"),
            "n_seen": len(seen), "n_unseen": len(unseen)}


def sft_pictures_of_run(run: str | Path):
    """A trained run's world folder, its frozen tiny CLIP, and its one-picture SFT records with
    their tokens (N, 50, W) from the feature cache: what the SFT stage trained on."""
    from .data.features import FeatureCache
    from .data.records import read_records
    from .data.shapes import stored_image_name
    from .recipe import stage_dir

    world = stage_dir(run, "world")
    encoder = VisionEncoder.from_pretrained(stage_dir(run, "sft") / "vision_encoder")
    cache = FeatureCache.open(world / "feature_cache" / "sft_images", encoder)
    records = [r for r in read_records(world / "sft_data.json") if isinstance(r["image"], str)]
    tokens = cache.get([stored_image_name("sft_images", r["image"]) for r in records])
    return world, encoder, records, tokens


def scene_probe_of_run(run: str | Path) -> dict[str, float]:
    """`scene_probe` on a trained run's SFT pictures (the last fifth held out), read from its
    feature cache: the tokens the SFT stage trained on, from the run's frozen tiny CLIP."""
    _, _, records, tokens = sft_pictures_of_run(run)
    return scene_probe(tokens, [r["scene"] for r in records], n_test=max(1, len(records) // 5))


def pair_probe_of_run(run: str | Path) -> dict:
    """`pair_probe` of a trained run: fitted on its SFT pictures (from the feature cache: no
    held-out pair in any of them), scored on its evaluation pictures, where half show one."""
    from .data.records import read_records

    world, encoder, records, tokens = sft_pictures_of_run(run)
    pictures = {r["image"]: r["scene"] for r in read_records(world / "eval_data.json") if isinstance(r["image"], str)}
    held_out = json.loads((world / "world.json").read_text())["config"]["held_out_pairs"]
    with torch.no_grad():
        test_tokens = encoder.encode_images([world / "eval_data_images" / name for name in pictures])
    return pair_probe(tokens, [r["scene"] for r in records], test_tokens, list(pictures.values()), held_out)
