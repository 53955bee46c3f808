"""Training samples from either layout of the MiniMind-V data, through one code path.

- The v1 JSON layout: a JSON list of records ``{"id", "image", "conversations": [{"from":
  "human", "value": "...<image>..."}, {"from": "gpt", "value": "..."}, ...]}`` and an image
  folder (:class:`ChatDataset`, here).
- The parquet layout the original publishes since 2025-12-27: rows with ``conversations`` (a
  JSON string of ``{"role", "content"}`` turns) and ``image_bytes`` (the encoded picture, or a
  list of them) in one file or a folder of shards (:class:`~minimind_v.data.parquet.ParquetChatDataset`).

:func:`~minimind_v.data.layouts.open_chat_dataset` picks the class from what the path is. Either
way a sample (:class:`~minimind_v.data.batches.Sample`) is token ids, labels that carry a loss on
the assistant answers only, and its pictures; :func:`~minimind_v.data.batches.collate` pads them
to a batch. Both datasets are lazy: start-up reads only what indexes the records, and a record is
checked, tokenised and its pictures read when it is drawn. The names other modules import from
here (Batch, collate, encode_messages, open_chat_dataset, ...) are re-exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from .batches import Batch, Sample, collate  # noqa: F401
from .chat_samples import ChatSamples, encode_messages  # noqa: F401
from .images import ImageError, load_image
from .layouts import PARQUET_NAMES, is_parquet_source, open_chat_dataset, resolve_data  # noqa: F401
from .records import (NOT_CACHED, UNREADABLE_IMAGE, DataError, Skipped, check_record, find_image,  # noqa: F401
                      image_name_candidates, read_records, record_id, skip_summary)

__all__ = ["Batch", "ChatDataset", "DataError", "Sample", "Skipped", "check_record", "collate", "encode_messages",
           "open_chat_dataset", "read_records", "resolve_data", "skip_summary"]


class ChatDataset(ChatSamples):
    """Conversations about images in the v1 JSON layout (or, with ``num_image_tokens=0``, plain text).

    images come from ``image_dir`` through ``preprocess`` (list of PIL -> (n, 3, S, S)), or from
    ``feature_cache`` (a :class:`~minimind_v.data.features.FeatureCache`) when given. A record's
    picture is ``image_dir/<image>`` or, the original's SFT naming, ``image_dir/COCO_train2014_<image>``;
    ``image`` may be a list of names, one ``<image>`` tag each.
    ``text_only=True`` drops the image tags and trains on every token (the LM's pretraining text).

    Start-up reads the records file and nothing else: a record is checked and tokenised, and its
    pictures read, when it is drawn (so start-up time and memory do not grow with the tokenising).
    A bad record raises :class:`DataError` naming it and the file when it is drawn. With
    ``skip_bad_samples=True`` it comes back as a failed sample that :func:`collate` drops
    (``Batch.dropped``) and is kept in ``self.skipped`` (:class:`Skipped`: id, kind, message;
    ``self.skip_summary()`` for a log line) of the process that drew it.
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
        self.tokenizer = tokenizer
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.preprocess, self.feature_cache = preprocess, feature_cache
        self.num_image_tokens = 0 if text_only else num_image_tokens
        self.text_only = text_only
        self.max_length = max_length
        self.skip_bad_samples = skip_bad_samples
        self.skipped: list[Skipped] = []  # records dropped when drawn, in this process
        self.uses_images = not text_only and num_image_tokens > 0
        if self.uses_images and feature_cache is None and (image_dir is None or preprocess is None):
            raise ValueError("an image dataset needs image_dir and preprocess, or a feature_cache")
        self.records = list(read_records(self.json_path) if records is None else records)
        # What indexes the records, and nothing more: each one's id (as errors name it) and position.
        self.items: list[tuple[str, int]] = [(record_id(r, i), i) for i, r in enumerate(self.records)]
        if not self.records:
            raise DataError(f"{self.json_path} holds no usable record: it holds no record at all")

    def skip_summary(self, examples: int = 5) -> str:
        """How many records were skipped, for each reason, and the first few by name."""
        return skip_summary(self.skipped, examples=examples)

    def _where(self, rid: str) -> str:
        return f"record {rid!r} in {self.json_path}"

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        index = index % len(self)
        rid = self.items[index][0]
        try:
            return self._sample(index)
        except DataError as error:
            if not self.skip_bad_samples:
                raise
            self.skipped.append(Skipped.from_error(error, rid))
            return self._failed(rid, error)

    def _sample(self, index: int) -> Sample:
        """Check, tokenise and read the pictures of record ``index``; DataError (naming it) if unusable."""
        checked = check_record(self.records[index], index, self.json_path, need_image=self.uses_images,
                               image_dir=self.image_dir, image_tags="one" if self.uses_images else "any")
        ids, labels, kept = self._encode_messages(checked.id, checked.messages, self.tokenizer,
                                                  len(checked.images), str(self.json_path))
        names = tuple(checked.images[:kept])
        image = self.load_image_input(checked.id, names) if names else None
        return Sample(checked.id, torch.tensor(ids), torch.tensor(labels), image)

    def load_image_input(self, rid: str, names) -> torch.Tensor:
        """The record's pictures: cached patch tokens (n, N, width) or pixels (n, 3, S, S); DataError if unusable."""
        names = (names,) if isinstance(names, str) else tuple(names)
        if self.feature_cache is not None:
            return torch.stack([self._cached_tokens(rid, name) for name in names])
        return self.preprocess([self._read_picture(rid, name) for name in names])

    def _read_picture(self, rid: str, image_name: str):
        # Found (and confined) again at every read: the folder may have changed since the check.
        path = find_image(self.image_dir, image_name, self._where(rid), rid)
        try:
            return load_image(path)
        except ImageError as e:
            raise DataError(f"{self._where(rid)}: image {image_name!r}: {e}", UNREADABLE_IMAGE, rid) from None

    def _cached_tokens(self, rid: str, image_name: str):
        cache = self.feature_cache
        for name in image_name_candidates(image_name):  # as stored: plain, or the original SFT naming
            if name in cache:
                return cache[name]
        for name in image_name_candidates(image_name):
            reason = cache.unreadable.get(name)
            if reason is not None:
                raise DataError(f"{self._where(rid)}: image {image_name!r} could not be read when the feature "
                                f"cache {cache.cache_dir} was built: {reason}", UNREADABLE_IMAGE, rid)
        raise DataError(f"{self._where(rid)}: image {image_name!r} is not in the feature cache "
                        f"{cache.cache_dir}", NOT_CACHED, rid)
