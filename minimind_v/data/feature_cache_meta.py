"""The feature cache's commit record, meta.json: its fields, and refusing one a build did not write.

meta.json is data from disk, not trusted: every name in it is checked (features_file must be
exactly ``features-<12 hex>.npy`` inside the cache folder, image names relative without '..'),
and a meta.json that fails any check is refused as stale (naming the field), so a crafted one
can neither make a rebuild delete nor make an open read anything outside the cache folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .records import relative_name_problem

META_FILE = "meta.json"
FEATURES_NAME = re.compile(r"features-[0-9a-f]{12}\.npy")  # the only token file name a build writes
PARTIAL_NAME = re.compile(r"^features-[0-9a-f]{12}\.npy\.(?P<host>.+)-(?P<pid>\d+)\.partial$")
FORMAT_VERSION = 2  # 2: adds "unreadable"; version 1 caches (no unreadable images) are still read
READABLE_FORMATS = (1, 2)
DTYPE_NAMES = ("float16", "float32")


class StaleCacheError(RuntimeError):
    """The feature cache is missing, incomplete, or was built from other weights, preprocessing or images."""


REBUILD = "rebuild it with FeatureCache.build(encoder, image_dir, cache_dir) or ensure_cache(...)"


def read_meta_or_none(cache_dir: Path) -> dict | None:
    try:
        meta = json.loads((cache_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") in READABLE_FORMATS else None


def check_meta(cache_dir: Path, meta: dict) -> None:
    """Refuse (StaleCacheError naming the field) a meta.json that a build would not have written."""

    def refuse(field: str, problem: str):
        raise StaleCacheError(f"feature cache {cache_dir}: meta.json field {field!r} {problem}; "
                              f"refused as stale, {REBUILD}")

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not isinstance(meta.get("fingerprint"), str):
        refuse("fingerprint", "is not a string")
    features_file = meta.get("features_file")
    if not isinstance(features_file, str) or not FEATURES_NAME.fullmatch(features_file):
        refuse("features_file", f"is {features_file!r}, not a name of the form features-<12 hex digits>.npy")
    for field in ("num_images", "num_tokens", "width"):
        if not is_int(meta.get(field)) or meta[field] < (0 if field == "num_images" else 1):
            refuse(field, f"is {meta.get(field)!r}, not a positive integer")
    if meta.get("dtype") not in DTYPE_NAMES:
        refuse("dtype", f"is {meta.get('dtype')!r}, not one of {DTYPE_NAMES}")
    names = meta.get("names")
    if not isinstance(names, list) or len(names) != meta["num_images"]:
        refuse("names", f"is not a list of num_images={meta['num_images']} image names")
    for name in names:
        problem = relative_name_problem(name)
        if problem:
            refuse("names", f"holds {name!r}, which {problem}")
    if len(set(names)) != len(names):
        refuse("names", "holds the same name twice")
    try:
        stats = np.asarray(meta.get("image_stats"))
    except (ValueError, TypeError):
        stats = None
    if stats is None or stats.shape != (len(names), 2) or (stats.size and stats.dtype.kind != "i"):
        refuse("image_stats", f"is not one [size, mtime_ns] pair of integers per name ({len(names)})")
    unreadable = meta.get("unreadable", {})
    if not isinstance(unreadable, dict) or not all(isinstance(v, str) for v in unreadable.values()) \
            or not set(unreadable) <= set(names):
        refuse("unreadable", "is not a mapping from cached image names to reasons")


