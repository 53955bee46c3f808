"""The tiny CLIP's training examples, drawn from the shapes world, and the truths they carry.

Each example is a scene (1-3 objects, each a shape, colour, size and grid cell) drawn from
(run seed, example index) alone, so every rank and every resumed run sees the same ones:

- `scene_example`: its caption (every object's size, colour, shape and position) and *hard
  negatives*, the same caption with one thing changed (`hard_negative_scene`: a shape, shapes
  swapped between two objects, a colour, a size, a position);
- `object_patches`, `object_labels`, `patch_labels`: which of the 7x7 patches lie under each
  object, and the object's attributes for each such patch (the targets of the per-patch heads);
- `scene_counts`: how many objects of each shape, colour and size (the target of the count head).

Only the data: the tensors a training step reads are put together by `train.clip.training_batch`.
"""

from __future__ import annotations

import random

import torch

from . import shapes

# ----------------------------------------------------------------------------- attributes

# The attributes the auxiliary objective and the linear probe read (the hard negatives change
# them too). Position is among them because contrastive training alone wipes it out of the patch
# tokens (a probe read a patch's own index at 0.80 from a random encoder's tokens, at 0.33 from a
# tiny CLIP trained without it), and the VLM needs it to answer "where".
ATTRIBUTES = {"shape": shapes.SHAPES, "colour": shapes.COLOURS, "size": shapes.SIZES, "position": shapes.POSITIONS}


def content_key(scene: list[dict]) -> tuple:
    """What a caption can say about a scene (everything but the pixel offsets)."""
    return tuple(sorted((o["shape"], o["colour"], o["size"], o["position"]) for o in scene))


def _reading_order(scene: list[dict]) -> list[dict]:
    return sorted(scene, key=lambda o: shapes.POSITIONS.index(o["position"]))


def _other(value, choices, rng: random.Random):
    return rng.choice([c for c in choices if c != value])


def hard_negative_scene(scene: list[dict], kind: str, rng: random.Random) -> list[dict]:
    """A scene one change away from `scene`, so its caption is wrong for the picture.

    kind: "shape" (one object's shape), "bind" (two objects trade shapes), "colour", "size",
    "position" (one object moves to an empty cell). Where "bind" or "position" is impossible (all
    shapes equal, no empty cell) a shape changes instead.
    """
    scene = [dict(o) for o in scene]
    free = [p for p in shapes.POSITIONS if p not in {o["position"] for o in scene}]
    if kind == "position" and not free:
        kind = "shape"
    if kind == "bind":
        pairs = [(i, j) for i in range(len(scene)) for j in range(i + 1, len(scene)) if scene[i]["shape"] != scene[j]["shape"]]
        if pairs:
            i, j = rng.choice(pairs)
            scene[i]["shape"], scene[j]["shape"] = scene[j]["shape"], scene[i]["shape"]
            return scene
        kind = "shape"
    obj = rng.choice(scene)
    if kind == "position":
        obj["position"] = rng.choice(free)
        return _reading_order(scene)
    if kind not in ATTRIBUTES:
        raise ValueError(f"hard_negative_scene: unknown kind {kind!r}; expected bind or one of {tuple(ATTRIBUTES)}")
    obj[kind] = _other(obj[kind], ATTRIBUTES[kind], rng)
    return scene


# Kinds of hard negative, drawn without replacement for each picture. Shape is listed twice
# (drawn more often) because it is what a small encoder learns last.
NEGATIVE_KINDS = ("shape", "shape", "bind", "colour", "size", "position")


def scene_example(scene: list[dict], rng: random.Random, n_negatives: int) -> tuple[str, list[str]]:
    """(caption, hard-negative captions) for one scene; negatives use the caption's own template."""
    template_seed = rng.getrandbits(32)
    text = shapes.caption(scene, random.Random(template_seed))
    kinds = []
    while len(kinds) < n_negatives:  # n_negatives > 6 cycles through fresh draws
        kinds += rng.sample(NEGATIVE_KINDS, min(len(NEGATIVE_KINDS), n_negatives - len(kinds)))
    negatives = [shapes.caption(hard_negative_scene(scene, kind, rng), random.Random(template_seed)) for kind in kinds]
    return text, negatives


def object_patches(scene: list[dict], grid: int = 7, image_size: int = 224) -> torch.Tensor:
    """(9, grid*grid) float: row c marks the patches whose centre lies in the box of the object
    in grid cell c (all zero for an empty cell). Objects are wider than a patch, so every object
    covers at least one patch centre (1 to 4)."""
    patch = image_size // grid
    centres = torch.arange(grid) * patch + patch // 2  # (grid,) pixel centres of the patches
    masks = torch.zeros(len(shapes.POSITIONS), grid, grid)
    for obj in scene:
        x0, y0, x1, y1 = shapes.object_box(obj, image_size)
        rows = (centres >= y0) & (centres <= y1)
        cols = (centres >= x0) & (centres <= x1)
        masks[shapes.POSITIONS.index(obj["position"])] = (rows[:, None] & cols[None, :]).float()
    return masks.flatten(1)


def object_labels(scene: list[dict]) -> torch.Tensor:
    """(4, 9) int64: the shape, colour, size and position index of the object in each grid cell
    (ATTRIBUTES order), -1 if empty."""
    labels = torch.full((len(ATTRIBUTES), len(shapes.POSITIONS)), -1, dtype=torch.long)
    for obj in scene:
        cell = shapes.POSITIONS.index(obj["position"])
        for row, (attribute, values) in enumerate(ATTRIBUTES.items()):
            labels[row, cell] = values.index(obj[attribute])
    return labels


def patch_labels(masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each patch gets the labels of the object it lies under: masks (..., 9, 49) from
    `object_patches`, labels (..., 4, 9) from `object_labels` -> (..., 4, 49), -1 off the objects.
    (Objects sit in distinct cells, so a patch lies under at most one.)"""
    covered = masks.sum(-2) > 0  # (..., 49)
    cell = masks.argmax(-2)  # (..., 49): the cell whose object covers the patch (any, if none)
    per_patch = labels.gather(-1, cell.unsqueeze(-2).expand(*labels.shape[:-1], cell.shape[-1]))
    return per_patch.masked_fill(~covered.unsqueeze(-2), -1)


# What the CLS token must count (the auxiliary objective's second half): the objects of each shape,
# colour and size, and all objects. Attention averages, so a decoder reading patch tokens sees how
# much of the picture is red, not how many red objects there are; a count it can read is one the
# encoder wrote down.
COUNTED = tuple((a, v) for a in ("shape", "colour", "size") for v in ATTRIBUTES[a]) + (("all", None),)
MAX_COUNT = len(shapes.POSITIONS)  # counts 0..9, one object per grid cell at most


def scene_counts(scene: list[dict]) -> torch.Tensor:
    """(len(COUNTED),) int64: how many objects have each shape, colour and size, then how many in all."""
    return torch.tensor([len(scene) if a == "all" else sum(o[a] == v for o in scene) for a, v in COUNTED])


def training_scene(seed: int, index: int, held_out: frozenset = frozenset()) -> tuple[list[dict], random.Random]:
    """Training example `index` of run `seed`: the same scene whatever the number of ranks.

    Scenes whose exact picture is in `held_out` (scene_key) are skipped, so no evaluation
    picture is ever trained on.
    """
    rng = random.Random(f"tiny-clip/{seed}/train/{index}")
    while True:
        scene = shapes.random_scene(rng)
        if shapes.scene_key(scene) not in held_out:
            return scene, rng
