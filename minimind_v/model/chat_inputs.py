"""The parts of a request before they become tensors: pictures as RGB images, ``<image>`` tags
matched to pictures (one per tag, in order), chat turns written as text, and rows of ids padded
to one length."""

from __future__ import annotations

import os
from collections.abc import Sequence

from PIL import Image

from ..data.images import load_image, to_rgb
from ..tokenizer import IMAGE_TAG


def as_rgb(picture, index: int = 0) -> Image.Image:
    """A picture as an RGB PIL image: a file path is read (``load_image``), a PIL image converted."""
    if isinstance(picture, (str, os.PathLike)):
        if str(picture).startswith(("http://", "https://")):
            raise ValueError(f"picture {index} is a URL ({picture}); give a local file or a PIL image "
                             "(nothing is downloaded)")
        return load_image(picture)
    if isinstance(picture, Image.Image):
        return to_rgb(picture)
    raise ValueError(f"picture {index} is a {type(picture).__name__}; give a PIL image or an image file path")


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "left") -> tuple[list[list[int]], list[list[int]]]:
    """Pad id rows to the longest: (ids, attention_mask), padding on ``side`` ("left" for generation)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    width = max((len(r) for r in rows), default=0)
    ids, mask = [], []
    for r in rows:
        fill = width - len(r)
        ids.append([pad_id] * fill + list(r) if side == "left" else list(r) + [pad_id] * fill)
        mask.append([0] * fill + [1] * len(r) if side == "left" else [1] * len(r) + [0] * fill)
    return ids, mask


def with_image_tags(question: str, n_pictures: int | None = None, picture_first: bool = True) -> str:
    """``question`` ready for a chat turn: without an ``<image>`` tag it gets one per picture in
    front ("<image>\\n" each; one when ``n_pictures`` is None, as in the training data). With
    ``picture_first``, a question holding one tag elsewhere ("What colour is it?\\n<image>") gets it
    moved in front (``picture_in_front``); other tagged questions are returned as they are."""
    if IMAGE_TAG in question:
        return picture_in_front(question) if picture_first else question
    return (IMAGE_TAG + "\n") * (1 if n_pictures is None else n_pictures) + question


def picture_in_front(question: str) -> str:
    """A one-picture question in the layout most SFT questions have: "<image>\\n" and then the
    question's words. LLaVA's preprocessing moves the tag the same way. Under the causal mask the
    two layouts are different inputs, and a model meets a question after its picture in nearly
    every SFT turn (only a record's first turn holds the picture). Questions with several tags
    keep their order: there the words between pictures say which is which."""
    if question.count(IMAGE_TAG) != 1 or question.startswith(IMAGE_TAG + "\n"):
        return question
    words = " ".join(part.strip() for part in question.split(IMAGE_TAG) if part.strip())
    return f"{IMAGE_TAG}\n{words}"


def blocks_to_text(blocks: Sequence, pictures: list, turn: int) -> str:
    parts = []
    for j, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif kind in ("image", "image_url"):
            found = [block[key] for key in ("image", "path", "url") if block.get(key) is not None]
            if kind == "image_url" and isinstance(block.get("image_url"), dict):
                found.append(block["image_url"].get("url"))
            pictures.extend(found[:1])
            after = blocks[j + 1] if j + 1 < len(blocks) else None
            follows_text = isinstance(after, dict) and after.get("type") == "text"
            parts.append(IMAGE_TAG + ("\n" if follows_text else ""))
        else:
            raise ValueError(f"turn {turn}: content block {j} must be {{'type': 'text' | 'image', ...}}, got {block!r}")
    return "".join(parts)


def is_picture_group(item) -> bool:
    return isinstance(item, (list, tuple))


def flatten_pictures(images) -> list:
    if not isinstance(images, (list, tuple)):
        return [images]
    return [p for item in images for p in (item if is_picture_group(item) else [item])]


def match_pictures(texts: Sequence[str], images) -> list:
    """The pictures in placeholder order; ValueError when they do not match the tags."""
    tags = [t.count(IMAGE_TAG) for t in texts]
    if isinstance(images, (list, tuple)) and any(is_picture_group(item) for item in images):
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} lists of pictures for {len(texts)} prompts: give one list per prompt")
        for i, (item, n) in enumerate(zip(images, tags)):
            group = list(item) if is_picture_group(item) else [item]
            if len(group) != n:
                raise ValueError(f"prompt {i} has {n} {IMAGE_TAG!r} tag(s) but {len(group)} picture(s) were given "
                                 f"for it: {texts[i][:80]!r}")
        return flatten_pictures(images)
    flat = flatten_pictures(images)
    if len(flat) != sum(tags):
        raise ValueError(f"the prompts hold {sum(tags)} {IMAGE_TAG!r} tag(s) (per prompt: {tags}) but {len(flat)} "
                         "picture(s) were given: one picture per tag, in order")
    return flat
