"""A tiny CLIP, trained contrastively on the shapes world: the book's offline vision encoder.

The real MiniMind-V looks through OpenAI's CLIP ViT-B/32. Offline we train a miniature with the
same geometry (224 px images, 32 px patches -> 7x7 patches + CLS = 50 tokens) but a narrow,
shallow tower, on pictures drawn on the fly by `minimind_v.data.shapes`:

    scene -> render_scene -> pixels (B, 3, 224, 224) -> vision tower -> CLS -> image embedding
    scene -> caption      -> word ids (B, T)         -> text tower   -> EOS -> text embedding

and the InfoNCE loss pulls each picture towards its own caption and away from the others.

What the VLM later reads are the *patch tokens*, not the CLS embedding, and a tiny CLIP can
match captions by colour and size while its patch tokens forget shape. Three things push shape
into the tokens:

- every caption names every object's size, colour, shape and position;
- each picture also meets *hard negatives*: its own caption with one thing changed (a shape,
  shapes swapped between two objects, a colour, a size, a position);
- an auxiliary objective: every patch token under an object must predict that object's shape,
  colour, size and grid position, and the CLS token must count the objects of each shape, colour
  and size (linear heads, used in training only). The VLM then finds the whole object in any one
  of its tokens, and the counts in one place. The shapes world knows the truth of every picture;
  using it lets a ViT trained from scratch for a few minutes learn what a real CLIP learns from
  400 million pairs.

`linear_probe` checks the result: how well a linear classifier reads each object's attributes
from the frozen patch tokens, compared with a randomly initialised encoder of the same size.

Run alone or under DDP (the embeddings of all ranks are gathered, so the loss sees the whole
global batch, exactly as one process would):

    python -m minimind_v.train.clip --data DIR --out DIR
    torchrun --standalone --nproc_per_node 2 -m minimind_v.train.clip --data DIR --out DIR

The output folder is a regular CLIPModel checkpoint with its tokenizer and image processor, so
`VisionEncoder.from_pretrained(out)` (and `CLIPModel.from_pretrained(out)`) open it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel, PreTrainedTokenizerFast
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ..data import shapes
from ..data.images import load_image
from ..model.vision import VisionEncoder, quiet_transformers
from ..runfiles import atomic_write_text, mark_complete
from . import distributed as D
from . import trainer as T
from .common import FLAG_HELP, checked, path_setting
from .trainer import LIMITS, value_problem

# ----------------------------------------------------------------------------- tokenizer

# Fixed ids. CLIPTextModel pools the hidden state at the first eos_token_id in each row, EXCEPT
# when eos_token_id == 2, where it falls back to a legacy rule (the position of the largest id)
# kept for old OpenAI checkpoints. So EOS is deliberately not 2.
PAD_TOKEN, BOS_TOKEN, UNK_TOKEN, EOS_TOKEN = "[PAD]", "[BOS]", "[UNK]", "[EOS]"
PAD_ID, BOS_ID, UNK_ID, EOS_ID = 0, 1, 2, 3
MAX_TEXT_TOKENS = 64  # the longest caption (3 objects) is ~40 tokens with BOS/EOS


def shapes_vocabulary() -> list[str]:
    """Every word and punctuation mark a shapes-world caption or question can contain, sorted.

    Taken from the generator itself (captions and questions of many random scenes, plus the
    attribute lists), so the vocabulary follows the generator if its wording changes.
    """
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    texts = list(shapes.SHAPES + shapes.COLOURS + shapes.SIZES + shapes.POSITIONS + shapes.NUMBER_WORDS)
    texts += list(shapes.PLURAL_SHAPES.values()) + list(shapes.CAPTION_REQUESTS)
    rng = random.Random("shapes-vocabulary")
    for _ in range(2000):
        scene = shapes.random_scene(rng)
        texts.append(shapes.caption(scene, rng))
        texts += [q for q, _, _ in shapes.questions(scene, rng)]
    words = {w for text in texts for w, _ in split.pre_tokenize_str(text.lower())}
    return sorted(words)


def build_tokenizer(words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: lowercase, split on spaces and punctuation, [BOS] words [EOS].

    ids: [PAD]=0, [BOS]=1, [UNK]=2, [EOS]=3, then `words` (default: `shapes_vocabulary()`).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = list(words if words is not None else shapes_vocabulary())
    specials = [PAD_TOKEN, BOS_TOKEN, UNK_TOKEN, EOS_TOKEN]
    if len(set(words)) != len(words) or set(words) & set(specials):
        raise ValueError("build_tokenizer: words must be distinct and must not contain the special tokens")
    vocab = {token: i for i, token in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}", special_tokens=[(BOS_TOKEN, BOS_ID), (EOS_TOKEN, EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN, model_max_length=MAX_TEXT_TOKENS,
    )


def tokenize(tokenizer, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """texts -> input_ids, attention_mask (N, T), padded to the longest, BOS ... EOS in every row."""
    enc = tokenizer(list(texts), padding=True, truncation=False, return_tensors="pt")
    if enc["input_ids"].shape[1] > MAX_TEXT_TOKENS:
        raise ValueError(f"a caption has {enc['input_ids'].shape[1]} tokens, more than {MAX_TEXT_TOKENS}")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# ----------------------------------------------------------------------------- model


@dataclass
class TinyClipConfig:
    """The size of the tiny CLIP. Geometry (224 px, patch 32 -> 50 tokens) matches ViT-B/32."""

    vision_width: int = 128
    vision_layers: int = 2
    vision_heads: int = 2
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    projection_dim: int = 128
    image_size: int = 224
    patch_size: int = 32


def make_clip_config(cfg: TinyClipConfig, vocab_size: int) -> CLIPConfig:
    vision = dict(
        hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size,
    )
    text = dict(
        vocab_size=vocab_size, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=MAX_TEXT_TOKENS,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,  # EOS != 2: pool at the EOS token
    )
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=cfg.projection_dim)


def sincos_positions_2d(grid: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes (as in MAE): (grid*grid, width), row-major, values in [-1, 1].

    Half the channels encode the row, half the column, each at width/4 frequencies.
    """
    if width % 4:
        raise ValueError(f"sincos_positions_2d: width must be a multiple of 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))  # (W/4,)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (grid, grid) each

    def encode(pos):  # (grid*grid,) -> (grid*grid, W/2)
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


@torch.no_grad()
def init_vision_embeddings(clip: CLIPModel) -> None:
    """Re-initialise the vision embeddings so that position is visible from the first step.

    transformers' CLIP init draws patch weights and position embeddings both with std 0.02, so a
    32x32x3 patch maps to a vector ~50x longer than its position code (a trained run showed ~600x)
    and the pre-layernorm all but erases where the patch was. Instead: fan-in scaled patch weights
    (patch vectors of about pixel size) and 2-D sine-cosine position codes of comparable size
    (CLS position 0). All stay trainable.
    """
    embeddings = clip.vision_model.embeddings
    conv = embeddings.patch_embedding  # (W, 3, P, P)
    nn.init.normal_(conv.weight, std=conv.weight[0].numel() ** -0.5)
    grid = clip.config.vision_config.image_size // clip.config.vision_config.patch_size
    codes = sincos_positions_2d(grid, embeddings.position_embedding.weight.shape[1])  # (grid^2, W)
    embeddings.position_embedding.weight.zero_()
    embeddings.position_embedding.weight[1:] = codes


def make_image_processor(image_size: int = 224) -> CLIPImageProcessorPil:
    """CLIP's preprocessing at `image_size`: resize shortest side, centre crop, scale, normalise."""
    return CLIPImageProcessorPil(
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_resize=True, size={"shortest_edge": image_size}, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size}, do_rescale=True, do_normalize=True,
        do_convert_rgb=True,
    )


_MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


def pixels_from_images(images: Sequence[Image.Image], image_size: int = 224) -> torch.Tensor:
    """RGB images already image_size x image_size -> pixel_values (B, 3, S, S).

    The same numbers `make_image_processor()` gives (resizing to the same size is the identity),
    without its per-image overhead: one stack, one normalisation.
    """
    arrays = [np.asarray(im) for im in images]
    for i, a in enumerate(arrays):
        if a.shape != (image_size, image_size, 3):
            raise ValueError(f"pixels_from_images: image {i} has shape {a.shape}, expected ({image_size}, {image_size}, 3)")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S) in [0, 1]
    return (x - _MEAN) / _STD


# ----------------------------------------------------------------------------- data

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


def object_tokens(tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean patch token over each object's patches: tokens (B, 49, W), masks (B, K, 49) -> (B, K, W)."""
    weights = masks / masks.sum(-1, keepdim=True).clamp(min=1)  # (B, K, 49), rows sum to 1 (or 0)
    return weights @ tokens


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


def training_batch(tokenizer, seed: int, indices: Sequence[int], n_negatives: int, held_out: frozenset = frozenset()) -> dict:
    """Examples `indices` -> pixel_values (b, 3, 224, 224), input_ids/attention_mask (b*(1+K), T),
    patch_labels (b, 4, 49) (each patch's object's attributes, -1 off the objects) and counts
    (b, len(COUNTED)) (`scene_counts`), the targets of the auxiliary objective.

    Text rows: the b captions first, then the b*K hard negatives (example-major).
    """
    images, texts, negatives, labels, counts = [], [], [], [], []
    for index in indices:
        scene, rng = training_scene(seed, int(index), held_out)
        text, negs = scene_example(scene, rng, n_negatives)
        images.append(shapes.render_scene(scene))
        texts.append(text)
        negatives += negs
        labels.append(patch_labels(object_patches(scene), object_labels(scene)))
        counts.append(scene_counts(scene))
    batch = tokenize(tokenizer, texts + negatives)
    batch["pixel_values"] = pixels_from_images(images)
    batch["patch_labels"] = torch.stack(labels)  # (b, 4, 49)
    batch["counts"] = torch.stack(counts)  # (b, len(COUNTED))
    return batch


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
    its "scene"), a list of scenes (rendered here), or None for `n` new scenes drawn from a
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


