"""MiniMindVProcessor: pictures and chat text -> the model's inputs, as one transformers processor.

It joins what a prompt needs before the model sees it:

* the **chat template** (the tokenizer's, kept in the model folder): ``apply_chat_template``
  renders ``[{"role": "user", "content": "<image>\\nWhat colour is the circle?"}]`` (or the
  transformers form, ``content=[{"type": "image"}, {"type": "text", "text": ...}]``) to text;
* the **tokenizer**: each ``<image>`` tag becomes the model's placeholder, ``num_image_tokens``
  ids (``<|image|>`` repeated, or the original tokenizer's ``'<' * 25 + '>' * 25``); the text
  between the tags is tokenized piece by piece, exactly as training encoded it
  (:func:`minimind_v.tokenizer.encode_chat`);
* the **image processor** of the frozen vision encoder (resize, centre crop, normalise):
  ``pixel_values`` (n_pictures, 3, S, S), the pictures of the whole batch in the order of their
  tags, row by row: the order in which the model fills the placeholders.

::

    processor = AutoProcessor.from_pretrained(folder)           # once minimind_v is imported
    model = AutoModelForImageTextToText.from_pretrained(folder)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "<image>\\nWhat colour is the circle?"}], add_generation_prompt=True)
    inputs = processor(images=[picture], text=prompt, return_tensors="pt")
    model.generate(**inputs, max_new_tokens=8)   # the encoder config.json names is loaded on first use

``processor.save_pretrained(folder)`` writes ``processor_config.json`` (the image processor's
settings and ``num_image_tokens``), the tokenizer files and ``chat_template.jinja``; JSON and
text only, so loading runs no code from the folder. A folder saved before processors existed
(no ``processor_config.json``) is read from its tokenizer and the vision encoder its
``config.json`` names. Only local folders are read: nothing is fetched from the hub.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from ..config import MiniMindConfig
from ..tokenizer import (CHAT_TEMPLATE, IMAGE_TAG, IMAGE_TOKEN, conversations_to_messages, has_image_token,
                         image_placeholder, load_tokenizer)
from .chat_inputs import as_rgb, blocks_to_text, flatten_pictures, match_pictures, pad_rows, with_image_tags
from .image_processing import (PREPROCESSING_MODES, Preprocessor, encoder_preprocessing, image_processor_from_dict,
                               load_image_processor, saved_preprocessing)
from .llm import MiniMindForCausalLM
from .vlm import MiniMindVLM, VLMConfig, resolve_vision_model

PROCESSOR_CONFIG = "processor_config.json"


class MiniMindVProcessor(ProcessorMixin):
    """Image processor + tokenizer + chat template of a MiniMind-V model.

    ``processor(images=..., text=...)``: ``text`` is one prompt or a list of prompts (already
    rendered, e.g. by ``apply_chat_template``), each with one ``<image>`` tag per picture;
    ``images`` is None (the placeholders stay empty: the text-only baseline), a flat list with
    one picture per tag of the whole batch, or one list of pictures per prompt. A picture is a
    PIL image (any mode) or an image file path. Returns ``input_ids``, ``attention_mask`` and,
    with pictures, ``pixel_values``; ``padding=True`` pads to the longest prompt on
    ``padding_side`` ("left" for generation). ``preprocessing`` is the vision encoder's mode:
    "center_crop" (CLIP's) or "resize" (v1's whole-picture resize).
    """

    image_token = IMAGE_TAG  # what marks a picture in the text; expanded to the placeholder ids

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_image_tokens: int = 50,
                 preprocessing: str = "center_crop"):
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be a positive int, got {num_image_tokens!r}")
        if preprocessing not in PREPROCESSING_MODES:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING_MODES}, got {preprocessing!r}")
        if chat_template is None and tokenizer is not None:
            chat_template = tokenizer.chat_template or CHAT_TEMPLATE
        self.num_image_tokens = num_image_tokens
        self.preprocessing = preprocessing
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    # ----------------------------------------------------------------- building one

    @classmethod
    def from_encoder(cls, tokenizer, encoder, chat_template=None) -> "MiniMindVProcessor":
        """The processor of a model that sees through ``encoder`` (a ``VisionEncoder``): its image
        processor (the very object) and preprocessing mode, so the pixels are the encoder's own, and
        its token count."""
        return cls(encoder.processor, tokenizer, chat_template=chat_template, num_image_tokens=encoder.num_tokens,
                   preprocessing=encoder_preprocessing(encoder))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, image_processor=None, tokenizer=None,
                        preprocessing: str | None = None, **kwargs):
        """The processor of a local MiniMind-V folder (what ``AutoProcessor.from_pretrained`` calls).

        Reads ``processor_config.json`` when the folder has one; an older folder without it is read
        from its tokenizer and the vision encoder its ``config.json`` names (a folder inside it, a
        local folder or a cached hub id). ``image_processor`` / ``tokenizer`` / ``preprocessing``
        replace the folder's. Hub download options are accepted and unused: only local folders are read.
        """
        folder = Path(os.fspath(pretrained_model_name_or_path)).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"no MiniMind-V folder at {folder}: the processor is read from a local "
                                    "model folder only (nothing is fetched from the hub)")
        config = _folder_config(folder)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(folder)
        saved = folder / PROCESSOR_CONFIG
        num_image_tokens, saved_mode = None, None
        if saved.is_file():
            try:
                settings = json.loads(saved.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as err:
                raise ValueError(f"{saved} is not readable JSON ({err}): the folder's processor settings are "
                                 "damaged (delete the file to rebuild them from the tokenizer and the encoder)"
                                 ) from None
            if not isinstance(settings, dict):
                raise ValueError(f"{saved} holds a JSON {type(settings).__name__}, not processor settings")
            num_image_tokens = settings.get("num_image_tokens")
            saved_mode = settings.get("preprocessing")
            if image_processor is None:
                image_processor = image_processor_from_dict(settings.get("image_processor"), saved)
        model_tokens = config.get("num_image_tokens", 50)
        if num_image_tokens is not None and num_image_tokens != model_tokens:
            raise ValueError(f"{saved} says num_image_tokens={num_image_tokens}, but the model's config.json says "
                             f"{model_tokens}: the processor and the model of this folder do not belong together")
        num_image_tokens = model_tokens
        encoder_source = resolve_vision_model(folder, config.get("vision_model", ""))
        if image_processor is None:
            image_processor = load_image_processor(encoder_source)
        preprocessing = preprocessing or saved_mode or _saved_encoder_preprocessing(encoder_source) or \
            config.get("vision_preprocessing") or "center_crop"
        return cls(image_processor, tokenizer, chat_template=tokenizer.chat_template,
                   num_image_tokens=int(num_image_tokens), preprocessing=preprocessing)

    # ----------------------------------------------------------------- the placeholder

    @property
    def placeholder_ids(self) -> list[int]:
        """The ``num_image_tokens`` ids that stand for one picture (the model's ``image_token_ids``)."""
        return image_placeholder(self.tokenizer, self.num_image_tokens)[1]

    @property
    def image_token_id(self) -> int | None:
        """The placeholder token's id (``<|image|>``), or None for a tokenizer without one."""
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if has_image_token(self.tokenizer) else None

    # ----------------------------------------------------------------- chat template

    def apply_chat_template(self, conversation, chat_template: str | None = None, add_generation_prompt: bool = False,
                            tokenize: bool = False, return_dict: bool = False, return_tensors=None,
                            processor_kwargs: dict | None = None, **kwargs):
        """Render one conversation (a list of turns) or a batch of them with the chat template.

        Turns are ``{"role": "system"|"user"|"assistant", "content"}`` or the dataset's
        ``{"from": "system"|"human"|"gpt", "value"}``; system turns first, then user and assistant
        alternate. ``content`` is a string (``<image>`` tags in it stay, for ``__call__`` to
        expand) or a list of blocks: ``{"type": "text", "text"}`` and ``{"type": "image"}`` (the
        picture, if given, under "image" or "path": a PIL image or a local file), which becomes an
        ``<image>`` tag, followed by "\\n" when text comes after it (the training data's layout).
        Turn text may not contain the tokenizer's special tokens (ValueError naming the turn).

        ``tokenize=True`` also runs ``__call__`` on the rendered text with the pictures found in
        the blocks (or ``processor_kwargs["images"]``): input ids, or the whole BatchFeature with
        ``return_dict=True``.
        """
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and \
            isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        template = self._resolve_chat_template(chat_template)
        texts, pictures = [], []
        for turns in conversations:
            messages, found = self.chat_messages(turns)
            texts.append(self.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt,
                **kwargs))
            pictures.append(found)
        if not tokenize:
            return texts if batched else texts[0]
        call_kwargs = dict(processor_kwargs or {})
        given = call_kwargs.pop("images", None)
        if given is None and any(pictures):
            given = pictures
        out = self(images=given, text=texts, return_tensors=return_tensors, **call_kwargs)
        return out if return_dict else out["input_ids"]

    def chat_messages(self, turns: Sequence[dict]) -> tuple[list[dict], list]:
        """(messages with string content, the pictures found in image blocks, in order); checks the
        turn order and types (``conversations_to_messages``) and refuses special-token text."""
        flat, pictures = [], []
        for i, turn in enumerate(turns):
            if isinstance(turn, dict) and isinstance(turn.get("content"), (list, tuple)):
                turn = {**turn, "content": blocks_to_text(turn["content"], pictures, i)}
            flat.append(turn)
        messages = conversations_to_messages(flat)
        special = [t for t in self.tokenizer.all_special_tokens if t]
        for i, message in enumerate(messages):
            clashes = [t for t in special if t in message["content"]]
            if clashes:  # they would be read as control tokens and break the chat structure
                raise ValueError(f"turn {i} contains the special token text {clashes}")
        return messages, pictures

    def question_ids(self, question: str, num_pictures: int | None = None) -> list[int]:
        """The generation prompt of one user question: its ids, up to where the answer begins. A
        question without ``<image>`` tags gets one per picture in front (``num_pictures``, default
        one). ValueError for special-token text in the question."""
        text = self.apply_chat_template([{"role": "user", "content": with_image_tags(question, num_pictures)}],
                                        add_generation_prompt=True)
        return self.encode_prompts([text])[0]

    # ----------------------------------------------------------------- text and pictures -> inputs

    def __call__(self, images=None, text=None, *, padding: bool | str = False, padding_side: str | None = None,
                 return_tensors=None, return_attention_mask: bool = True, add_special_tokens: bool = False,
                 **kwargs) -> BatchFeature:
        """Prompts with ``<image>`` tags (and their pictures) -> input_ids, attention_mask, pixel_values."""
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(kwargs)}")
        if add_special_tokens:
            raise ValueError("the chat template writes <s> and </s> itself: add_special_tokens=True is not supported")
        if text is None:
            if images is None:
                raise ValueError("give text (prompts with <image> tags), images, or both")
            return BatchFeature({"pixel_values": self.pixel_values(flatten_pictures(images))},
                                tensor_type=return_tensors)
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
        flat = None if images is None else match_pictures(texts, images)
        rows = self.encode_prompts(texts)
        data = {"input_ids": rows}
        if padding in (True, "longest"):
            side = padding_side or getattr(self.tokenizer, "padding_side", "right")
            data["input_ids"], mask = pad_rows(rows, self.tokenizer.pad_token_id or 0, side)
            if return_attention_mask:
                data["attention_mask"] = mask
        elif padding not in (False, None, "do_not_pad"):
            raise ValueError(f"padding must be True, 'longest' or False, got {padding!r}")
        elif return_attention_mask:
            data["attention_mask"] = [[1] * len(r) for r in rows]
        if return_tensors is not None and padding not in (True, "longest") and len({len(r) for r in rows}) > 1:
            raise ValueError("prompts of different lengths need padding=True to become one tensor")
        if flat:
            data["pixel_values"] = self.pixel_values(flat)
        return BatchFeature(data, tensor_type=return_tensors)

    def encode_prompts(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids: the text between ``<image>`` tags tokenized piece by piece (one batched
        call), each tag replaced by the placeholder ids; no special tokens added."""
        segments = [t.split(IMAGE_TAG) for t in texts]
        pieces = [piece for parts in segments for piece in parts]
        encoded = iter(self.tokenizer(pieces, add_special_tokens=False).input_ids if pieces else [])
        placeholder = self.placeholder_ids if any(len(parts) > 1 for parts in segments) else []
        rows = []
        for parts in segments:
            row = list(next(encoded))
            for _ in parts[1:]:
                row += placeholder
                row += next(encoded)
            rows.append(row)
        return rows

    def pixel_values(self, pictures: Sequence) -> torch.Tensor:
        """Pictures (PIL images of any mode, or image file paths) -> (n, 3, S, S) float32, as the
        vision encoder's ``preprocess`` makes them."""
        rgb = [as_rgb(picture, i) for i, picture in enumerate(pictures)]
        size = self.image_processor.crop_size
        if not rgb:
            return torch.empty(0, 3, size["height"], size["width"])
        if self.preprocessing == "resize":  # the encoder's own whole-picture resize
            return Preprocessor(self.image_processor, "resize", size["height"])(rgb)
        # resize shortest side -> centre crop S x S -> scale to [0, 1] -> normalise per channel
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]



