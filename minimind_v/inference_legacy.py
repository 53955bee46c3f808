"""Deprecated: the names ``minimind_v.inference`` had before the processor, for callers not yet moved.

Each warns (DeprecationWarning) and says what replaces it:

* ``VLMBundle(model, tokenizer, encoder)``  -> ``LoadedVLM.from_parts(model, tokenizer, encoder)``
  (the model and its processor; ``.tokenizer`` is ``.processor.tokenizer``);
* ``prompt_ids(tokenizer, question, n)``    -> ``processor.question_ids(question)``;
* ``left_pad(rows, pad_id)``                -> ``processor(text=..., padding=True, padding_side="left")``
  or ``tokenizer.pad``;
* ``as_images(pictures)``                   -> ``processor(images=pictures)["pixel_values"]``.

Reached through ``minimind_v.inference`` (its module ``__getattr__``); delete this file once
nothing imports these names.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .data.images import load_image, to_rgb
from .inference import LoadedVLM
from .model.processing import MiniMindVProcessor, pad_rows, with_image_tags
from .tokenizer import IMAGE_TAG, encode_chat

__all__ = ["VLMBundle", "as_images", "left_pad", "prompt_ids"]


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"minimind_v.inference.{old} is deprecated: use {new}", DeprecationWarning, stacklevel=3)


class VLMBundle(LoadedVLM):
    """Deprecated: ``LoadedVLM.from_parts(model, tokenizer, encoder)``. Attaches ``encoder`` to
    ``model``; keeps ``.tokenizer`` for old callers."""

    __slots__ = ()

    def __new__(cls, model, tokenizer, encoder, processor: MiniMindVProcessor | None = None):
        _deprecated("VLMBundle", "LoadedVLM.from_parts(model, tokenizer, encoder)")
        model.attach_vision_encoder(encoder)
        return super().__new__(cls, model, processor or MiniMindVProcessor.from_encoder(tokenizer, encoder))

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def prompt_ids(tokenizer, question: str, num_image_tokens: int, num_images: int | None = None) -> list[int]:
    """Deprecated: ``processor.question_ids(question, num_images)``."""
    _deprecated("prompt_ids", "processor.question_ids(question)")
    text = with_image_tags(question, num_images)
    ids, _ = encode_chat(tokenizer, [{"from": "human", "value": text}], num_image_tokens,
                         add_generation_prompt=True, num_images=text.count(IMAGE_TAG))
    return ids


def left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deprecated: the processor's padding (``padding=True, padding_side="left"``)."""
    _deprecated("left_pad", 'processor(text=..., padding=True, padding_side="left", return_tensors="pt")')
    ids, mask = pad_rows(rows, pad_id, "left")
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def as_images(images) -> list[Image.Image]:
    """Deprecated: ``processor(images=...)`` reads paths and converts to RGB itself."""
    _deprecated("as_images", 'processor(images=pictures)["pixel_values"]')
    return [load_image(im) if isinstance(im, (str, Path)) else to_rgb(im) for im in images]
