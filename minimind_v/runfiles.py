"""Writing files so that a crash never leaves a half-written one, and marking a folder complete.

Every file a run depends on is written the way databases write: to a temporary name in the same
folder, flushed to disk (fsync), then renamed over the target (atomic on POSIX), then the folder
itself is synced so the rename survives a power cut. A reader sees the old file or the new one,
never a mix.

A result folder (a trained model, a generated world, an evaluation) is finished only when its
``complete.json`` exists, and that file is written last. A run killed at any point before leaves
a folder without it, which nothing reuses.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

COMPLETE = "complete.json"


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's entry to disk (best effort where folders cannot be opened)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def temporary_name(path: str | os.PathLike) -> Path:
    """A name beside ``path`` that no other process writing the same file will pick."""
    path = Path(path)
    return path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")


@contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to. When the block ends without error, the file
    there is synced and renamed over ``path`` (then the folder is synced); otherwise it is removed
    and ``path`` is left as it was."""
    path = Path(path)
    temporary = temporary_name(path)
    try:
        yield temporary
        fsync_path(temporary)
        os.replace(temporary, path)
        fsync_path(path.parent)  # make the rename itself durable
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with replaced_atomically(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, payload, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=indent) + "\n")


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` through a temporary file: a kill mid-write leaves the previous checkpoint."""
    import torch

    with replaced_atomically(path) as temporary, open(temporary, "wb") as handle:
        torch.save(obj, handle)
    return Path(path)


def mark_complete(folder: str | os.PathLike, record: dict | None = None) -> Path:
    """Declare ``folder`` finished: call it after everything else in it is written."""
    payload = {"completed_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(record or {})}
    return atomic_write_json(Path(folder) / COMPLETE, payload)


def clear_complete(folder: str | os.PathLike) -> None:
    """Withdraw the mark before anything in ``folder`` is rewritten."""
    marker = Path(folder) / COMPLETE
    if marker.exists():
        marker.unlink()
        fsync_path(marker.parent)


def read_complete(folder: str | os.PathLike) -> dict | None:
    """The completion record of ``folder``, or None when it is not (or not verifiably) complete."""
    try:
        record = json.loads((Path(folder) / COMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_complete(folder: str | os.PathLike) -> bool:
    return read_complete(folder) is not None


def inside(folder: str | os.PathLike, name: str, what: str = "path") -> Path:
    """``folder / name``, refusing a name that would reach outside ``folder`` (absolute, ``..``, a
    link out). Names read from files (records, cache metadata) go through here."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{what} {name!r} is not a file name inside {folder}")
    candidate = Path(name)
    if candidate.is_absolute() or candidate.drive or ".." in candidate.parts:
        raise ValueError(f"{what} {name!r} must be a relative name inside {folder} (no absolute path, no '..')")
    joined = folder / candidate
    base = folder.resolve()
    resolved = joined.resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"{what} {name!r} leads outside {folder} (through a link)")
    return joined