# ----------------------------------------------------------------------------- objectives


class ContrastiveCLIP(nn.Module):
    """CLIPModel (+ object and count heads) -> unit image and text embeddings, logit scale,
    per-patch object logits, CLS count logits.

    One forward so that DDP sees every parameter used in the call it wraps. The two heads are
    training scaffolding for the auxiliary objective (`object_loss`, `count_loss`); they are not saved.
    """

    def __init__(self, clip: CLIPModel):
        super().__init__()
        self.clip = clip
        width = clip.config.vision_config.hidden_size
        self.object_head = nn.Linear(width, sum(len(v) for v in ATTRIBUTES.values()))
        self.count_head = nn.Linear(width, len(COUNTED) * (MAX_COUNT + 1))

    def forward(self, pixel_values, input_ids, attention_mask):
        vision = self.clip.vision_model(pixel_values=pixel_values)
        image = self.clip.visual_projection(vision.pooler_output)  # (B, proj), from the CLS token
        text = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output  # (N, proj)
        # Patch tokens as the VLM will read them: last hidden state, CLS dropped. (B, 49, W) -> (B, 49, 4+5+2+9)
        object_logits = self.object_head(vision.last_hidden_state[:, 1:])
        # The CLS token as the VLM reads it (before CLIP's final norm): (B, W) -> (B, 12, 10)
        count_logits = self.count_head(vision.last_hidden_state[:, 0]).unflatten(-1, (len(COUNTED), MAX_COUNT + 1))
        return (F.normalize(image, dim=-1), F.normalize(text, dim=-1), self.clip.logit_scale.exp(),
                object_logits, count_logits)


