"""The original's parquet layout itself: its columns, where a folder's files are, how a row's
conversations and pictures are stored, and the feature-cache name of each picture.

Each row holds

    conversations   a JSON string: [{"role": "user"|"assistant"|"system", "content": "...<image>..."}, ...]
    image_bytes     the encoded picture (JPEG, 256x256), or a list of them, one <image> tag each

A conversation without a picture carries an 8x8 black placeholder picture and no ``<image>`` tag.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from PIL import Image

from ..tokenizer import IMAGE_TAG
from .records import BAD_CONVERSATIONS, DataError

CONVERSATIONS, IMAGE_BYTES, ID = "conversations", "image_bytes", "id"
# The original's text-only rows hold a black picture of 8x8 pixels; a picture no larger than this
# in a row without an <image> tag is that placeholder, never shown to the encoder.
PLACEHOLDER_MAX_SIDE = 8
DEFAULT_ROW_GROUP_SIZE = 256
_KEY_SEPARATOR = "#"


def pyarrow_modules():
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


def as_pictures(value) -> list:
    """image_bytes of one row -> a list of encoded pictures (None or an empty list: none)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]



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


def image_tag_count(turns) -> int:
    return sum(t.get("content", t.get("value", "")).count(IMAGE_TAG) for t in turns
               if isinstance(t, dict) and isinstance(t.get("content", t.get("value")), str))
