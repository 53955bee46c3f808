"""Asking a trained MiniMind-V about pictures: load a saved folder, build prompts, answer in batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .data.images import load_image, to_rgb
from .model.vision import VisionEncoder
from .model.vlm import MiniMindVLM, resolve_vision_model
from .tokenizer import IMAGE_TOKEN, encode_chat, has_image_token, load_tokenizer

# The answers of the book's world are a few tokens; leave room for longer free-form answers.
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass
class VLMBundle:
    """A trained model with what it needs to answer: its tokenizer and its frozen eyes."""

    model: MiniMindVLM
    tokenizer: object
    encoder: VisionEncoder

    @property
    def device(self) -> torch.device:
        return self.model.device


def pick_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_vlm(folder: str | Path, device: str | None = None, vision_model: str | None = None,
             require_complete: bool = False) -> VLMBundle:
    """Load a ``save_pretrained`` folder of MiniMind-V: weights, tokenizer (same folder) and the
    vision encoder its config names (a folder inside it, a local folder or a hub id).

    The folder is checked before anything is loaded (see ``MiniMindForCausalLM.from_pretrained``):
    a text LM folder, a CLIP folder, a folder without or with a damaged config.json, and one whose
    weights are a pickle (pytorch_model.bin) are refused with a message saying what the folder is.
    A folder whose training never finished (checkpoint.pt without complete.json) loads with an
    ``IncompleteModelWarning``, or is refused with ``require_complete=True``.
    """
    folder = Path(folder)
    if not folder.is_dir():  # a local folder only: a name that is not one must not reach the hub
        raise FileNotFoundError(f"{folder} is a file, not a MiniMind-V folder" if folder.exists()
                                else f"no MiniMind-V folder at {folder}: the folder does not exist")
    device = pick_device(device)
    model = MiniMindVLM.from_pretrained(folder, require_complete=require_complete).to(device).eval()
    tokenizer = load_tokenizer(folder)
    encoder = VisionEncoder.from_pretrained(
        vision_model or resolve_vision_model(folder, model.config.vision_model), device=device
    )
    model.attach_vision_encoder(encoder)
    return VLMBundle(model, tokenizer, encoder)


def prompt_ids(tokenizer, question: str, num_image_tokens: int) -> list[int]:
    """The chat prompt for one question about one image, ending where the answer begins.
    A question without an ``<image>`` tag gets one in front, as in the training data."""
    text = question if "<image>" in question else f"<image>\n{question}"
    ids, _ = encode_chat(tokenizer, [{"from": "human", "value": text}], num_image_tokens,
                         add_generation_prompt=True)
    return ids


def suppressed_ids(tokenizer) -> list[int]:
    """Tokens an answer must never contain: a generated image placeholder would read as a broken
    image when the answer is fed back in."""
    return [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)] if has_image_token(tokenizer) else []


def left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts so every answer starts at the same column: (ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # building the batch once, not a per-step loop
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def as_images(images) -> list[Image.Image]:
    return [load_image(im) if isinstance(im, (str, Path)) else to_rgb(im) for im in images]


@torch.no_grad()
def answer(
    bundle: VLMBundle,
    images: Sequence | None,
    questions: Sequence[str],
    image_tokens: torch.Tensor | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    streamer=None,
    **sampling,
) -> list[str]:
    """Answer ``questions[i]`` about ``images[i]`` (paths or PIL images), all in one batch.

    ``image_tokens`` (n, N, width) may replace ``images`` (e.g. from the feature cache);
    ``images=None`` and no tokens asks the text-only baseline: the same prompts, no picture.
    Greedy unless sampling options (do_sample, temperature, top_k, top_p, repetition_penalty)
    are given.
    """
    model, tok = bundle.model, bundle.tokenizer
    if not questions:
        return []
    # The text-only baseline keeps the placeholders: the same prompt with no picture in them.
    rows = [prompt_ids(tok, q, model.config.num_image_tokens) for q in questions]
    # Prompt and answer share the model's positions; generate cuts the answer to what is left.
    limit = model.config.max_position_embeddings
    longest = max(range(len(rows)), key=lambda i: len(rows[i]))
    if len(rows[longest]) >= limit:
        raise ValueError(
            f"question {longest} ({questions[longest][:60]!r}) makes a prompt of {len(rows[longest])} tokens "
            f"({model.config.num_image_tokens} of them the image), but the model's maximum length "
            f"(max_position_embeddings) is {limit}: no room is left for an answer; shorten the question"
        )
    ids, mask = left_pad(rows, tok.pad_token_id or 0)
    if images is not None:
        image_tokens = bundle.encoder(bundle.encoder.preprocess(as_images(images)).to(model.device))
    sampling.setdefault("do_sample", False)
    if suppressed_ids(tok):
        sampling.setdefault("suppress_tokens", suppressed_ids(tok))
    out = model.generate(
        ids.to(model.device), attention_mask=mask.to(model.device),
        image_tokens=None if image_tokens is None else image_tokens.to(model.device),
        max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id or 0, streamer=streamer, **sampling,
    )
    return [s.strip() for s in tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]