def object_loss(object_logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor | float | None = None) -> torch.Tensor:
    """Auxiliary loss: from each patch token under an object, predict the object's shape, colour,
    size and position (mean of the four cross-entropies; patches off the objects, label -1, ignored).

    object_logits (B, 49, 4+5+2+9), labels (B, 4, 49) from `patch_labels`.
    count: what to divide the summed cross-entropies by; default the number of labelled patches here.
    Under DDP pass the mean count per rank: then the DDP-averaged gradient is exactly that of the
    mean over all labelled patches of the global batch, however unevenly they fall on the ranks.
    """
    if count is None:
        count = (labels[:, 0] >= 0).sum().clamp(min=1)
    losses, start = [], 0
    for row, values in enumerate(ATTRIBUTES.values()):
        logits = object_logits[..., start : start + len(values)]  # (B, 9, n_values)
        losses.append(F.cross_entropy(logits.flatten(0, 1), labels[:, row].flatten(), ignore_index=-1, reduction="sum"))
        start += len(values)
    return torch.stack(losses).mean() / count


def count_loss(count_logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Auxiliary loss: from the CLS token, each of the scene's counts (mean cross-entropy over
    pictures and counts). count_logits (B, len(COUNTED), MAX_COUNT + 1), counts (B, len(COUNTED))."""
    return F.cross_entropy(count_logits.flatten(0, 1), counts.flatten())


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor, negative_embeds: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of B matching pairs (unit vectors), with optional hard negatives.

    image_embeds, text_embeds: (B, D), row i of each is a pair.
    negative_embeds: (M, D) extra captions that match no image; they are extra wrong columns of the
    image -> text softmax (the text -> image direction has no use for them).
    """
    targets = torch.arange(image_embeds.shape[0], device=image_embeds.device)
    texts = text_embeds if negative_embeds is None else torch.cat([text_embeds, negative_embeds])  # (B+M, D)
    logits_image = scale * image_embeds @ texts.t()  # (B, B+M)
    logits_text = scale * text_embeds @ image_embeds.t()  # (B, B)
    return 0.5 * (F.cross_entropy(logits_image, targets) + F.cross_entropy(logits_text, targets))


LOGIT_SCALE_LR_MULTIPLIER = 10.0


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the weight matrices only; the logit scale alone, without decay, faster.

    No decay for biases, LayerNorms, embeddings (tokens, positions, CLS) and above all the
    logit scale, which weight decay would drag towards exp(0) = 1, a temperature far too soft.
    Adam moves a parameter by about lr per step, so at lr 2e-3 the log-scale would need ~800
    steps to go from CLIP's start (1/0.07) to its cap (100); its group gets
    `lr_multiplier` = LOGIT_SCALE_LR_MULTIPLIER (applied by the training loop's schedule).
    """
    decay, no_decay, scale = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("logit_scale"):
            scale.append(p)
        elif p.ndim >= 2 and "embedding" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_multiplier": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_multiplier": 1.0},
        {"params": scale, "weight_decay": 0.0, "lr_multiplier": LOGIT_SCALE_LR_MULTIPLIER},
    ]


# ----------------------------------------------------------------------------- evaluation


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


def load_clip(folder: str | Path) -> tuple[CLIPModel, PreTrainedTokenizerFast]:
    """A saved tiny CLIP folder -> (CLIPModel in eval mode, its tokenizer)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"load_clip: {folder} has no config.json; train one with python -m minimind_v.train.clip")
    with quiet_transformers():
        return CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def evaluate_retrieval(model_folder, data=None, n: int = 64, max_pairs: int | None = 1024, seed: int = 0) -> float:
    """Top-1 image -> text accuracy over batches of n held-out pairs, for a saved tiny CLIP folder.

    data: a shapes-world folder (its eval split), a list of scenes, or None (fresh scenes).
    """
    clip, tokenizer = load_clip(model_folder)
    return retrieval_accuracy(clip, tokenizer, load_held_out(data, n=max_pairs, seed=seed), n=n)


# ----------------------------------------------------------------------------- linear probe

PROBE_FEATURES = ("mean", "object", "centre")


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


