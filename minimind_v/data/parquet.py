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

Random access reads a whole row group per row; files written here use small row groups
(:data:`DEFAULT_ROW_GROUP_SIZE` rows) so that one read costs little.
"""

from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from ..runfiles import inside
from ..tokenizer import IMAGE_TAG
from .datasets import ChatSamples, Sample
from .images import ImageError, decode_picture
from .records import (BAD_CONVERSATIONS, IMAGE_TAGS, NOT_CACHED, UNREADABLE_IMAGE, DataError, Skipped,
                      check_turns, skip_summary)

CONVERSATIONS, IMAGE_BYTES, ID = "conversations", "image_bytes", "id"
# The original's text-only rows hold a black picture of 8x8 pixels; a picture no larger than this
# in a row without an <image> tag is that placeholder, never shown to the encoder.
PLACEHOLDER_MAX_SIDE = 8
DEFAULT_ROW_GROUP_SIZE = 256
_KEY_SEPARATOR = "#"


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise ImportError("reading the parquet layout needs pyarrow: pip install pyarrow") from err
    return pa, pq


def parquet_files(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(root folder, the parquet files in order): a file is its own list (root: its folder); a
    folder gives every ``*.parquet`` under it, sorted by relative name (hidden names left out)."""
    path = Path(path)
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no parquet dataset at {path}: expected a .parquet file or a folder of shards")
    files = sorted((p for p in path.rglob("*.parquet") if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise FileNotFoundError(f"{path} holds no .parquet file")
    return path, files


def picture_key(file_name: str, row: int, k: int) -> str:
    """The feature-cache name of picture k of a parquet row: ``"<file>#<row>/<k>"`` (file relative
    to the dataset's root folder)."""
    return f"{file_name}{_KEY_SEPARATOR}{row}/{k}"


def parse_picture_key(key: str) -> tuple[str, int, int] | None:
    """``"<file>#<row>/<k>"`` -> (file, row, k); None for an ordinary image file name."""
    file_name, sep, rest = key.rpartition(_KEY_SEPARATOR)
    if not sep or not file_name.endswith(".parquet"):
        return None
    row, slash, k = rest.partition("/")
    if not slash or not row.isdigit() or not k.isdigit():
        return None
    return file_name, int(row), int(k)


def is_placeholder_picture(data) -> bool:
    """Whether encoded bytes are the original's text-only placeholder (a picture of at most 8x8)."""
    try:
        with Image.open(io.BytesIO(data)) as image:  # the header alone gives the size
            return max(image.size) <= PLACEHOLDER_MAX_SIDE
    except Exception:  # noqa: BLE001 - not a picture at all: not the placeholder either
        return False


def _as_pictures(value) -> list:
    """image_bytes of one row -> a list of encoded pictures (None or an empty list: none)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


class RowGroupReader:
    """Rows of parquet files, read a row group at a time and kept in a small per-process cache.

    Files are opened memory-mapped on first use; a forked or unpickled copy opens its own.
    """

    def __init__(self, columns: Sequence[str], cached_groups: int = 4, open_files: int = 64, memory_map: bool = True):
        self.columns = list(columns)
        self.cached_groups, self.max_open = max(1, cached_groups), max(1, open_files)
        self.memory_map = memory_map
        self._reset()

    def _reset(self):
        self._pid = os.getpid()
        self._files: OrderedDict = OrderedDict()
        self._groups: OrderedDict = OrderedDict()

    def __getstate__(self):
        return {"columns": self.columns, "cached_groups": self.cached_groups, "max_open": self.max_open,
                "memory_map": self.memory_map}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def _file(self, path: Path):
        if self._pid != os.getpid():
            self._reset()
        handle = self._files.get(path)
        if handle is None:
            _, pq = _pyarrow()
            handle = pq.ParquetFile(str(path), memory_map=self.memory_map)
            self._files[path] = handle
            while len(self._files) > self.max_open:
                self._files.popitem(last=False)
        else:
            self._files.move_to_end(path)
        return handle

    def group(self, path: Path, group: int, columns: Sequence[str] | None = None):
        """Row group ``group`` of ``path`` as a pyarrow Table of ``columns`` (default: the reader's)."""
        columns = list(columns) if columns is not None else self.columns
        key = (path, group, tuple(columns))
        if self._pid != os.getpid():
            self._reset()
        table = self._groups.get(key)
        if table is None:
            table = self._file(path).read_row_group(group, columns=columns, use_threads=False)
            self._groups[key] = table
            while len(self._groups) > self.cached_groups:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(key)
        return table


class ParquetIndex:
    """Where each row lives: (file, row group, row in the group), from the files' footers alone."""

    def __init__(self, path: str | os.PathLike):
        _, pq = _pyarrow()
        self.root, self.files = parquet_files(path)
        self.names = [f.relative_to(self.root).as_posix() for f in self.files]
        ends, group_file, group_index, group_first = [], [], [], []
        self.columns: list[list[str]] = []
        total = 0
        for f, file_path in enumerate(self.files):
            try:
                meta = pq.read_metadata(str(file_path), memory_map=True)
            except (OSError, ValueError) as err:
                raise DataError(f"{file_path} is not a readable parquet file ({err})") from None
            self.columns.append(list(meta.schema.to_arrow_schema().names))
            first = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if n == 0:
                    continue
                group_file.append(f)
                group_index.append(g)
                group_first.append(first)
                first += n
                total += n
                ends.append(total)
        self.group_ends = np.asarray(ends, dtype=np.int64)  # global row at which each group ends
        self.group_file = np.asarray(group_file, dtype=np.int32)
        self.group_index = np.asarray(group_index, dtype=np.int32)
        self.group_first = np.asarray(group_first, dtype=np.int64)  # its first row within its file
        self.num_rows = total

    def locate(self, row: int) -> tuple[int, int, int, int]:
        """Global row -> (file index, row group, row within the group, row within the file)."""
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} out of range for {self.num_rows} rows")
        g = int(np.searchsorted(self.group_ends, row, side="right"))
        start = int(self.group_ends[g - 1]) if g else 0
        local = row - start
        return int(self.group_file[g]), int(self.group_index[g]), local, int(self.group_first[g]) + local

    def groups(self):
        """(file index, row group, rows in it, its first row within the file), in order."""
        starts = np.concatenate([[0], self.group_ends[:-1]])
        for g in range(len(self.group_ends)):
            yield (int(self.group_file[g]), int(self.group_index[g]), int(self.group_ends[g] - starts[g]),
                   int(self.group_first[g]))


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
        rid, where = _row_id_and_where(self.index, raw["file_index"], raw["row"], raw)
        try:
            return self._sample(raw, rid, where)
        except DataError as error:
            if not self.skip_bad_samples:
                raise
            self.skipped.append(Skipped.from_error(error, rid))
            return self._failed(rid, error)

    def _sample(self, raw: dict, rid: str, where: str) -> Sample:
        turns = parse_conversations(raw.get(CONVERSATIONS), where, rid)
        pictures = _as_pictures(raw.get(IMAGE_BYTES)) if self.uses_images else []
        if self.uses_images:
            tags = _tag_count(turns)
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


def parse_conversations(value, where: str, rid=None) -> list:
    """A row's conversations (a JSON string, bytes, or an already parsed list) -> the list of turns;
    DataError (kind BAD_CONVERSATIONS) naming the row for anything else."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where}: conversations are not UTF-8 text", BAD_CONVERSATIONS, rid) from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: conversations are not valid JSON ({err.msg} at character {err.pos})",
                            BAD_CONVERSATIONS, rid) from None
    if not isinstance(value, list):
        raise DataError(f"{where}: conversations must be a JSON list of turns, got {type(value).__name__}",
                        BAD_CONVERSATIONS, rid)
    return value


def _tag_count(turns) -> int:
    return sum(t.get("content", t.get("value", "")).count(IMAGE_TAG) for t in turns
               if isinstance(t, dict) and isinstance(t.get("content", t.get("value")), str))


def dataset_picture_names(path: str | os.PathLike, rows: Sequence[int] | None = None) -> list[str]:
    """Every picture of a parquet dataset that a sample shows, as feature-cache names
    ``"<file>#<row>/<k>"`` (k < the row's <image> tags), in row order. Reads only conversations."""
    index = ParquetIndex(path)
    reader = RowGroupReader([CONVERSATIONS], cached_groups=1)
    wanted = None if rows is None else set(int(r) for r in rows)
    names, global_row = [], 0
    for f, group, n, first in index.groups():
        if wanted is not None and not any(r in wanted for r in range(global_row, global_row + n)):
            global_row += n
            continue
        column = reader.group(index.files[f], group).column(CONVERSATIONS)
        for local in range(n):
            if wanted is None or global_row + local in wanted:
                try:
                    turns = parse_conversations(column[local].as_py(), "")
                except DataError:
                    continue
                names += [picture_key(index.names[f], first + local, k) for k in range(_tag_count(turns))]
        global_row += n
    return names


def _row_id_and_where(index: ParquetIndex, f: int, file_row: int, row: dict) -> tuple[str, str]:
    has_id = row.get(ID) is not None
    rid = str(row[ID]) if has_id else f"{index.names[f]}#{file_row}"
    where = f"row {file_row}" + (f" (id {rid!r})" if has_id else "") + f" of {index.files[f]}"
    return rid, where


def iter_rows(path: str | os.PathLike, limit: int | None = None, columns: Sequence[str] | None = None):
    """Every row of a parquet dataset in order, a row group at a time: yields (file name, row in
    the file, where (for messages: "row 12 (id 'x') of /path/file.parquet"), id, {column: value})."""
    index = ParquetIndex(path)
    reader = RowGroupReader([], cached_groups=1)
    count = 0
    for f, group, n, first in index.groups():
        wanted = [c for c in (columns or index.columns[f]) if c in index.columns[f]]
        table = reader.group(index.files[f], group, wanted)
        data = {name: table.column(name).to_pylist() for name in table.column_names}
        for local in range(n):
            if limit is not None and count >= limit:
                return
            row = {name: values[local] for name, values in data.items()}
            rid, where = _row_id_and_where(index, f, first + local, row)
            yield index.names[f], first + local, where, rid, row
            count += 1


def parquet_records(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The rows of a parquet dataset as records without their pictures: {"id", "image": the
    pictures' feature-cache names, "conversations": the parsed turns (None if malformed), and every
    other column (JSON values decoded)}, e.g. for ``evaluate.accuracy_by_objects``."""
    records = []
    for file_name, file_row, where, rid, row in iter_rows(path, limit=limit):
        try:
            turns = parse_conversations(row.get(CONVERSATIONS), where, rid)
        except DataError:
            turns = None
        pictures = _as_pictures(row.get(IMAGE_BYTES))
        record = {ID: rid, "image": [picture_key(file_name, file_row, k) for k in range(len(pictures))],
                  CONVERSATIONS: turns}
        for name, value in row.items():
            if name in (ID, CONVERSATIONS, IMAGE_BYTES):
                continue
            if isinstance(value, str) and value[:1] in "[{":
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            record[name] = value
        records.append(record)
    return records


class ParquetPictures:
    """Reads the pictures named ``"<file>#<row>/<k>"`` under a root folder (for the feature cache)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.reader = RowGroupReader([IMAGE_BYTES], cached_groups=2)
        self._index: dict[str, tuple] = {}  # file -> its footer's row-group ends

    def path_of(self, key: str) -> Path:
        """The parquet file a picture key names, confined to the root folder (ValueError otherwise)."""
        parsed = parse_picture_key(key)
        if parsed is None:
            raise ValueError(f"{key!r} is not a parquet picture name '<file>#<row>/<k>'")
        return inside(self.root, parsed[0], "parquet file")

    def load(self, key: str) -> Image.Image:
        """The picture ``key`` as an RGB PIL image; ImageError naming it when it cannot be read."""
        try:
            path = self.path_of(key)
        except ValueError as err:
            raise ImageError(str(err)) from None
        file_name, row, k = parse_picture_key(key)
        try:
            ends = self._ends(path)
        except (OSError, ValueError) as err:
            raise ImageError(f"{path}: cannot read the parquet file ({err})") from None
        group = int(np.searchsorted(ends, row, side="right"))
        if group >= len(ends):
            raise ImageError(f"{path} has no row {row}")
        local = row - (int(ends[group - 1]) if group else 0)
        value = self.reader.group(path, group).column(IMAGE_BYTES)[local].as_py()
        pictures = _as_pictures(value)
        if k >= len(pictures):
            raise ImageError(f"row {row} of {path} has {len(pictures)} picture(s), no picture {k}")
        return decode_picture(pictures[k], f"row {row} of {path}, picture {k}")

    def _ends(self, path: Path) -> np.ndarray:
        ends = self._index.get(str(path))
        if ends is None:
            _, pq = _pyarrow()
            meta = pq.read_metadata(str(path), memory_map=True)
            ends = np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)], dtype=np.int64)
            self._index[str(path)] = ends
        return ends


# ----------------------------------------------------------------------------- writing


def write_chat_parquet(
    path: str | os.PathLike,
    rows: Iterable[dict],
    several_pictures: bool = False,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    extra_columns: Sequence[str] = (),
) -> int:
    """Write rows ``{"conversations": [turns] or a JSON string, "image_bytes": bytes | [bytes] | None,
    <extra column>: str, ...}`` as a parquet file in the original's layout; returns the row count.

    several_pictures: ``image_bytes`` is a list of pictures in every row (a parquet column has one
    type), else one picture per row. extra_columns: string columns written after the two (e.g.
    "id"; values that are not strings are stored as JSON). Written to a temporary file, then
    renamed: an interrupted write leaves no half file under ``path``.
    """
    pa, pq = _pyarrow()
    path = Path(path)
    image_type = pa.list_(pa.binary()) if several_pictures else pa.binary()
    schema = pa.schema([(CONVERSATIONS, pa.string()), (IMAGE_BYTES, image_type)]
                       + [(name, pa.string()) for name in extra_columns])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    columns = {name: [] for name in schema.names}

    def flush(writer):
        nonlocal columns
        if columns[CONVERSATIONS]:
            writer.write_table(pa.table(columns, schema=schema), row_group_size=row_group_size)
            columns = {name: [] for name in schema.names}

    try:
        # Pictures are compressed already: no dictionary, no compression for them. No min/max
        # statistics: nothing filters on these columns, and a picture's bytes as a row group's
        # "minimum" would make the footer (read at every start-up) grow with the data.
        with pq.ParquetWriter(str(tmp), schema, compression={CONVERSATIONS: "zstd", IMAGE_BYTES: "none",
                                                             **{n: "zstd" for n in extra_columns}},
                              use_dictionary=[CONVERSATIONS, *extra_columns], write_statistics=False) as writer:
            for row in rows:
                conversations = row[CONVERSATIONS]
                if not isinstance(conversations, str):
                    conversations = json.dumps(conversations, ensure_ascii=False)
                pictures = row.get(IMAGE_BYTES)
                if several_pictures:
                    pictures = _as_pictures(pictures)
                elif isinstance(pictures, (list, tuple)):
                    if len(pictures) != 1:
                        raise ValueError(f"row {count} has {len(pictures)} pictures; write with several_pictures=True")
                    pictures = pictures[0]
                columns[CONVERSATIONS].append(conversations)
                columns[IMAGE_BYTES].append(pictures)
                for name in extra_columns:
                    value = row.get(name)
                    columns[name].append(value if value is None or isinstance(value, str)
                                         else json.dumps(value, ensure_ascii=False))
                count += 1
                if len(columns[CONVERSATIONS]) >= row_group_size:
                    flush(writer)
            flush(writer)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def encode_picture(image: Image.Image, format: str = "PNG", **options) -> bytes:
    """A PIL image -> its encoded bytes (PNG by default: lossless, the same pixels as the file)."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def placeholder_picture() -> bytes:
    """The original's text-only placeholder: an 8x8 black JPEG."""
    return encode_picture(Image.new("RGB", (8, 8), (0, 0, 0)), "JPEG")


def records_to_parquet(json_path: str | os.PathLike, image_dir: str | os.PathLike, out: str | os.PathLike,
                       row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> int:
    """Convert a v1 JSON dataset (records + image folder) to the parquet layout: conversations as
    role/content JSON, each picture's file bytes as stored (found under the record's name or the
    original SFT naming); other record fields (id, scene, ...) as string columns."""
    from .records import find_image, read_records, record_id

    records = read_records(json_path)
    several = any(isinstance(r, dict) and isinstance(r.get("image"), list) for r in records)
    extra = sorted({k for r in records if isinstance(r, dict) for k in r} - {"image", CONVERSATIONS})

    def rows():
        for index, record in enumerate(records):
            rid = record_id(record, index)
            where = f"record {rid!r} in {json_path}"
            messages = check_turns(record.get(CONVERSATIONS), where, rid, image_tags="any")
            names = record.get("image")
            names = names if isinstance(names, list) else [names] if names else []
            pictures = [find_image(image_dir, n, where, rid).read_bytes() for n in names]
            yield {CONVERSATIONS: messages, IMAGE_BYTES: pictures if several else (pictures[0] if pictures else None),
                   **{k: record.get(k) for k in extra}}

    return write_chat_parquet(out, rows(), several_pictures=several, row_group_size=row_group_size,
                              extra_columns=extra)
