"""Chat messages -> token ids and labels, as both layouts' datasets train on them: every
``<image>`` tag becomes the picture's placeholder tokens, the answers carry the loss, a sample
too long is cut after its prompt (never inside it or a picture), and one that cannot be used is
a :class:`~minimind_v.data.records.DataError` naming it."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset

from ..tokenizer import IGNORE_INDEX, IMAGE_TAG, _chat_pieces, image_placeholder
from .batches import Sample
from .records import NO_TARGETS, TOO_LONG, UNENCODABLE, DataError, Skipped


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
