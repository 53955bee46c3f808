"""What a feature-cache build reads: the pictures' names, the files that hold them (confined to
the image folder), their size and mtime (the cache's staleness check), the decoding of each
picture in worker processes, and the clean-up of token files a killed build left behind.

Staleness by size + mtime_ns rather than a content hash: checking a content hash means reading
every image again on every open (tens of GB for the real dataset), while a stat costs
microseconds per file. An edit that keeps both size and the nanosecond mtime is not a realistic
accident; the cost of the cheap check is a needless rebuild after copying images without
preserving times (`cp` without -p), which is safe, only slow.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..machine import usable_cores
from ..runfiles import inside
from .feature_cache_meta import PARTIAL_NAME
from .images import ImageError, load_image
from .parquet_rows import ParquetPictures
from .parquet_layout import parse_picture_key

# Fault injection for tests (never set it otherwise): "batch:<n>" SIGKILLs this process after the
# n-th encoded batch is written, "commit" after the token file is in place but before meta.json.
FAULT_ENV = "MINIMIND_V_FAULT_KILL_CACHE_BUILD"


class DecodedImages(torch.utils.data.Dataset):
    """Item i: (pixel_values (3, S, S) or None, problem or None); None items were refused earlier.

    An item is an image file's path or a parquet picture's name "<file>#<row>/<k>" (under root).
    A bad file is reported, not raised, so that the build can decide (skip it or stop) in the
    main process with a message naming it, also when decoding runs in worker processes.
    """

    def __init__(self, items: Sequence, preprocessor, root: Path):
        self.items, self.preprocessor = items, preprocessor
        self.pictures = ParquetPictures(root)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        if item is None:
            return None, "refused or missing"
        try:
            # the same steps as VisionEncoder.pixel_batches
            image = self.pictures.load(item) if isinstance(item, str) else load_image(item)
            return self.preprocessor([image])[0], None
        except (ImageError, OSError, ValueError) as err:
            return None, str(err) if isinstance(err, ImageError) else f"{item}: cannot preprocess the image ({err})"


def collate_decoded(items):
    """[(pixels | None, problem | None)] -> (pixels of the good ones (g, 3, S, S) | None,
    their positions in the batch, [(position, problem)])."""
    good = [i for i, (pixels, _) in enumerate(items) if pixels is not None]
    problems = [(i, problem) for i, (pixels, problem) in enumerate(items) if pixels is None]
    pixels = torch.stack([items[i][0] for i in good]) if good else None
    return pixels, good, problems


def fault_point(point: str) -> None:
    """Die here, as `kill -9` would, when the FAULT_ENV test hook names this point."""
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------- file helpers


def unique_names(names: Sequence) -> list[str]:
    """Names as '/'-separated strings, each once, in first-seen order."""
    return list(dict.fromkeys(Path(name).as_posix() if isinstance(name, os.PathLike) else str(name) for name in names))


def source_path(image_dir: Path, name: str, confined: dict | None = None) -> Path:
    """The file that holds picture ``name``: image_dir / name, or for a parquet picture
    "<file>#<row>/<k>" the parquet file; ValueError when it leads outside image_dir.
    ``confined`` remembers the parquet files already checked (a file holds many pictures)."""
    parsed = parse_picture_key(name)
    if parsed is None:
        return inside(image_dir, name, "image")
    if confined is not None and parsed[0] in confined:
        return confined[parsed[0]]
    path = inside(image_dir, parsed[0], "parquet file")
    if confined is not None:
        confined[parsed[0]] = path
    return path


def source_or_none(image_dir: Path, name: str, confined: dict | None = None) -> Path | None:
    """_source_path, or None (never stat'ed: it reads as missing, so changed) when it leads out."""
    try:
        return source_path(image_dir, name, confined)
    except ValueError:
        return None


def stat_paths(paths: Sequence[Path | None]) -> tuple[np.ndarray, list[int]]:
    """(N, 2) int64 [size_bytes, mtime_ns] per path (-1 for None or a missing file), and the rows missing.
    (A file named many times, like a parquet file's pictures, is stat'ed once.)"""
    stats = np.full((len(paths), 2), -1, dtype=np.int64)
    missing = []
    seen: dict[Path, tuple | None] = {}
    for row, path in enumerate(paths):  # one stat() system call per file; I/O, not tensor work
        if path is None:
            continue
        if path not in seen:
            try:
                status = os.stat(path)
                seen[path] = (status.st_size, status.st_mtime_ns)
            except (FileNotFoundError, NotADirectoryError):
                seen[path] = None
        if seen[path] is None:
            missing.append(row)
        else:
            stats[row] = seen[path]
    return stats, missing


def remove_abandoned_partials(cache_dir: Path) -> None:
    """Delete .partial token files left by killed builds on this machine (their process is gone)."""
    if os.name != "posix":
        return
    host = socket.gethostname()
    for partial in cache_dir.glob("*.partial"):
        owner = PARTIAL_NAME.match(partial.name)  # features-<id>.npy.<host>-<pid>.partial
        if owner is None or owner["host"] != host:
            continue
        try:
            os.kill(int(owner["pid"]), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            partial.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, owned by someone else


def decoding_workers(count: int) -> int:
    """Processes that decode pictures for a build of ``count``: none for a small build (starting
    them costs more than they save) or on two cores (the encoder's threads hold both, so a decoding
    process only takes turns with them: 577 against 752 shapes pictures/s, 141 against 144 photos/s,
    benchmarks/bench_feature_cache.py and bench_vision.py), else one per usable core but one, at most 8."""
    if count < 512 or usable_cores() <= 2:
        return 0
    return min(8, usable_cores() - 1)
