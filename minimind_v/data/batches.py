"""What a dataset hands the trainer: one :class:`Sample` per conversation, and :func:`collate`,
which pads samples to a :class:`Batch`.

A sample is token ids, labels that carry a loss on the assistant answers only, and its pictures,
in the order of their ``<image>`` tags: pixels ``(n_images, 3, S, S)``, the frozen encoder's patch
tokens from the feature cache ``(n_images, N, width)``, or None for a sample without a picture.
Batches are padded to their longest sample, not to a fixed length; their pictures are stacked in
order with a count per sample (the model fills the placeholders in that order, row by row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..tokenizer import IGNORE_INDEX
from .records import Skipped


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


