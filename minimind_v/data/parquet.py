"""The original's parquet layout: conversations and their pictures in the same rows.

Since 2025-12-27 the original MiniMind-V publishes its data as parquet files
(``pretrain_i2t.parquet``, ~1.27M rows; ``sft_i2t.parquet``, ~2.9M rows). Each row holds

    conversations   a JSON string: [{"role": "user"|"assistant"|"system", "content": "...<image>..."}, ...]
    image_bytes     the encoded picture (JPEG, 256x256), or a list of them, one <image> tag each

A conversation without a picture (the original's ~230k text-only rows) carries an 8x8 black
placeholder picture and no ``<image>`` tag: it trains the decoder on text alone.

:class:`ParquetChatDataset` reads one such file or a folder of shards without loading it: the
files are memory-mapped, only their footers are read at start-up, a row group is read when one
of its rows is drawn (a few are kept, per process), and each sample's pictures are decoded and
its conversation tokenised when it is drawn. Start-up time and memory do not grow with the
number of rows. A bad row (malformed conversations, an ``<image>`` count that differs from its
pictures, a picture that cannot be decoded) raises a :class:`~minimind_v.data.records.DataError`
naming the file and the row when it is drawn; with ``skip_bad_samples`` it is dropped from its
batch and counted (``Batch.dropped``, ``dataset.skipped`` in the process that drew it).

The layout's vocabulary (columns, picture names) is in :mod:`.parquet_layout`, reading rows
without loading the files in :mod:`.parquet_rows`, writing files in :mod:`.parquet_writer`;
everything is importable from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .batches import Sample
from .chat_samples import ChatSamples
from .images import ImageError, decode_picture
from .parquet_layout import (CONVERSATIONS, DEFAULT_ROW_GROUP_SIZE, ID, IMAGE_BYTES,  # noqa: F401
                             PLACEHOLDER_MAX_SIDE, as_pictures, image_tag_count, is_placeholder_picture,
                             parquet_files, parse_conversations, parse_picture_key, picture_key)
from .parquet_rows import (ParquetIndex, ParquetPictures, RowGroupReader, dataset_picture_names,  # noqa: F401
                           iter_rows, parquet_records, row_id_and_where)
from .parquet_writer import (encode_picture, placeholder_picture, records_to_parquet,  # noqa: F401
                             write_chat_parquet)
from .records import IMAGE_TAGS, NOT_CACHED, UNREADABLE_IMAGE, DataError, Skipped, check_turns, skip_summary



class ParquetChatDataset(ChatSamples):
    """Samples from the original's parquet layout: a .parquet file or a folder of shards.

    Same samples, batches and labels as :class:`~minimind_v.data.datasets.ChatDataset`. A row's
    pictures go through ``preprocess`` (list of PIL -> (n, 3, S, S)), or come from ``feature_cache``
    under the names ``"<file>#<row>/<k>"`` (:func:`picture_key`). A row without an ``<image>``
    tag (and no picture, or the 8x8 placeholder) is a text-only sample (``image=None``).
    ``text_only=True`` drops the tags and trains every token (the LM's pretraining text).
    ``rows``: the global row numbers to use (default: all). ``Sample.id`` is the row's ``id``
    column when the file has one, else ``"<file>#<row>"``. ``cached_groups``: decoded row groups
    kept per process. ``memory_map``: map the files (the pages read then count in the process's
    resident set as shared, reclaimable file pages) or read them with ordinary reads.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer,
        num_image_tokens: int = 0,
        preprocess: Callable | None = None,
        feature_cache=None,
        max_length: int = 1024,
        text_only: bool = False,
        skip_bad_samples: bool = False,
        rows: Sequence[int] | None = None,
        cached_groups: int = 4,
        memory_map: bool = True,
    ):
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.preprocess, self.feature_cache = preprocess, feature_cache
        self.num_image_tokens = 0 if text_only else num_image_tokens
        self.text_only = text_only
        self.max_length = max_length
        self.skip_bad_samples = skip_bad_samples
        self.skipped: list[Skipped] = []  # rows dropped when drawn, in this process
        self.uses_images = not text_only and num_image_tokens > 0
        if self.uses_images and feature_cache is None and preprocess is None:
            raise ValueError("an image dataset needs preprocess, or a feature_cache")
        self.index = ParquetIndex(self.path)
        for file_path, columns in zip(self.index.files, self.index.columns):
            wanted = [CONVERSATIONS] + ([IMAGE_BYTES] if self.uses_images else [])
            missing = [c for c in wanted if c not in columns]
            if missing:
                raise DataError(f"{file_path} has no {missing[0]!r} column (it has {columns}); the parquet layout "
                                f"needs {CONVERSATIONS!r} (a JSON string) and {IMAGE_BYTES!r} (encoded pictures)")
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows is not None and len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= self.index.num_rows):
            raise IndexError(f"rows must be in [0, {self.index.num_rows}) for {self.path}")
        if len(self) == 0:
            raise DataError(f"{self.path} holds no rows")
        self.reader = RowGroupReader([CONVERSATIONS], cached_groups=cached_groups, memory_map=memory_map)

    # -- size and naming --------------------------------------------------------------------

    def __len__(self) -> int:
        return self.index.num_rows if self.rows is None else len(self.rows)

    def skip_summary(self, examples: int = 5) -> str:
        return skip_summary(self.skipped, examples=examples)

    def _where(self, rid: str) -> str:
        return f"row {rid!r} of {self.path}"

    def _columns(self, f: int) -> list[str]:
        columns = [CONVERSATIONS]
        if self.uses_images:
            columns.append(IMAGE_BYTES)
        if ID in self.index.columns[f]:
            columns.append(ID)
        return columns

    # -- reading ----------------------------------------------------------------------------

    def raw_row(self, index: int) -> dict:
        """The stored row ``index`` (of this dataset): {"file", "row", "id", "conversations",
        "image_bytes", ...} exactly as stored (conversations still a string)."""
        row = int(self.rows[index]) if self.rows is not None else int(index)
        f, group, local, file_row = self.index.locate(row)
        table = self.reader.group(self.index.files[f], group, self._columns(f))
        out = {"file": self.index.names[f], "file_index": f, "row": file_row}
        for name in table.column_names:
            out[name] = table.column(name)[local].as_py()
        return out

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index = index % len(self)
        raw = self.raw_row(index)
        rid, where = row_id_and_where(self.index, raw["file_index"], raw["row"], raw)
        try:
            return self._sample(raw, rid, where)
        except DataError as error:
            if not self.skip_bad_samples:
                raise
            self.skipped.append(Skipped.from_error(error, rid))
            return self._failed(rid, error)

    def _sample(self, raw: dict, rid: str, where: str) -> Sample:
        turns = parse_conversations(raw.get(CONVERSATIONS), where, rid)
        pictures = as_pictures(raw.get(IMAGE_BYTES)) if self.uses_images else []
        if self.uses_images:
            tags = image_tag_count(turns)
            if tags == 0 and len(pictures) == 1 and is_placeholder_picture(pictures[0]):
                pictures = []  # the original's text-only row: the placeholder is never looked at
            elif tags == 0 and pictures:
                raise DataError(f"{where}: no <image> tag but {len(pictures)} picture(s) (larger than the "
                                f"{PLACEHOLDER_MAX_SIDE}x{PLACEHOLDER_MAX_SIDE} text-only placeholder); "
                                f"each picture needs one tag", IMAGE_TAGS, rid)
        messages = check_turns(turns, where, rid, n_images=len(pictures),
                               image_tags="one" if self.uses_images else "any")
        ids, labels, kept = self._encode_messages(rid, messages, self.tokenizer, len(pictures),
                                                  str(self.index.root / raw["file"]), where)
        image = self._pictures(raw, pictures[:kept], rid, where) if kept else None
        return Sample(rid, torch.tensor(ids), torch.tensor(labels), image)

    def _pictures(self, raw: dict, pictures: list, rid: str, where: str) -> torch.Tensor:
        if self.feature_cache is not None:
            cache = self.feature_cache
            tokens = []
            for k in range(len(pictures)):
                key = picture_key(raw["file"], raw["row"], k)
                if key in cache:
                    tokens.append(cache[key])
                    continue
                reason = cache.unreadable.get(key)
                if reason is not None:
                    raise DataError(f"{where}: picture {k} could not be read when the feature cache "
                                    f"{cache.cache_dir} was built: {reason}", UNREADABLE_IMAGE, rid)
                raise DataError(f"{where}: picture {k} ({key!r}) is not in the feature cache {cache.cache_dir}",
                                NOT_CACHED, rid)
            return torch.stack(tokens)
        images = []
        for k, data in enumerate(pictures):
            try:
                images.append(decode_picture(data, f"picture {k} of {len(pictures)}"))
            except ImageError as err:
                raise DataError(f"{where}: {err}", UNREADABLE_IMAGE, rid) from None
        return self.preprocess(images)

    # -- what the feature cache needs --------------------------------------------------------

    def picture_names(self) -> list[str]:
        """The feature-cache names of every picture this dataset's rows show (one per <image>
        tag, text-only rows none), in row order. Reads the conversations column once."""
        return dataset_picture_names(self.path, self.rows)

    def scan(self, progress: bool = False) -> list[Skipped]:
        """Draw every sample once (pictures decoded) and return the bad ones (raises on the first
        without skip_bad_samples). For checking a file before a long run; training does not need it."""
        from tqdm.auto import tqdm

        before = len(self.skipped)
        for i in tqdm(range(len(self)), desc=f"checking {self.path.name}", disable=not progress):
            self[i]
        return self.skipped[before:]


