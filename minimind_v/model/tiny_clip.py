"""The tiny CLIP: the book's offline eyes, beside the real CLIP's `vision.VisionEncoder`.

The real MiniMind-V looks through OpenAI's CLIP ViT-B/32. Offline the book trains a miniature
(`minimind_v.train.clip`) with the same geometry (224 px images, 32 px patches -> 7x7 patches +
CLS = 50 tokens) but a narrow, shallow tower:

    scene -> render_scene -> pixels (B, 3, 224, 224) -> vision tower -> CLS -> image embedding
    scene -> caption      -> word ids (B, T)         -> text tower   -> EOS -> text embedding

This module is the model and what it reads: the word-level tokenizer, the sizes (`TinyClipConfig`
-> a transformers `CLIPConfig`), the initialisation that lets the tower see where a patch is, the
image processor (CLIP's; `pixels_from_images` gives the same numbers fast), and what training
optimises: `ContrastiveCLIP` (the CLIPModel plus the two training-only heads of the auxiliary
objective) and its losses. What the examples are is in `minimind_v.data.clip_examples`, how well
the result sees in `minimind_v.probes`.

A trained tiny CLIP is a regular CLIPModel folder with its tokenizer and image processor:
`load_clip(folder)`, `VisionEncoder.from_pretrained(folder)` and `CLIPModel.from_pretrained(folder)`
open it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ..data import shapes
from ..data.clip_examples import ATTRIBUTES, COUNTED, MAX_COUNT
from .folders import quiet_transformers

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
    # Channels first before the float conversion, then normalise in place: the same arithmetic as
    # (x / 255 - mean) / std, a third of the memory traffic (this runs on every tiny-CLIP step).
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    return x.sub_(_MEAN).div_(_STD)


def load_clip(folder: str | Path) -> tuple[CLIPModel, PreTrainedTokenizerFast]:
    """A saved tiny CLIP folder -> (CLIPModel in eval mode, its tokenizer)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"load_clip: {folder} has no config.json; train one with python -m minimind_v.train.clip")
    with quiet_transformers():
        return CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


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