def _saved_encoder_preprocessing(name_or_path: str) -> str | None:
    """The mode a local encoder folder records (vision_preprocessing.json), if it records one."""
    return saved_preprocessing(name_or_path) if Path(name_or_path).is_dir() else None


def _folder_config(folder: Path) -> dict:
    """config.json of a MiniMind-V folder; ModelFolderError saying what the folder is otherwise."""
    from .folders import ModelFolderError, describe_model_type, read_folder_config

    config = read_folder_config(folder, "MiniMind-V folder")
    if config.get("model_type") != VLMConfig.model_type:
        raise ModelFolderError(f"{folder} is {describe_model_type(config.get('model_type'))}, not a MiniMind-V folder: "
                               "there is no processor to read from it")
    return config


def save_processor(folder: str | os.PathLike, tokenizer=None, model: MiniMindVLM | None = None) -> MiniMindVProcessor:
    """Write the processor files into a saved MiniMind-V folder (after ``model.save_pretrained``):
    ``processor_config.json``, the tokenizer and ``chat_template.jinja``. The image processor is
    the attached encoder's when ``model`` has one, else read from the encoder ``config.json`` names."""
    folder = Path(folder)
    encoder = getattr(model, "vision_encoder", None) if model is not None else None
    processor = MiniMindVProcessor.from_pretrained(
        folder, tokenizer=tokenizer, image_processor=None if encoder is None else encoder.processor,
        preprocessing=None if encoder is None else encoder_preprocessing(encoder))
    processor.save_pretrained(folder)
    return processor


# --------------------------------------------------------------------- the Auto classes


def register_auto_classes() -> None:
    """Make ``AutoConfig``, ``AutoModelForCausalLM``, ``AutoModelForImageTextToText`` and
    ``AutoProcessor`` know the model types ``minimind`` and ``minimind_v`` (no remote code)."""
    AutoConfig.register(MiniMindConfig.model_type, MiniMindConfig, exist_ok=True)
    AutoConfig.register(VLMConfig.model_type, VLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)
    AutoModelForCausalLM.register(VLMConfig, MiniMindVLM, exist_ok=True)
    AutoModelForImageTextToText.register(VLMConfig, MiniMindVLM, exist_ok=True)
    AutoProcessor.register(VLMConfig, MiniMindVProcessor, exist_ok=True)
