"""Asking a trained MiniMind-V about pictures: load a saved folder, answer questions in batches.

A loaded model is a :class:`LoadedVLM`: the model (its frozen vision encoder attached) and its
:class:`~minimind_v.model.processing.MiniMindVProcessor` (tokenizer + chat template + image
processor), which turns questions and pictures into the model's inputs::

    model, processor = load_vlm(folder)
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\\nWhat colour is it?"}],
                                           add_generation_prompt=True)
    inputs = processor(images=[picture], text=[prompt], padding=True, padding_side="left", return_tensors="pt")

``answer`` does exactly that for a batch of questions, each about one picture or several, and
decodes what the model generates.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from .model.chat_inputs import with_image_tags
from .model.image_processing import encoder_preprocessing
from .model.processing import PROCESSOR_CONFIG, MiniMindVProcessor
from .model.vision import VisionEncoder
from .model.vlm import MiniMindVLM, resolve_vision_model
from .tokenizer import IMAGE_TAG, IMAGE_TOKEN, has_image_token

# The answers of the book's world are a few tokens; leave room for longer free-form answers.
DEFAULT_MAX_NEW_TOKENS = 32


class LoadedVLM(NamedTuple):
    """A model ready to answer: the model, its vision encoder attached, and its processor.

    A pair, so ``model, processor = load_vlm(folder)`` reads as well as ``vlm.model``."""

    model: MiniMindVLM
    processor: MiniMindVProcessor

    @classmethod
    def from_parts(cls, model: MiniMindVLM, tokenizer, encoder: VisionEncoder) -> "LoadedVLM":
        """A model built in memory (not loaded from a folder): ``encoder`` is attached to it and
        the processor is the tokenizer's and the encoder's."""
        return cls(model.attach_vision_encoder(encoder), MiniMindVProcessor.from_encoder(tokenizer, encoder))

    @property
    def encoder(self) -> VisionEncoder | None:
        """The frozen vision encoder attached to the model."""
        return self.model.vision_encoder


def pick_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_vlm(folder: str | Path, device: str | None = None, vision_model: str | None = None,
             require_complete: bool = False) -> LoadedVLM:
    """Load a ``save_pretrained`` folder of MiniMind-V: the weights, with the vision encoder its
    config names attached (a folder inside it, a local folder or a hub id; ``vision_model``
    overrides it), and the processor (tokenizer and chat template of the same folder, the
    encoder's image processor).

    The folder is checked before anything is loaded (see ``MiniMindForCausalLM.from_pretrained``):
    a text LM folder, a CLIP folder, a folder without or with a damaged config.json, and one whose
    weights are a pickle (pytorch_model.bin) are refused with a message saying what the folder is.
    A folder whose training never finished (checkpoint.pt without complete.json) loads with an
    ``IncompleteModelWarning``, or is refused with ``require_complete=True``. A folder saved
    before processors existed (no processor_config.json) loads too.
    """
    folder = Path(folder)
    if not folder.is_dir():  # a local folder only: a name that is not one must not reach the hub
        raise FileNotFoundError(f"{folder} is a file, not a MiniMind-V folder" if folder.exists()
                                else f"no MiniMind-V folder at {folder}: the folder does not exist")
    device = pick_device(device)
    model = MiniMindVLM.from_pretrained(folder, require_complete=require_complete).to(device).eval()
    # An encoder named by hub id keeps its preprocessing mode in the model's config.
    mode = getattr(model.config, "vision_preprocessing", None)
    encoder = VisionEncoder.from_pretrained(
        vision_model or resolve_vision_model(folder, model.config.vision_model), device=device,
        **({"preprocessing": mode} if mode and not vision_model else {}),
    )
    model.attach_vision_encoder(encoder)
    # The pixels are the encoder's own: its image processor, whatever the folder's file says.
    compare = vision_model is None and (folder / PROCESSOR_CONFIG).is_file()
    saved = MiniMindVProcessor.from_pretrained(folder, image_processor=None if compare else encoder.processor,
                                               preprocessing=encoder_preprocessing(encoder))
    if compare and saved.image_processor.to_dict() != encoder.processor.to_dict():
        warnings.warn(f"{folder}: the image processor in {PROCESSOR_CONFIG} differs from the vision "
                      f"encoder's ({encoder.name_or_path}); the encoder's is used", stacklevel=2)
    processor = MiniMindVProcessor(encoder.processor, saved.tokenizer, chat_template=saved.chat_template,
                                   num_image_tokens=saved.num_image_tokens,
                                   preprocessing=encoder_preprocessing(encoder))
    return LoadedVLM(model, processor)


def model_and_processor(vlm, where: str) -> tuple[MiniMindVLM, MiniMindVProcessor]:
    """``vlm`` as (model, processor), or a ValueError saying what ``where`` was given instead."""
    try:
        model, processor = vlm
    except (TypeError, ValueError):
        raise ValueError(f"{where} needs (model, processor) as load_vlm returns them, got a "
                         f"{type(vlm).__name__}") from None
    if not isinstance(processor, MiniMindVProcessor):
        raise ValueError(f"{where} needs (model, processor) as load_vlm returns them; the second item is a "
                         f"{type(processor).__name__}, not a MiniMindVProcessor")
    return model, processor


def suppressed_ids(tokenizer) -> list[int]:
    """Tokens an answer must never contain: a generated image placeholder would read as a broken
    image when the answer is fed back in."""
    return [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)] if has_image_token(tokenizer) else []


def picture_groups(images, n_questions: int) -> list[list] | None:
    """``images`` as one list of pictures per question (None stays None)."""
    if images is None:
        return None
    images = list(images)
    if len(images) != n_questions:
        raise ValueError(f"{len(images)} picture entries for {n_questions} questions: give one entry per "
                         "question (a picture, or a list of pictures)")
    return [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]


@torch.no_grad()
def answer(
    vlm: LoadedVLM,
    images: Sequence | None,
    questions: Sequence[str],
    image_tokens: torch.Tensor | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    streamer=None,
    picture_first: bool = True,
    **sampling,
) -> list[str]:
    """Answer ``questions[i]`` about ``images[i]``, all in one batch.

    ``vlm`` is the model and its processor (``load_vlm``). ``images[i]`` is one picture (a path
    or a PIL image) or a list of pictures, one per ``<image>`` tag of question i, in order; a
    question with k pictures and no tag gets k tags in front, and one with a single tag after its
    words gets it moved in front (``picture_first=False`` asks it as written; see
    ``chat_inputs.picture_in_front``). A question whose tags and pictures disagree is a ValueError
    naming it. ``image_tokens`` (n, N, width), the pictures of all
    questions in order, may replace ``images`` (e.g. from the feature cache); ``images=None`` and
    no tokens asks the text-only baseline: the same prompts, no picture. Greedy unless sampling
    options (do_sample, temperature, top_k, top_p, repetition_penalty) are given.
    """
    model, processor = model_and_processor(vlm, "answer")
    if not questions:
        return []
    tok = processor.tokenizer
    groups = picture_groups(images, len(questions))
    texts = []
    for i, question in enumerate(questions):
        if not isinstance(question, str):
            raise ValueError(f"question {i} is a {type(question).__name__}, not a string")
        text = with_image_tags(question, None if groups is None else len(groups[i]), picture_first)
        if groups is not None and text.count(IMAGE_TAG) != len(groups[i]):
            raise ValueError(f"question {i} ({question[:60]!r}) has {text.count(IMAGE_TAG)} {IMAGE_TAG!r} tag(s) "
                             f"but {len(groups[i])} picture(s): give one picture per tag, or no tag (then one "
                             "is put in front per picture)")
        texts.append(text)
    if image_tokens is not None and groups is None:
        tags = sum(t.count(IMAGE_TAG) for t in texts)
        if tags != image_tokens.shape[0]:
            raise ValueError(f"the questions hold {tags} picture(s) ({IMAGE_TAG!r} tags, one per question without "
                             f"tags) but image_tokens has {image_tokens.shape[0]}")
    prompts = []
    for i, text in enumerate(texts):
        try:
            prompts.append(processor.apply_chat_template([{"role": "user", "content": text}],
                                                         add_generation_prompt=True))
        except ValueError as err:
            raise ValueError(f"question {i} ({questions[i][:60]!r}): {err}") from None
    # The text-only baseline keeps the placeholders: the same prompt with no picture in them.
    batch = processor(text=prompts, images=groups if groups is not None and any(groups) else None,
                      padding=True, padding_side="left", return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # Prompt and answer share the model's positions; generate cuts the answer to what is left.
    limit = model.config.max_position_embeddings
    lengths = mask.sum(1).tolist()
    longest = max(range(len(lengths)), key=lambda i: lengths[i])
    if lengths[longest] >= limit:
        n_pictures = texts[longest].count(IMAGE_TAG)
        raise ValueError(
            f"question {longest} ({questions[longest][:60]!r}) makes a prompt of {lengths[longest]} tokens "
            f"({n_pictures * model.config.num_image_tokens} of them for {n_pictures} picture(s)), but the model's "
            f"maximum length (max_position_embeddings) is {limit}: no room is left for an answer; shorten the question"
        )
    if "pixel_values" in batch:
        image_tokens = model.encode_images(batch["pixel_values"].to(model.device))
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

