"""Training samples from the original MiniMind-V layout: a JSON list of conversations + an image folder.

Each record ``{"id", "image", "conversations": [{"from": "human", "value": "...<image>..."},
{"from": "gpt", "value": "..."}, ...]}`` becomes token ids, labels that carry a loss on the
assistant answers only, and its picture: pixels from the image file, or the frozen encoder's
patch tokens from the feature cache. Batches are padded to their longest sample, not to a
fixed length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..tokenizer import IGNORE_INDEX, IMAGE_TAG, encode_chat
from .images import ImageError, load_image


class DataError(ValueError):
    """A record that cannot become a training sample; the message names the record and file."""


def read_records(json_path: str | Path) -> list[dict]:
    """The JSON list of records, with a clear error for a missing or malformed file."""
    json_path = Path(json_path)
    if not json_path.exists():
        raise FileNotFoundError(f"dataset file {json_path} does not exist")
    try:
        records = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path} is not valid JSON: {e}") from None
    if not isinstance(records, list):
        raise DataError(f"{json_path} must hold a JSON list of records, got {type(records).__name__}")
    return records


def check_record(record, index: int, json_path, need_image: bool = True) -> None:
    """Raise DataError naming the record when a field is missing or of the wrong kind."""
    rid = record.get("id", f"#{index}") if isinstance(record, dict) else f"#{index}"
    where = f"record {rid!r} in {json_path}"
    if not isinstance(record, dict):
        raise DataError(f"{where} is a {type(record).__name__}, not an object")
    if need_image and not isinstance(record.get("image"), str):
        raise DataError(f"{where} has no 'image' file name")
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise DataError(f"{where} needs a 'conversations' list with a question and an answer")
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        raise DataError(f"{where}: every turn needs a string 'value'")
    if need_image and not any(IMAGE_TAG in t["value"] for t in turns):
        raise DataError(f"{where}: no turn holds the {IMAGE_TAG} tag (where does the picture go?)")


@dataclass
class Sample:
    id: str
    input_ids: torch.Tensor  # (T,)
    labels: torch.Tensor  # (T,), IGNORE_INDEX outside the answers
    image: torch.Tensor | None  # (3, S, S) pixels, (N, width) cached patch tokens, or None


class ChatDataset(Dataset):
    """Conversations about images (or, with ``num_image_tokens=0``, plain text) as samples.

    images come from ``image_dir`` through ``preprocess`` (list of PIL -> (n, 3, S, S)), or from
    ``feature_cache`` (a :class:`~minimind_v.data.features.FeatureCache`) when given.
    ``text_only=True`` drops the image tag and trains on every token (the LM's pretraining text).
    Bad records raise :class:`DataError`; ``skip_bad_samples=True`` drops them and counts them
    in ``self.skipped``.
    """

    def __init__(
        self,
        json_path: str | Path,
        tokenizer,
        num_image_tokens: int = 0,
        image_dir: str | Path | None = None,
        preprocess: Callable | None = None,
        feature_cache=None,
        max_length: int = 1024,
        text_only: bool = False,
        skip_bad_samples: bool = False,
        records: Sequence[dict] | None = None,
    ):
        self.json_path = Path(json_path)
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.preprocess, self.feature_cache = preprocess, feature_cache
        self.num_image_tokens = 0 if text_only else num_image_tokens
        self.text_only = text_only
        self.skipped: list[str] = []
        uses_images = not text_only and num_image_tokens > 0
        if uses_images and feature_cache is None and (image_dir is None or preprocess is None):
            raise ValueError("an image dataset needs image_dir and preprocess, or a feature_cache")

        self.items: list[tuple[str, str | None, list[int], list[int]]] = []
        for index, record in enumerate(read_records(self.json_path) if records is None else records):
            try:
                check_record(record, index, self.json_path, need_image=uses_images)
                self.items.append(self._encode(record, tokenizer, max_length, uses_images))
            except DataError as e:
                if not skip_bad_samples:
                    raise
                self.skipped.append(str(e))
        if skip_bad_samples and uses_images:
            self._drop_unreadable_images()
        if not self.items:
            raise DataError(f"{self.json_path} holds no usable record")

    def _encode(self, record, tokenizer, max_length, uses_images):
        rid = str(record.get("id"))
        turns = record["conversations"]
        if self.text_only:  # the words without the picture: drop the tag, learn every token
            turns = [{**t, "value": str(t.get("value", "")).replace(IMAGE_TAG, "").strip()} for t in turns]
        try:
            ids, labels = encode_chat(tokenizer, turns, self.num_image_tokens, record_id=rid)
        except ValueError as e:
            raise DataError(f"{e} (in {self.json_path})") from None
        if self.text_only:
            labels = list(ids)
        if len(ids) > max_length:  # cut the tail, but never into the prompt (and its image)
            first_answer = next((i for i, l in enumerate(labels) if l != IGNORE_INDEX), len(ids))
            if first_answer >= max_length - 1:
                raise DataError(f"record {rid!r} in {self.json_path}: its prompt alone is "
                                f"{first_answer} tokens, longer than max_length={max_length}")
            ids, labels = ids[:max_length], labels[:max_length]
        if not any(l != IGNORE_INDEX for l in labels[1:]):
            raise DataError(f"record {rid!r} in {self.json_path} has no answer tokens to learn from")
        return rid, record.get("image") if uses_images else None, ids, labels

    def _drop_unreadable_images(self):
        """Open every image once (or look it up in the cache) and drop the records whose fail."""
        kept = []
        for item in tqdm(self.items, desc=f"checking images of {self.json_path.name}", leave=False):
            rid, image, *_ = item
            if self.feature_cache is not None:
                problem = None if image in self.feature_cache else "is not in the feature cache"
            else:
                try:
                    load_image(self.image_dir / image)
                    problem = None
                except ImageError as e:
                    problem = str(e)
            if problem is None:
                kept.append(item)
            else:
                self.skipped.append(f"record {rid!r}: image {image!r} {problem}")
        self.items = kept

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        rid, image_name, ids, labels = self.items[index]
        image = None
        if image_name is not None:
            image = self.load_image_input(rid, image_name)
        return Sample(rid, torch.tensor(ids), torch.tensor(labels), image)

    def load_image_input(self, rid: str, image_name: str) -> torch.Tensor:
        if self.feature_cache is not None:
            if image_name not in self.feature_cache:
                raise DataError(f"record {rid!r}: image {image_name!r} is not in the feature cache "
                                f"{self.feature_cache.cache_dir}")
            return self.feature_cache[image_name]
        path = self.image_dir / image_name
        try:
            picture = load_image(path)
        except ImageError as e:
            raise DataError(f"record {rid!r}: {e}") from None
        return self.preprocess([picture])[0]


@dataclass
class Batch:
    ids: list[str]
    input_ids: torch.Tensor  # (B, T_max)
    attention_mask: torch.Tensor  # (B, T_max)
    labels: torch.Tensor  # (B, T_max)
    images: torch.Tensor | None  # (B, 3, S, S) or (B, N, width)

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(self.ids, move(self.input_ids), move(self.attention_mask), move(self.labels),
                     move(self.images))

    @property
    def n_targets(self) -> int:
        """Tokens that carry a loss (after the model's one-position shift)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate(samples: Sequence[Sample], pad_id: int = 0) -> Batch:
    """Pad to the batch's longest sample, on the right (training needs no left alignment)."""
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):  # once per batch, while loading; not in the model's step
        n = len(s.input_ids)
        input_ids[i, :n], labels[i, :n], mask[i, :n] = s.input_ids, s.labels, 1
    images = torch.stack([s.image for s in samples]) if samples[0].image is not None else None
    return Batch([s.id for s in samples], input_ids, mask, labels, images)
