"""Training samples from either layout of the MiniMind-V data, through one code path.

- The v1 JSON layout: a JSON list of records ``{"id", "image", "conversations": [{"from":
  "human", "value": "...<image>..."}, {"from": "gpt", "value": "..."}, ...]}`` and an image
  folder (:class:`ChatDataset`).
- The parquet layout the original publishes since 2025-12-27: rows with ``conversations`` (a
  JSON string of ``{"role", "content"}`` turns) and ``image_bytes`` (the encoded picture, or a
  list of them) in one file or a folder of shards (:class:`~minimind_v.data.parquet.ParquetChatDataset`).

:func:`open_chat_dataset` picks the class from what the path is. Either way a sample is token
ids, labels that carry a loss on the assistant answers only, and its pictures, in the order of
their ``<image>`` tags: pixels ``(n_images, 3, S, S)``, the frozen encoder's patch tokens from
the feature cache ``(n_images, N, width)``, or None for a sample without a picture. Batches are
padded to their longest sample, not to a fixed length; their pictures are stacked in order with
a count per sample (the model fills the placeholders in that order, row by row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..tokenizer import IGNORE_INDEX, IMAGE_TAG, _chat_pieces, image_placeholder
from .images import ImageError, load_image
from .records import (NO_TARGETS, NOT_CACHED, TOO_LONG, UNENCODABLE, UNREADABLE_IMAGE, DataError, Skipped,
                      check_record, find_image, image_name_candidates, read_records, skip_summary)

__all__ = ["Batch", "ChatDataset", "DataError", "Sample", "Skipped", "check_record", "collate", "encode_messages",
           "open_chat_dataset", "read_records", "resolve_data", "skip_summary"]

# The original's parquet file for each of the v1 JSON files (the shapes world writes the same names).
PARQUET_NAMES = {"pretrain_data.json": "pretrain_i2t.parquet", "sft_data.json": "sft_i2t.parquet",
                 "eval_data.json": "eval_i2t.parquet"}


@dataclass
class Sample:
    id: str
    input_ids: torch.Tensor  # (T,)
    labels: torch.Tensor  # (T,), IGNORE_INDEX outside the answers
    image: torch.Tensor | None  # (n, 3, S, S) pixels, (n, N, width) cached patch tokens, or None (no picture)
    problem: Skipped | None = None  # set (skip_bad_samples only) when the sample failed when drawn: collate drops it

    @property
    def n_images(self) -> int:
        return 0 if self.image is None else int(self.image.shape[0])


def encode_messages(tokenizer, messages: Sequence[dict], num_image_tokens: int,
                    record_id=None) -> tuple[list[int], list[int], list[int]]:
    """Chat messages ``[{"role": "system"|"user"|"assistant", "content"}]`` -> (input_ids, labels,
    image_starts): every ``<image>`` tag becomes ``num_image_tokens`` placeholder ids (image_starts:
    where each begins, in order), labels carry the answers (text + </s>) and IGNORE_INDEX elsewhere.

    The same ids as :func:`minimind_v.tokenizer.encode_chat` for a conversation with one picture
    (each answer and each placeholder tokenized as its own piece, the rest as one string), and
    also for several pictures and a system turn. ``num_image_tokens=0``: no tag allowed.
    Raises ValueError (naming the record) for special-token text inside a turn.
    """
    where = "" if record_id is None else f"record {record_id!r}: "
    special_strings = [t for t in tokenizer.all_special_tokens if t]
    n_tags = 0
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            clashes = [t for t in special_strings if t in content]
            if clashes:  # they would be read as control tokens and break the chat structure
                raise ValueError(f"{where}turn {i} contains the special token text {clashes}")
            n_tags += content.count(IMAGE_TAG)
    if n_tags and not num_image_tokens:
        raise ValueError(f"{where}num_image_tokens=0 (text-only) but the conversation has {n_tags} "
                         f"{IMAGE_TAG!r} tag(s)")
    if n_tags:
        placeholder_text, placeholder_ids = image_placeholder(tokenizer, num_image_tokens)

    pieces: list[list] = []  # [text, "text" | "image" | "answer"]; adjacent text pieces merge

    def add(text: str, kind: str) -> None:
        if kind == "text" and pieces and pieces[-1][1] == "text":
            pieces[-1][0] += text
        elif text:
            pieces.append([text, kind])

    for text, is_answer in _chat_pieces(messages, add_generation_prompt=False):
        if is_answer:
            add(text, "answer")
        elif n_tags and IMAGE_TAG in text:
            parts = text.split(IMAGE_TAG)
            add(parts[0], "text")
            for part in parts[1:]:
                add(placeholder_text, "image")
                add(part, "text")
        else:
            add(text, "text")

    to_encode = [text for text, kind in pieces if kind != "image"]
    encoded = iter(tokenizer(to_encode, add_special_tokens=False).input_ids if to_encode else [])
    input_ids: list[int] = []
    labels: list[int] = []
    starts: list[int] = []
    for text, kind in pieces:
        if kind == "image":
            starts.append(len(input_ids))
            ids = placeholder_ids
        else:
            ids = next(encoded)
        input_ids.extend(ids)
        labels.extend(ids if kind == "answer" else [IGNORE_INDEX] * len(ids))
    return input_ids, labels, starts


class ChatSamples(Dataset):
    """What both layouts share: turning checked chat messages into ids and labels (answers only,
    cut to max_length, never inside the prompt or a picture), and dropping failed samples."""

    num_image_tokens: int
    text_only: bool
    skip_bad_samples: bool
    max_length: int

    def _where(self, rid: str) -> str:
        raise NotImplementedError

    def _encode_messages(self, rid: str, messages: list[dict], tokenizer, n_images: int, source: str,
                         where: str | None = None) -> tuple[list[int], list[int], int]:
        """(ids, labels, pictures kept) of one conversation; DataError (naming it) if unusable."""
        where = where or self._where(rid)
        if self.text_only:  # the words without the picture: drop the tags, learn every token
            messages = [{**m, "content": m["content"].replace(IMAGE_TAG, "").strip()} for m in messages]
        try:
            ids, labels, starts = encode_messages(tokenizer, messages, self.num_image_tokens, record_id=rid)
        except ValueError as e:
            raise DataError(f"{e} (in {source})", UNENCODABLE, rid) from None
        if self.text_only:
            labels = list(ids)
        kept = len(starts)
        max_length = self.max_length
        if len(ids) > max_length:  # cut the tail, but never into the prompt (and its pictures)
            first_answer = next((i for i, l in enumerate(labels) if l != IGNORE_INDEX), len(ids))
            if first_answer >= max_length - 1:
                raise DataError(f"{where}: its prompt alone is {first_answer} tokens, "
                                f"longer than max_length={max_length}", TOO_LONG, rid)
            cut = max_length
            # A picture whose placeholders do not fit whole is left out with the rest of the tail.
            kept = sum(start + self.num_image_tokens <= cut for start in starts)
            if kept < len(starts):
                cut = starts[kept]
            ids, labels = ids[:cut], labels[:cut]
        if not any(l != IGNORE_INDEX for l in labels[1:]):
            raise DataError(f"{where} has no answer tokens to learn from", NO_TARGETS, rid)
        return ids, labels, kept if n_images else 0

    def _failed(self, rid: str, error: DataError) -> Sample:
        """The sample that stands for one that failed when drawn (skip_bad_samples): collate drops it."""
        empty = torch.zeros(0, dtype=torch.long)
        return Sample(rid, empty, empty.clone(), None, Skipped.from_error(error, rid))


class ChatDataset(ChatSamples):
    """Conversations about images in the v1 JSON layout (or, with ``num_image_tokens=0``, plain text).

    images come from ``image_dir`` through ``preprocess`` (list of PIL -> (n, 3, S, S)), or from
    ``feature_cache`` (a :class:`~minimind_v.data.features.FeatureCache`) when given. A record's
    picture is ``image_dir/<image>`` or, the original's SFT naming, ``image_dir/COCO_train2014_<image>``;
    ``image`` may be a list of names, one ``<image>`` tag each.
    ``text_only=True`` drops the image tags and trains on every token (the LM's pretraining text).
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
        self.max_length = max_length
        self.skip_bad_samples = skip_bad_samples
        self.skipped: list[Skipped] = []
        uses_images = not text_only and num_image_tokens > 0
        if uses_images and feature_cache is None and (image_dir is None or preprocess is None):
            raise ValueError("an image dataset needs image_dir and preprocess, or a feature_cache")

        # (id, picture names in tag order (None: no picture), ids, labels)
        self.items: list[tuple[str, tuple | None, list[int], list[int]]] = []
        for index, record in enumerate(read_records(self.json_path) if records is None else records):
            try:
                checked = check_record(record, index, self.json_path, need_image=uses_images,
                                       image_dir=self.image_dir, image_tags="one" if uses_images else "any")
                ids, labels, kept = self._encode_messages(checked.id, checked.messages, tokenizer,
                                                          len(checked.images), str(self.json_path))
                self.items.append((checked.id, tuple(checked.images[:kept]) or None, ids, labels))
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

    def _drop_unreadable_images(self):
        """Open every image once (or look it up in the cache) and drop the records whose fail."""
        kept = []
        for item in tqdm(self.items, desc=f"checking images of {self.json_path.name}", leave=False):
            try:
                for name in item[1] or ():
                    if self.feature_cache is not None:
                        self._cached_tokens(item[0], name, check_only=True)
                    else:
                        self._read_picture(item[0], name)
                kept.append(item)
            except DataError as e:
                self.skipped.append(Skipped.from_error(e))
        self.items = kept

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        rid, names, ids, labels = self.items[index]
        image, problem = None, None
        if names:
            try:
                image = self.load_image_input(rid, names)
            except DataError as e:
                if not self.skip_bad_samples:
                    raise
                problem = Skipped.from_error(e)  # the file broke after the check: drop it from its batch
        return Sample(rid, torch.tensor(ids), torch.tensor(labels), image, problem)

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

    def _cached_tokens(self, rid: str, image_name: str, check_only: bool = False):
        cache = self.feature_cache
        for name in image_name_candidates(image_name):  # as stored: plain, or the original SFT naming
            if name in cache:
                return None if check_only else cache[name]
        for name in image_name_candidates(image_name):
            reason = cache.unreadable.get(name)
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
    # Every picture of the batch, sample by sample in tag order: (n, 3, S, S) pixels or (n, N, width)
    # tokens; None when no sample has one. (With one picture per sample, n == B.)
    images: torch.Tensor | None
    dropped: list[Skipped] = field(default_factory=list)  # samples left out: they failed when drawn
    image_counts: torch.Tensor | None = None  # (B,) pictures of each sample (0: text only)

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(self.ids, move(self.input_ids), move(self.attention_mask), move(self.labels),
                     move(self.images), self.dropped, self.image_counts)

    @property
    def n_targets(self) -> int:
        """Tokens that carry a loss (after the model's one-position shift)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate(samples: Sequence[Sample], pad_id: int = 0) -> Batch:
    """Pad to the batch's longest sample, on the right (training needs no left alignment); stack
    every picture in order, with the number of pictures of each sample in ``Batch.image_counts``.

    Samples that failed when drawn (``skip_bad_samples``) are left out and listed in
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
    pictures = [s.image for s in samples if s.image is not None and len(s.image)]
    images = torch.cat(pictures) if pictures else None
    counts = torch.tensor([s.n_images for s in samples], dtype=torch.long)
    return Batch([s.id for s in samples], input_ids, mask, labels, images, dropped, counts)


# ----------------------------------------------------------------------------- either layout


def is_parquet_source(path: str | Path) -> bool:
    """A .parquet file, or a folder holding .parquet files (shards) and no JSON records file."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".parquet"
    return path.is_dir() and any(path.rglob("*.parquet"))


def resolve_data(data: str | Path, json_name: str = "sft_data.json",
                 image_dir_name: str = "sft_images") -> tuple[Path, Path | None]:
    """What ``--data`` points at -> (records path, image folder or None for parquet).

    - a ``.parquet`` file, or a folder of parquet shards: that (pictures are inside the rows);
    - a folder holding ``json_name``: the v1 JSON layout, with ``image_dir_name`` beside it;
    - a folder holding the original's parquet file for that JSON name (``sft_i2t.parquet`` for
      ``sft_data.json``, ``pretrain_i2t.parquet`` for ``pretrain_data.json``): that file;
    - a ``.json`` file: it, with ``image_dir_name`` beside it.
    """
    data = Path(data)
    if data.is_file():
        if data.suffix == ".parquet":
            return data, None
        return data, data.parent / image_dir_name
    if not data.is_dir():
        raise FileNotFoundError(f"no dataset at {data}: expected a folder or a .parquet file")
    if (data / json_name).exists():
        return data / json_name, data / image_dir_name
    parquet_name = PARQUET_NAMES.get(json_name)
    if parquet_name and (data / parquet_name).exists():
        return data / parquet_name, None
    if any(p.suffix == ".parquet" for p in data.iterdir()) and not any(
            (data / name).exists() for name in PARQUET_NAMES.values()):
        return data, None  # a folder of shards
    raise FileNotFoundError(
        f"{data} holds neither {json_name} (the JSON layout) nor {parquet_name or 'a parquet file'} "
        f"(the parquet layout), nor is it a folder of .parquet shards")


def open_chat_dataset(
    path: str | Path,
    tokenizer,
    num_image_tokens: int = 0,
    image_dir: str | Path | None = None,
    preprocess: Callable | None = None,
    feature_cache=None,
    max_length: int = 1024,
    text_only: bool = False,
    skip_bad_samples: bool = False,
    records: Sequence[dict] | None = None,
    rows: Sequence[int] | None = None,
):
    """The training dataset of ``path``: a :class:`~minimind_v.data.parquet.ParquetChatDataset` for a
    .parquet file or a folder of shards (pictures in the rows; ``rows`` picks a subset), else a
    :class:`ChatDataset` for a JSON records file (pictures in ``image_dir``; ``records`` replaces
    the file's). Same samples, batches and errors either way."""
    if is_parquet_source(path):
        from .parquet import ParquetChatDataset

        if records is not None:
            raise ValueError("records= is for the JSON layout; pick parquet rows with rows=")
        return ParquetChatDataset(path, tokenizer, num_image_tokens, preprocess=preprocess,
                                  feature_cache=feature_cache, max_length=max_length, text_only=text_only,
                                  skip_bad_samples=skip_bad_samples, rows=rows)
    if rows is not None:
        raise ValueError("rows= is for the parquet layout; pick JSON records with records=")
    return ChatDataset(path, tokenizer, num_image_tokens, image_dir=image_dir, preprocess=preprocess,
                       feature_cache=feature_cache, max_length=max_length, text_only=text_only,
                       skip_bad_samples=skip_bad_samples, records=records)

