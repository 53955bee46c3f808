"""Writing the original's parquet layout: rows of conversations and encoded pictures, and the
conversion of a v1 JSON dataset (records + image folder) to it."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from ..runfiles import replaced_atomically
from .parquet_layout import CONVERSATIONS, DEFAULT_ROW_GROUP_SIZE, IMAGE_BYTES, as_pictures, pyarrow_modules
from .records import check_turns



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
    pa, pq = pyarrow_modules()
    path = Path(path)
    image_type = pa.list_(pa.binary()) if several_pictures else pa.binary()
    schema = pa.schema([(CONVERSATIONS, pa.string()), (IMAGE_BYTES, image_type)]
                       + [(name, pa.string()) for name in extra_columns])
    count = 0
    columns = {name: [] for name in schema.names}

    def flush(writer):
        nonlocal columns
        if columns[CONVERSATIONS]:
            writer.write_table(pa.table(columns, schema=schema), row_group_size=row_group_size)
            columns = {name: [] for name in schema.names}

    with replaced_atomically(path) as tmp:
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
                    pictures = as_pictures(pictures)
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