# ----------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    out: str = "runs/tiny_clip"
    data: str | None = None  # shapes-world folder: its eval split is the held-out set
    steps: int = 1000  # ~3.6 min on 2 CPU cores
    batch_size: int = 64  # global, split evenly over ranks
    negatives: int = 3  # hard-negative captions per picture
    # Weight of the auxiliary loss (objects on the patch tokens, counts on CLS; 0: contrastive only).
    # At 1 the tokens kept too little shape (probe 0.47 after 500 steps); at 10, 0.96.
    aux_weight: float = 10.0
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_pairs: int = 512  # held-out pairs (a multiple of 64)
    probe_train: int = 1000  # 0 skips the final probe
    probe_test: int = 500
    log_every: int = 10
    progress: bool = True
    model: TinyClipConfig = field(default_factory=TinyClipConfig)
    save_every: int = 0  # write the checkpoint every N steps (0: only at the end)
    resume: bool = False  # continue from out/checkpoint.pt (same settings), or start at step 0 without one
    overwrite: bool = False  # start at step 0 although out holds an earlier run
    allow_inexact_resume: bool = False  # with resume: continue although the settings differ
    stop_at: int | None = None  # end this run early at that step, as if killed (for resume tests)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the flag of the first value out of range."""
        for name, limits in CONFIG_LIMITS.items():
            value = getattr(self.model, name) if hasattr(self.model, name) else getattr(self, name)
            if name == "stop_at" and value is None:
                continue
            problem = value_problem(value, **limits)
            if problem:
                raise ValueError(f"--{name.replace('_', '-')} {problem}")
        if self.eval_pairs % 64:
            raise ValueError(f"--eval-pairs must be a positive multiple of 64, got {self.eval_pairs}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: --resume continues the run in the "
                             "folder, --overwrite starts it again")


# The valid range of each TrainConfig / TinyClipConfig value (flags of the same name).
CONFIG_LIMITS = {
    **{k: v for k, v in LIMITS.items() if k in ("steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps",
                                                 "weight_decay", "grad_clip", "seed", "log_every", "save_every",
                                                 "stop_at")},
    "negatives": dict(integer=True, low=0), "aux_weight": dict(integer=False, low=0),
    "eval_every": dict(integer=True, low=0), "eval_pairs": dict(integer=True, low=64),
    "probe_train": dict(integer=True, low=0), "probe_test": dict(integer=True, low=1),
    **{k: dict(integer=True, low=1) for k in ("vision_width", "vision_layers", "vision_heads", "text_width",
                                             "text_layers", "text_heads", "projection_dim")},
}
# TrainConfig fields that do not change the trained weights: not compared on resume.
NOT_SETTINGS = ("out", "progress", "eval_every", "probe_train", "probe_test", "log_every", "save_every", "resume",
                "overwrite", "allow_inexact_resume", "stop_at", "model")


