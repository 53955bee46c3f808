"""Either layout of the data through one door: what ``--data`` points at, and the dataset for it.

- The v1 JSON layout: a JSON records file and an image folder
  (:class:`~minimind_v.data.datasets.ChatDataset`).
- The parquet layout the original publishes since 2025-12-27: a .parquet file or a folder of
  shards, the pictures inside the rows (:class:`~minimind_v.data.parquet.ParquetChatDataset`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

# The original's parquet file for each of the v1 JSON files (the shapes world writes the same names).
PARQUET_NAMES = {"pretrain_data.json": "pretrain_i2t.parquet", "sft_data.json": "sft_i2t.parquet",
                 "eval_data.json": "eval_i2t.parquet"}




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
    :class:`~minimind_v.data.datasets.ChatDataset` for a JSON records file (pictures in
    ``image_dir``; ``records`` replaces the file's). Same samples, batches and errors either way."""
    if is_parquet_source(path):
        from .parquet import ParquetChatDataset

        if records is not None:
            raise ValueError("records= is for the JSON layout; pick parquet rows with rows=")
        return ParquetChatDataset(path, tokenizer, num_image_tokens, preprocess=preprocess,
                                  feature_cache=feature_cache, max_length=max_length, text_only=text_only,
                                  skip_bad_samples=skip_bad_samples, rows=rows)
    if rows is not None:
        raise ValueError("rows= is for the parquet layout; pick JSON records with records=")
    from .datasets import ChatDataset

    return ChatDataset(path, tokenizer, num_image_tokens, image_dir=image_dir, preprocess=preprocess,
                       feature_cache=feature_cache, max_length=max_length, text_only=text_only,
                       skip_bad_samples=skip_bad_samples, records=records)
