"""Reading rows of parquet files without loading them: footers at start-up, a row group when
one of its rows is wanted (a few kept per process), memory-mapped files.

Random access reads a whole row group per row; files written here use small row groups
(:data:`~minimind_v.data.parquet_layout.DEFAULT_ROW_GROUP_SIZE` rows) so that one read costs little.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..runfiles import inside
from .images import ImageError, decode_picture
from .parquet_layout import (CONVERSATIONS, ID, IMAGE_BYTES, as_pictures, image_tag_count, parquet_files,
                             parse_conversations, parse_picture_key, picture_key, pyarrow_modules)
from .records import DataError


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
            _, pq = pyarrow_modules()
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
        _, pq = pyarrow_modules()
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
                names += [picture_key(index.names[f], first + local, k) for k in range(image_tag_count(turns))]
        global_row += n
    return names


def row_id_and_where(index: ParquetIndex, f: int, file_row: int, row: dict) -> tuple[str, str]:
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
            rid, where = row_id_and_where(index, f, first + local, row)
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
        pictures = as_pictures(row.get(IMAGE_BYTES))
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
        pictures = as_pictures(value)
        if k >= len(pictures):
            raise ImageError(f"row {row} of {path} has {len(pictures)} picture(s), no picture {k}")
        return decode_picture(pictures[k], f"row {row} of {path}, picture {k}")

    def _ends(self, path: Path) -> np.ndarray:
        ends = self._index.get(str(path))
        if ends is None:
            _, pq = pyarrow_modules()
            meta = pq.read_metadata(str(path), memory_map=True)
            ends = np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)], dtype=np.int64)
            self._index[str(path)] = ends
        return ends


