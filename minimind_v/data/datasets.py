"""Training samples from the original MiniMind-V layout: a JSON list of conversations + an image folder.

Each record ``{"id", "image", "conversations": [{"from": "human", "value": "...<image>..."},
{"from": "gpt", "value": "..."}, ...]}`` becomes token ids, labels that carry a loss on the
assistant answers only, and its picture: pixels from the image file, or the frozen encoder's
patch tokens from the feature cache. Batches are padded to their longest sample, not to a
fixed length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..tokenizer import IGNORE_INDEX, IMAGE_TAG, encode_chat
from .images import ImageError, load_image
from .records import (NO_TARGETS, NOT_CACHED, TOO_LONG, UNENCODABLE, UNREADABLE_IMAGE, DataError, Skipped,
                      check_record, confined_image_path, read_records, skip_summary)

__all__ = ["Batch", "ChatDataset", "DataError", "Sample", "Skipped", "check_record", "collate", "read_records",
           "skip_summary"]


@dataclass
class Sample:
    id: str
    input_ids: torch.Tensor  # (T,)
    labels: torch.Tensor  # (T,), IGNORE_INDEX outside the answers
    image: torch.Tensor | None  # (3, S, S) pixels, (N, width) cached patch tokens, or None
    problem: Skipped | None = None  # set (skip_bad_samples only) when the picture failed: collate drops it


class ChatDataset(Dataset):
    """Conversations about images (or, with ``num_image_tokens=0``, plain text) as samples.

    images come from ``image_dir`` through ``preprocess`` (list of PIL -> (n, 3, S, S)), or from
    ``feature_cache`` (a :class:`~minimind_v.data.features.FeatureCache`) when given.
    ``text_only=True`` drops the image tag and trains on every token (the LM's pretraining text).
    Bad records raise :class:`DataError` naming the record and the file. ``skip_bad_samples=True``
    drops them (and records whose picture cannot be read) and keeps every one in ``self.skipped``
    (:class:`Skipped`: id, kind, message; ``self.skip_summary()`` for a log line); a picture that
    fails only when drawn later is dropped from its batch by :func:`collate` (``Batch.dropped``).
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
        self.skip_bad_samples = skip_bad_samples
        self.skipped: list[Skipped] = []
        uses_images = not text_only and num_image_tokens > 0
        if uses_images and feature_cache is None and (image_dir is None or preprocess is None):
            raise ValueError("an image dataset needs image_dir and preprocess, or a feature_cache")

        self.items: list[tuple[str, str | None, list[int], list[int]]] = []
        for index, record in enumerate(read_records(self.json_path) if records is None else records):
            try:
                checked = check_record(record, index, self.json_path, need_image=uses_images,
                                       image_dir=self.image_dir, image_tags="one" if uses_images else "any")
                self.items.append(self._encode(checked, tokenizer, max_length))
            except DataError as e:
                if not skip_bad_samples:
                    raise
                self.skipped.append(Skipped.from_error(e))
        if skip_bad_samples and uses_images:
            self._drop_unreadable_images()
        if not self.items:
            raise DataError(f"{self.json_path} holds no usable record"
                            + (f"; {skip_summary(self.skipped)}" if self.skipped else ""))

    def skip_summary(self, examples: int = 5) -> str:
        """How many records were skipped, for each reason, and the first few by name."""
        return skip_summary(self.skipped, examples=examples)

    def _where(self, rid: str) -> str:
        return f"record {rid!r} in {self.json_path}"

    def _encode(self, checked, tokenizer, max_length):
        rid, turns = checked.id, checked.turns
        if self.text_only:  # the words without the picture: drop the tag, learn every token
            turns = [{**t, "value": t["value"].replace(IMAGE_TAG, "").strip()} for t in turns]
        try:
            ids, labels = encode_chat(tokenizer, turns, self.num_image_tokens, record_id=rid)
        except ValueError as e:
            raise DataError(f"{e} (in {self.json_path})", UNENCODABLE, rid) from None
        if self.text_only:
            labels = list(ids)
        if len(ids) > max_length:  # cut the tail, but never into the prompt (and its image)
            first_answer = next((i for i, l in enumerate(labels) if l != IGNORE_INDEX), len(ids))
            if first_answer >= max_length - 1:
                raise DataError(f"{self._where(rid)}: its prompt alone is {first_answer} tokens, "
                                f"longer than max_length={max_length}", TOO_LONG, rid)
            ids, labels = ids[:max_length], labels[:max_length]
        if not any(l != IGNORE_INDEX for l in labels[1:]):
            raise DataError(f"{self._where(rid)} has no answer tokens to learn from", NO_TARGETS, rid)
        return rid, checked.image, ids, labels

    def _drop_unreadable_images(self):
        """Open every image once (or look it up in the cache) and drop the records whose fail."""
        kept = []
        for item in tqdm(self.items, desc=f"checking images of {self.json_path.name}", leave=False):
            try:
                if self.feature_cache is not None:
                    self._cached_tokens(item[0], item[1], check_only=True)
                else:
                    self._read_picture(item[0], item[1])
                kept.append(item)
            except DataError as e:
                self.skipped.append(Skipped.from_error(e))
        self.items = kept

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        rid, image_name, ids, labels = self.items[index]
        image, problem = None, None
        if image_name is not None:
            try:
                image = self.load_image_input(rid, image_name)
            except DataError as e:
                if not self.skip_bad_samples:
                    raise
                problem = Skipped.from_error(e)  # the file broke after the check: drop it from its batch
        return Sample(rid, torch.tensor(ids), torch.tensor(labels), image, problem)

    def load_image_input(self, rid: str, image_name: str) -> torch.Tensor:
        """The record's picture: cached patch tokens (N, width) or pixels (3, S, S); DataError if unusable."""
        if self.feature_cache is not None:
            return self._cached_tokens(rid, image_name)
        return self.preprocess([self._read_picture(rid, image_name)])[0]

    def _read_picture(self, rid: str, image_name: str):
        # Checked again at every read: the folder may have changed since the records were checked.
        path = confined_image_path(self.image_dir, image_name, self._where(rid), rid)
        try:
            return load_image(path)
        except ImageError as e:
            raise DataError(f"{self._where(rid)}: image {image_name!r}: {e}", UNREADABLE_IMAGE, rid) from None

    def _cached_tokens(self, rid: str, image_name: str, check_only: bool = False):
        cache = self.feature_cache
        if image_name in cache:
            return None if check_only else cache[image_name]
        reason = cache.unreadable.get(image_name)
        if reason is not None:
            raise DataError(f"{self._where(rid)}: image {image_name!r} could not be read when the feature "
                            f"cache {cache.cache_dir} was built: {reason}", UNREADABLE_IMAGE, rid)
        raise DataError(f"{self._where(rid)}: image {image_name!r} is not in the feature cache "
                        f"{cache.cache_dir}", NOT_CACHED, rid)


@dataclass
class Batch:
    ids: list[str]
    input_ids: torch.Tensor  # (B, T_max)
    attention_mask: torch.Tensor  # (B, T_max)
    labels: torch.Tensor  # (B, T_max)
    images: torch.Tensor | None  # (B, 3, S, S) or (B, N, width)
    dropped: list[Skipped] = field(default_factory=list)  # samples left out: their picture failed when drawn

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(self.ids, move(self.input_ids), move(self.attention_mask), move(self.labels),
                     move(self.images), self.dropped)

    @property
    def n_targets(self) -> int:
        """Tokens that carry a loss (after the model's one-position shift)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate(samples: Sequence[Sample], pad_id: int = 0) -> Batch:
    """Pad to the batch's longest sample, on the right (training needs no left alignment).

    Samples whose picture failed when drawn (``skip_bad_samples``) are left out and listed in
    ``Batch.dropped``; if none is left the batch has 0 rows (and 0 targets).
    """
    dropped = [s.problem for s in samples if s.problem is not None]
    samples = [s for s in samples if s.problem is None]
    width = max((len(s.input_ids) for s in samples), default=0)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):  # once per batch, while loading; not in the model's step
        n = len(s.input_ids)
        input_ids[i, :n], labels[i, :n], mask[i, :n] = s.input_ids, s.labels, 1
    images = torch.stack([s.image for s in samples]) if samples and samples[0].image is not None else None
    return Batch([s.id for s in samples], input_ids, mask, labels, images, dropped)