def run_settings(cfg: TrainConfig, world_size: int) -> dict:
    """What decides the weights a run ends with (compared on resume): the training values, the
    model's sizes, the held-out set (its pictures are never trained on) and the number of processes."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_SETTINGS}
    settings["data"] = path_setting(cfg.data, cfg.out)
    settings.update(asdict(cfg.model))
    settings["world_size"] = world_size
    return settings


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


MAX_LOGIT_SCALE = math.log(100.0)  # CLIP caps the inverse temperature at 100


def train(cfg: TrainConfig) -> dict:
    """Train (alone or as one rank of a torchrun job), save to cfg.out on rank 0, return a summary."""
    info = D.setup_distributed()
    try:
        result = _train(cfg, info)
    except D.RankTimeoutError:
        raise  # leave the broken process group alone: tearing it down may wait on the rank that is gone
    except BaseException:
        D.cleanup_distributed()
        raise
    D.cleanup_distributed()
    return result


def _train(cfg: TrainConfig, info: D.DistInfo) -> dict:
    cfg.validate()
    if cfg.batch_size % info.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({info.world_size})")
    out = Path(cfg.out)
    local_batch = cfg.batch_size // info.world_size
    settings = run_settings(cfg, info.world_size)
    checkpoint = out / T.CHECKPOINT
    # Every rank decides from the same files before rank 0 writes anything (the collective of
    # wrap_ddp / same_on_every_rank below comes first).
    state, differences = T.start_state(out, settings, info, resume=cfg.resume, overwrite=cfg.overwrite,
                                       allow_inexact_resume=cfg.allow_inexact_resume, steps=cfg.steps)

    D.seed_everything(cfg.seed)  # identical initial weights on every rank
    tokenizer = build_tokenizer()
    clip = CLIPModel(make_clip_config(cfg.model, vocab_size=len(tokenizer)))
    init_vision_embeddings(clip)
    clip = clip.to(info.device)
    contrastive = ContrastiveCLIP(clip)
    model = D.wrap_ddp(contrastive, info)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    start_step, last_loss, inexact = 0, float("nan"), []
    if state is not None:
        # The heads are saved too: they shape the gradients, so an exact resume needs them.
        T.load_model_state(contrastive, state["model"], checkpoint)
        T.load_optimizer_state(optimizer, state["optimizer"], checkpoint)
        start_step, last_loss = state["step"], float(state.get("loss", float("nan")))
        inexact = list(state.get("inexact_resumes", []))
        if differences:
            inexact.append({"step": start_step, "changed": {k: list(v) for k, v in differences.items()}})
        del state
    elif cfg.resume and info.is_main:
        print(f"--resume: no {T.CHECKPOINT} in {out}; starting from step 0")
    T.same_on_every_rank(start_step, "the step to start from", info.device)
    end_step = max(start_step, cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at))

    held = load_held_out(cfg.data, n=cfg.eval_pairs, seed=cfg.seed) if info.is_main else None
    # Every rank skips the same held-out pictures (rank 0 knows them; share the keys).
    held_keys = [held.scene_keys if held else None]
    if D.is_distributed():
        torch.distributed.broadcast_object_list(held_keys, src=0)
    held_keys = held_keys[0]

    metrics_file = None
    if info.is_main:
        T.prepare_out_dir(out, start_step, {"total_steps": cfg.steps, "world_size": info.world_size,
                                            "settings": settings,
                                            **({"inexact_resumes": inexact} if inexact else {})})
        metrics_file = open(out / T.METRICS, "a", encoding="utf-8")

    def log(record: dict) -> None:
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def evaluate(step: int, elapsed: float) -> float:
        acc = retrieval_accuracy(clip, tokenizer, held, n=64)
        clip.train()
        log({"step": step, "elapsed_s": round(elapsed, 2), "retrieval_top1": acc})
        return acc

    def save_checkpoint(step: int) -> None:
        T.write_checkpoint(checkpoint, contrastive, optimizer, step, settings, loss=last_loss,
                           inexact_resumes=inexact)
        guard.saved = step

    guard = T.StepGuard(save_checkpoint, start_step, info, checkpoint)
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=cfg.steps, initial=start_step, desc="tiny CLIP", unit="step",
               disable=not (info.is_main and cfg.progress))
    acc = float("nan")
    images_seen, window_start, window_images = 0, time.perf_counter(), 0
    D.use_step_timeout()
    step = start_step
    try:
        for step in range(start_step, end_step):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg) * group["lr_multiplier"]
            # This rank's slice of global batch `step`: examples [step*B + rank*b, step*B + (rank+1)*b).
            first = step * cfg.batch_size + info.rank * local_batch
            batch = training_batch(tokenizer, cfg.seed, range(first, first + local_batch), cfg.negatives, held_keys)
            batch = {k: v.to(info.device) for k, v in batch.items()}
            image, text, scale, object_logits, count_logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
            # Gather every rank's embeddings (with gradient): the loss below is the global-batch loss.
            positives, negatives = text[:local_batch], text[local_batch:]
            clip_loss = contrastive_loss(
                D.all_gather_with_grad(image), D.all_gather_with_grad(positives), scale,
                D.all_gather_with_grad(negatives) if cfg.negatives else None,
            )
            # Per rank, normalised by the mean labelled-patch count per rank, so that DDP's gradient
            # average is the gradient of the global-batch mean. (A zero weight keeps the head in the
            # graph: DDP expects every parameter to get a gradient.)
            patches_per_rank = D.all_reduce_mean((batch["patch_labels"][:, 0] >= 0).sum().float())
            # Every rank holds the same number of pictures, so the count loss's per-rank mean averages right.
            aux_loss = object_loss(object_logits, batch["patch_labels"], patches_per_rank) + count_loss(count_logits, batch["counts"])
            loss = clip_loss + cfg.aux_weight * aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            T.fault_point(f"step-{step + 1}")
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            guard.updating = True
            optimizer.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            guard.completed(step + 1)
            last_loss = clip_loss.item()  # identical on every rank (the global-batch loss)

            images_seen += cfg.batch_size
            window_images += cfg.batch_size
            bar.update()
            if (step + 1) % cfg.log_every == 0 or step + 1 == end_step:
                now = time.perf_counter()
                speed = window_images / (now - window_start)
                window_start, window_images = now, 0
                aux_value = D.all_reduce_mean(aux_loss).item()  # the global-batch mean (collective: every rank)
                log({"step": step + 1, "elapsed_s": round(now - start, 2), "loss": round(last_loss, 4),
                     "aux_loss": round(aux_value, 4), "lr": learning_rate(step, cfg),
                     "logit_scale": round(clip.logit_scale.exp().item(), 2), "images_per_s": round(speed, 1)})
                bar.set_postfix(loss=f"{last_loss:.3f}", aux=f"{aux_value:.3f}", img_s=f"{speed:.0f}", top1=f"{acc:.2f}")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                # Rank 0 evaluates; the others wait for it outside any collective.
                result = D.run_on_main(lambda: evaluate(step + 1, time.perf_counter() - start), "the held-out evaluation")
                acc = result if info.is_main else acc
            if info.is_main and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < end_step:
                save_checkpoint(step + 1)
    except Exception as err:
        bar.close()
        if metrics_file:
            metrics_file.close()
        failure = guard.fail(err, step + 1)
        if failure is err:
            raise
        raise failure from err
    bar.close()
    train_seconds = time.perf_counter() - start
    finished = end_step == cfg.steps

    def finish() -> dict:
        """Rank 0: the final checkpoint, then the model folder, then the completion mark, last."""
        save_checkpoint(end_step)
        if not finished:
            metrics_file.close()
            return {"steps": end_step, "finished": False, "final_loss": last_loss, "out": str(out)}
        acc = evaluate(cfg.steps, train_seconds)
        with quiet_transformers():
            clip.save_pretrained(out)
            T.fault_point("final-save")  # the crash tests kill here: weights written, the rest not yet
            tokenizer.save_pretrained(out)
            make_image_processor(cfg.model.image_size).save_pretrained(out)
        atomic_write_text(out / "train_config.json", json.dumps(asdict(cfg), indent=2) + "\n")
        summary = {"steps": cfg.steps, "images": images_seen, "minutes": round(train_seconds / 60, 2),
                   "world_size": info.world_size, "final_loss": round(last_loss, 4), "retrieval_top1": acc,
                   "held_out": held.source, "out": str(out), "finished": True}
        if cfg.probe_train:
            probe = probe_trained_vs_random(out, cfg.probe_train, cfg.probe_test, cfg.seed)
            summary["probe"] = probe
            log({"step": cfg.steps, "probe": probe})
        metrics_file.close()
        shape = ""
        if "probe" in summary:
            p = summary["probe"]
            shape = ", shape probe trained/random " + ", ".join(
                f"{f} {p['trained'][f]['shape']:.2f}/{p['random'][f]['shape']:.2f}" for f in PROBE_FEATURES)
        print(f"tiny CLIP: {cfg.steps} steps x {cfg.batch_size} in {train_seconds / 60:.1f} min on {info.world_size} "
              f"process(es), contrastive loss {last_loss:.3f}, held-out top-1 retrieval {acc:.3f} (batches of 64){shape} -> {out}")
        mark_complete(out, {"stage": "clip", "summary": summary, "settings": settings, "inexact_resumes": inexact})
        return summary

    # The others wait for rank 0's saving and probe outside any collective (the probe takes a while).
    summary = D.run_on_main(finish, "saving the model and probing it")
    return summary if info.is_main else {}


def main(argv: list[str] | None = None) -> dict:
    d = TrainConfig()
    m = TinyClipConfig()
    p = argparse.ArgumentParser(prog="python -m minimind_v.train.clip",
                                description="Train the tiny CLIP on the shapes world (alone or under torchrun).")

    def number(name: str, kind=int, **kwargs):
        """A flag whose value is checked against CONFIG_LIMITS (the error names the flag)."""
        limits = {k: v for k, v in CONFIG_LIMITS[name].items() if k != "integer"}
        p.add_argument("--" + name.replace("_", "-"), type=checked(kind, **limits), **kwargs)

    p.add_argument("--data", default=d.data, help="shapes-world folder; its eval split is the held-out set "
                   "(default: freshly generated held-out scenes)")
    p.add_argument("--out", default=d.out, help="output folder: CLIPModel, tokenizer, image processor, "
                   "train_config.json, checkpoint.pt and metrics.jsonl (one JSON line per log step)")
    number("steps", default=d.steps)
    number("batch_size", default=d.batch_size, help="global batch (split over processes)")
    number("negatives", default=d.negatives, help="hard-negative captions per picture")
    number("aux_weight", float, default=d.aux_weight,
           help="weight of the auxiliary loss: objects on the patch tokens, counts on CLS (0: contrastive only)")
    number("lr", float, default=d.lr)
    number("warmup_steps", default=d.warmup_steps)
    number("weight_decay", float, default=d.weight_decay)
    number("seed", default=d.seed)
    number("eval_every", default=d.eval_every, help="steps between held-out evaluations (0: only at the end)")
    number("eval_pairs", default=d.eval_pairs, help="held-out pairs (a multiple of 64)")
    number("probe_train", default=d.probe_train, help="linear-probe training objects (0: no probe)")
    number("probe_test", default=d.probe_test)
    number("log_every", default=d.log_every)
    number("save_every", default=d.save_every, help=FLAG_HELP["save_every"])
    p.add_argument("--resume", action="store_true", help=FLAG_HELP["resume"])
    p.add_argument("--overwrite", action="store_true", help=FLAG_HELP["overwrite"])
    p.add_argument("--allow-inexact-resume", action="store_true", help=FLAG_HELP["allow_inexact_resume"])
    number("stop_at", default=None, help=argparse.SUPPRESS)
    for name in ("vision_width", "vision_layers", "vision_heads", "text_width", "text_layers", "text_heads",
                 "projection_dim"):
        number(name, default=getattr(m, name))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        model = TinyClipConfig(a.vision_width, a.vision_layers, a.vision_heads, a.text_width, a.text_layers,
                               a.text_heads, a.projection_dim)
        cfg = TrainConfig(out=a.out, data=a.data, steps=a.steps, batch_size=a.batch_size, negatives=a.negatives,
                          aux_weight=a.aux_weight, lr=a.lr, warmup_steps=a.warmup_steps, weight_decay=a.weight_decay,
                          seed=a.seed, eval_every=a.eval_every, eval_pairs=a.eval_pairs, probe_train=a.probe_train,
                          probe_test=a.probe_test, log_every=a.log_every, progress=not a.no_progress, model=model,
                          save_every=a.save_every, resume=a.resume, overwrite=a.overwrite,
                          allow_inexact_resume=a.allow_inexact_resume, stop_at=a.stop_at)
        return train(cfg)
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))


if __name__ == "__main__":
    main()
